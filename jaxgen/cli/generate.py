"""`jaxgen generate`: one prompt to the terminal, a prompt per line (--interactive), or a
prompts JSONL (resumable).

The sampling flags come from `GenerateConfig` (cli/options.py) and override the run
config's `generate` section. One sequence streams; beams and several sequences
(`--num-return-sequences`) print once done, numbered, as does anything with --no-stream.
"""

from __future__ import annotations

import argparse
import sys

from jaxgen.cli import options
from jaxgen.cli.common import add_bad_line_flags
from jaxgen.cli.completion import complete
from jaxgen.errors import JaxgenError

_SHOWN = 10  # bad lines printed; all are in the errors file


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run directory or HF model directory")
    p.add_argument("--run", required=True, help="run directory (or Hugging Face model directory)")
    p.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast params for serving")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt: tokens stream to the terminal")
    mode.add_argument("--input", help="prompts JSONL: {id, prompt | messages, ...per-line options}")
    mode.add_argument(
        "--interactive",
        action="store_true",
        help="read a prompt per line (terminal or stdin) and stream each completion; ':set KEY VALUE'"
        " changes an option, ':help' lists the commands, ':quit' or Ctrl-D ends",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="a text prompt is one user turn, rendered with the model's chat template (or the run's"
        " turn_header format) and answered; --input lines with 'messages' are rendered either way",
    )
    p.add_argument("--output", help="output JSONL (with --input); re-running resumes it")
    add_bad_line_flags(p, "with --input: ", "in <output>.errors.jsonl")
    options.add_flags(p)
    p.add_argument("--chunk", type=int, default=8, help="decode steps between streamed pieces")
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="print each returned sequence once done, numbered (the way beams and several sequences"
        " always print)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxgen.inference.language_model import load

    if args.input and not args.output:
        raise JaxgenError("--input needs --output (the JSONL file to write or resume)")
    opts = options.from_args(args)
    lm = load(args.run, step=args.checkpoint, dtype=args.dtype)
    if args.prompt is not None:
        complete(lm, args.prompt, opts, chat=args.chat, chunk=args.chunk, stream=not args.no_stream)
        _report_speculation(lm)
        return 0
    if args.interactive:
        from jaxgen.cli import interactive

        lines = interactive.terminal_lines(sys.stdin)
        code = interactive.run(
            lm, opts, lines, chat=args.chat, chunk=args.chunk, stream=not args.no_stream,
            echo=not sys.stdin.isatty(),
        )  # fmt: skip
        _report_speculation(lm)  # the session's totals, as it ends
        return code
    from jaxgen.inference.jsonl import errors_path, run

    summary = run(
        lm, args.input, args.output, opts, progress=not args.no_progress, chat=args.chat, strict=args.strict
    )
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    print(
        f"wrote {summary.written} lines ({summary.skipped} already done, {summary.tokens} tokens, "
        f"{rate:.0f} tokens/s) to {args.output}",
        file=sys.stderr,
    )
    _report_speculation(lm)
    if not summary.failures:
        return 0
    for failure in summary.failures[:_SHOWN]:
        print(f"skipped {failure}", file=sys.stderr)
    more = len(summary.failures) - _SHOWN
    print(
        (f"... and {more} more; " if more > 0 else "")
        + f"{len(summary.failures)} bad lines skipped, listed in {errors_path(args.output)}",
        file=sys.stderr,
    )
    return 0 if args.allow_bad_lines else 1


def _report_speculation(lm) -> None:
    """One line on stderr saying whether speculative decoding paid: tokens per target pass
    (1 would be plain decoding's) and the share of drafts kept."""
    stats = lm.speculation_stats
    if stats.row_passes:
        print(f"speculative: {stats.summary()}", file=sys.stderr)
