"""Pieces several command groups share: the config-and-overrides arguments and the
bad-line flags."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (may `extends:` another)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")


def add_bad_line_flags(p: argparse.ArgumentParser, scope: str, listed: str) -> None:
    """--strict / --allow-bad-lines for a command that skips bad input lines (docs/RELIABILITY.md).

    Args:
        scope: what the flags apply to, e.g. "with --input: " ("" for the whole command).
        listed: where the skipped lines are listed, e.g. "in <output>.errors.jsonl".
    """
    bad = p.add_mutually_exclusive_group()
    bad.add_argument("--strict", action="store_true", help=f"{scope}stop at the first bad line")
    bad.add_argument(
        "--allow-bad-lines",
        action="store_true",
        help=f"{scope}exit 0 even when bad lines were skipped (listed {listed})",
    )
