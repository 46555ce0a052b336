"""Pieces several command groups share: the config-and-overrides arguments, the stub of a
command still to come."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

NOT_IMPLEMENTED = 2  # exit code for commands that later issues fill in


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (may `extends:` another)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")


def not_implemented(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        print(f"jaxgen {name}: not implemented yet", file=sys.stderr)
        return NOT_IMPLEMENTED

    return handler
