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


def _quiet_library_logs() -> None:
    """orbax/TFDS log routine notices through absl at WARNING; users only need errors."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _quiet_library_logs()
    # Overrides may follow options too (`train cfg.yaml --run-dir X a.b=1`), which plain
    # argparse rejects for a nargs="*" positional: collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
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
