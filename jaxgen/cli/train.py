"""`jaxgen train` and `jaxgen finetune`: one config in, a run directory out."""

from __future__ import annotations

import argparse

from jaxgen.cli.common import add_config_args, not_implemented


def add_parser(sub) -> None:
    for name, help_text in (
        ("train", "pretrain a model from a config (resumes from the run directory)"),
        ("finetune", "fine-tune a model from a config (SFT, LoRA, control tokens)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_args(p)
        p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
        p.set_defaults(handler=_cmd_train if name == "train" else not_implemented(name))


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxgen.runtime.distributed import initialize_from_env

    initialize_from_env()  # a no-op on one host; must run before JAX touches a device
    from jaxgen.config import load_config
    from jaxgen.train.loop import train

    result = train(load_config(args.config, args.overrides), args.run_dir)
    if result.preempted:
        return 0
    if result.process_index != 0:
        return 0
    figures = result.final_eval or {}
    per_char = f" {figures['nats_per_char']:.4f} nats/char" if "nats_per_char" in figures else ""
    print(
        f"final: step {result.step} val loss {figures.get('nats_per_token', float('nan')):.4f}{per_char}"
        f" in {result.wall_seconds:.1f} s wall ({result.run_dir})"
    )
    return 0
