"""`jaxgen data tokenizer|prepare`: a config's tokenizer, then its tokenized dataset."""

from __future__ import annotations

import argparse
import sys

from jaxgen.cli.common import add_bad_line_flags, add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="train tokenizers and prepare datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, help_text, handler in (
        ("tokenizer", "train (or load) the SentencePiece tokenizer of a config", _cmd_tokenizer),
        ("prepare", "tokenize the config's sources into a TFDS array_record dataset", _cmd_prepare),
    ):
        q = data_sub.add_parser(name, help=help_text, description=help_text)
        add_config_args(q)
        q.set_defaults(handler=handler)
        if name == "prepare":
            add_bad_line_flags(q, "", "on the console and in the split statistics")


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from jaxgen.config import load_config
    from jaxgen.data.prepare import ensure_tokenizer
    from jaxgen.tokenizer import load_tokenizer, model_vocab_size

    config = load_config(args.config, args.overrides)
    tok = load_tokenizer(ensure_tokenizer(config, print))
    multiple = config.tokenizer.vocab_multiple
    print(f"{tok.path}: {tok.vocab_size} pieces (model vocab {model_vocab_size(tok, multiple)})")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from jaxgen.config import load_config
    from jaxgen.data import bad_lines, prepare

    strict = ["data.bad_lines=strict"] if args.strict else []
    info = prepare(load_config(args.config, [*args.overrides, *strict]))
    skipped = bad_lines(info)
    if skipped and not args.allow_bad_lines:
        print(
            f"data prepare: {skipped:,} bad lines skipped (listed above); pass --allow-bad-lines to"
            " accept them or --strict to stop at the first",
            file=sys.stderr,
        )
        return 1
    return 0
