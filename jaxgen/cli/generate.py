"""`jaxgen generate`: stream one prompt to the terminal, or run a prompts JSONL (resumable).

The sampling flags come from `GenerateConfig` (cli/options.py) and override the run
config's `generate` section.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from jaxgen.cli import options
from jaxgen.errors import JaxgenError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run directory or HF model directory")
    p.add_argument("--run", required=True, help="run directory (or Hugging Face model directory)")
    p.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast params for serving")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt: tokens stream to the terminal")
    mode.add_argument("--input", help="prompts JSONL: {id, prompt, ...per-line options}")
    p.add_argument("--output", help="output JSONL (with --input); re-running resumes it")
    options.add_flags(p)
    p.add_argument("--chunk", type=int, default=8, help="decode steps between streamed pieces")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxgen.inference.language_model import load

    if args.input and not args.output:
        raise JaxgenError("--input needs --output (the JSONL file to write or resume)")
    opts = options.from_args(args)
    lm = load(args.run, step=args.checkpoint, dtype=args.dtype)
    if args.prompt is not None:
        pieces = lm.stream(args.prompt, chunk=args.chunk, **opts)
        first = next(pieces, "")  # bad options or a prompt too long fail before anything is printed
        print(args.prompt, end="")  # then the completion continues it, as it streams
        for piece in itertools.chain([first], pieces):
            print(piece if isinstance(piece, str) else " ".join(map(str, piece)), end="", flush=True)
        print()
        return 0
    from jaxgen.inference.jsonl import run

    summary = run(lm, args.input, args.output, opts, progress=not args.no_progress)
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    print(
        f"wrote {summary.written} lines ({summary.skipped} already done, {summary.tokens} tokens, "
        f"{rate:.0f} tokens/s) to {args.output}",
        file=sys.stderr,
    )
    for failure in summary.failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if summary.failures else 0
