"""`jaxgen train` and `jaxgen finetune`: one config in, a run directory out.

`jaxgen finetune merge RUN [OUT]` folds a LoRA run's adapters into a normal run directory.
"""

from __future__ import annotations

import argparse

from jaxgen.cli.common import add_config_args
from jaxgen.errors import JaxgenError

_FINETUNE_HELP = "fine-tune a model from a config (full, freeze, LoRA; SFT, control tokens)"
_FINETUNE_EPILOG = (
    "jaxgen finetune merge RUN [OUT]: fold a LoRA run's adapters into a normal run directory"
    " (default OUT: RUN-merged) that jaxgen generate, eval and convert export-hf read like any other."
)


def add_parser(sub) -> None:
    for name, help_text in (
        ("train", "pretrain a model from a config (resumes from the run directory)"),
        ("finetune", _FINETUNE_HELP),
    ):
        epilog = _FINETUNE_EPILOG if name == "finetune" else None
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        add_config_args(p)
        p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="start over in a run directory holding an earlier run (removes its checkpoints, metrics)",
        )
        p.set_defaults(handler=_cmd_train if name == "train" else _cmd_finetune)


def _run_job(args: argparse.Namespace, job) -> int:
    """Loads the config and runs `job(config)` (train or finetune) in this process's part of
    the job: one process runs it directly; one of several joins the JAX job first (before
    JAX touches a device), under a supervising parent that ends a failed job in one line
    (cli/supervise.py)."""
    from jaxgen.cli import supervise
    from jaxgen.config import load_config
    from jaxgen.runtime.distributed import initialize_from_env

    config = load_config(args.config, args.overrides)
    cluster = supervise.wanted()
    if cluster is not None:
        return supervise.run(args.argv, config, args.run_dir, cluster, args.debug)
    if initialize_from_env(settings=config.distributed):
        supervise.announce(config.distributed.initialization_timeout)
    return _report(job(config))


def _cmd_train(args: argparse.Namespace) -> int:
    def job(config):
        from jaxgen.train.loop import train

        return train(config, args.run_dir, overwrite=args.overwrite)

    return _run_job(args, job)


def _cmd_finetune(args: argparse.Namespace) -> int:
    if args.config == "merge":
        return _cmd_merge(args)

    def job(config):
        from jaxgen.train.finetune import finetune

        return finetune(config, args.run_dir, overwrite=args.overwrite)

    return _run_job(args, job)


def _cmd_merge(args: argparse.Namespace) -> int:
    if not 1 <= len(args.overrides) <= 2 or args.run_dir:
        raise JaxgenError("usage: jaxgen finetune merge RUN [OUT]")
    from jaxgen.train.finetune import merge_run

    run = args.overrides[0]
    out = args.overrides[1] if len(args.overrides) == 2 else run.rstrip("/") + "-merged"
    merge_run(run, out)
    print(f"merged {run} -> {out}")
    return 0


def _report(result) -> int:
    if result.preempted or result.process_index != 0:
        return 0
    figures = result.final_eval or {}
    loss = figures.get("nats_per_token", figures.get("loss", float("nan")))  # DPO: the pair loss
    per_char = f" {figures['nats_per_char']:.4f} nats/char" if "nats_per_char" in figures else ""
    accuracy = f" reward accuracy {figures['accuracy']:.3f}" if "accuracy" in figures else ""
    print(
        f"final: step {result.step} val loss {loss:.4f}{per_char}{accuracy}"
        f" in {result.wall_seconds:.1f} s wall ({result.run_dir})"
    )
    return 0
