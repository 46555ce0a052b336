"""`jaxgen config show`: the config a run would use, resolved, as YAML."""

from __future__ import annotations

import argparse

from jaxgen.cli.common import add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = config_sub.add_parser("show", help="print the resolved config as YAML")
    add_config_args(q)
    q.set_defaults(handler=_cmd_show)


def _cmd_show(args: argparse.Namespace) -> int:
    from jaxgen.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
