"""The `jaxgen` command: parse arguments, call one library function, print errors as one line.

Each command group is a module with `add_parser(sub)` and its handlers; the library
functions they call are the Python API (see README), so a notebook can do everything the
CLI does. Heavy imports (JAX, orbax, TFDS) happen inside the handlers so `--help` stays
instant.
"""

from __future__ import annotations

import argparse
import sys

from jaxgen.cli import bench, config, convert, data, generate, plan, train
from jaxgen.cli import eval as evaluate  # as `eval` it would shadow the builtin
from jaxgen.errors import JaxgenError

# In the order `jaxgen --help` lists them.
_GROUPS = (train, generate, evaluate, data, convert, plan, bench, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxgen",
        description="Pretrain, fine-tune and sample transformer language models with JAX/Flax.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.add_parser(sub)
    return parser


def _quiet_library_logs(debug: bool) -> None:
    """orbax/TFDS log routine notices through absl at WARNING, and orbax logs a failed
    background save (a full disk) at ERROR with its traceback before jaxgen reports it as
    one line; `--debug` shows them all."""
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING if debug else logging.CRITICAL)


def _keep_tpu_runtime_quiet() -> None:
    """No TPU runtime where no TPU is present or asked for (runtime/platforms.py), decided
    before any handler starts a JAX backend. Without libtpu JAX starts none, so the check
    (and importing runtime/, which imports JAX) is skipped and `--help` stays instant."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return
    from jaxgen.runtime.platforms import keep_tpu_runtime_quiet

    keep_tpu_runtime_quiet()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options too (`train cfg.yaml --run-dir X a.b=1`), which plain
    # argparse rejects for a nargs="*" positional: collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a supervised child re-runs it
    _quiet_library_logs(args.debug)
    _keep_tpu_runtime_quiet()
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except JaxgenError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
