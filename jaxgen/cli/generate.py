"""The `generate`, `eval` and `bench generate` commands (argument parsing and handlers).

Kept apart from jaxgen/cli.py so that file stays a short table of commands; each flag
is named after a `LanguageModel.generate` option and overrides the run config's
`generate` section.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

from jaxgen.errors import JaxgenError

# flag -> (type, help); the option name is the flag with dashes as underscores.
_OPTION_FLAGS = {
    "--max-new-tokens": (int, "new tokens per completion"),
    "--max-length": (int, "prompt + new tokens (as in Hugging Face); wins over --max-new-tokens"),
    "--temperature": (float, "0 = greedy"),
    "--top-k": (int, "keep the k most probable tokens (0 = off)"),
    "--top-p": (float, "keep the smallest set of tokens whose mass reaches p"),
    "--min-p": (float, "drop tokens below min_p x the top probability"),
    "--repetition-penalty": (float, "HF repetition penalty (1 = off)"),
    "--no-repeat-ngram-size": (int, "never repeat an n-gram of this size (0 = off)"),
    "--num-beams": (int, "beam search with this many beams (1 = sampling)"),
    "--num-return-sequences": (int, "completions per prompt (<= num beams)"),
    "--length-penalty": (float, "beam score = sum log-probs / length ** penalty"),
    "--seed": (int, "sampling seed (a line's text depends only on the seed and its id)"),
    "--batch-size": (int, "prompts per batch"),
}


def _early_stopping(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "never":
        return "never"
    raise argparse.ArgumentTypeError("expected true, false or never")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a run directory or HF model directory")
    p.add_argument("--run", required=True, help="run directory (or Hugging Face model directory)")
    p.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast params for serving")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt: tokens stream to the terminal")
    mode.add_argument("--input", help="prompts JSONL: {id, prompt, ...per-line options}")
    p.add_argument("--output", help="output JSONL (with --input); re-running resumes it")
    for flag, (kind, help_text) in _OPTION_FLAGS.items():
        p.add_argument(flag, type=kind, help=help_text)
    p.add_argument("--early-stopping", type=_early_stopping, help="beam search: true, false or never")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--banned", action="append", help="text that must not be generated (repeatable)")
    p.add_argument("--control", action="append", metavar="KEY=VALUE", help="control attribute (repeatable)")
    p.add_argument("--chunk", type=int, default=8, help="decode steps between streamed pieces")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_generate)


def _options(args: argparse.Namespace) -> dict:
    options = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in _OPTION_FLAGS
    }
    options["early_stopping"] = args.early_stopping
    options["stop"] = tuple(args.stop) if args.stop else None
    options["banned"] = tuple(args.banned) if args.banned else None
    if args.control:
        control = {}
        for item in args.control:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise JaxgenError(f"--control {item!r}: expected key=value")
            control[key] = value
        options["control"] = control
    return {k: v for k, v in options.items() if v is not None}


def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxgen.inference.language_model import load

    if args.input and not args.output:
        raise JaxgenError("--input needs --output (the JSONL file to write or resume)")
    options = _options(args)
    lm = load(args.run, step=args.checkpoint, dtype=args.dtype)
    if args.prompt is not None:
        pieces = lm.stream(args.prompt, chunk=args.chunk, **options)
        first = next(pieces, "")  # bad options or a prompt too long fail before anything is printed
        print(args.prompt, end="")  # then the completion continues it, as it streams
        for piece in itertools.chain([first], pieces):
            print(piece if isinstance(piece, str) else " ".join(map(str, piece)), end="", flush=True)
        print()
        return 0
    from jaxgen.inference.jsonl import run

    summary = run(lm, args.input, args.output, options, progress=not args.no_progress)
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    print(
        f"wrote {summary.written} lines ({summary.skipped} already done, {summary.tokens} tokens, "
        f"{rate:.0f} tokens/s) to {args.output}",
        file=sys.stderr,
    )
    for failure in summary.failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if summary.failures else 0


# ----------------------------------------------------------------------------- eval


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a run; BLEU/ROUGE of generations")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    q = eval_sub.add_parser("perplexity", help="nats/token, perplexity, nats/char, bits/byte")
    q.add_argument("--run", required=True, help="run directory (or Hugging Face model directory)")
    q.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a UTF-8 text file")
    source.add_argument("--split", help="a prepared split of the run's dataset, e.g. validation")
    q.add_argument("--json", help="where to write the result (default: RUN/eval/perplexity-<source>.json)")
    q.set_defaults(handler=_cmd_eval_perplexity)
    for metric in ("bleu", "rouge"):
        q = eval_sub.add_parser(metric, help=f"{metric.upper()} of generate output against references")
        q.add_argument("--predictions", required=True, help="jaxgen generate output JSONL")
        q.add_argument("--references", required=True, help='JSONL of {"id", "reference" or "references"}')
        q.add_argument("--json", help=f"where to write the result (default: PREDICTIONS.{metric}.json)")
        q.set_defaults(handler=_cmd_eval_text_metric, metric=metric)


def _cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from jaxgen.evaluate import perplexity as evaluate
    from jaxgen.inference.language_model import load

    lm = load(args.run, step=args.checkpoint)
    if args.text:
        result = evaluate.perplexity_of_text(lm, args.text)
        source = pathlib.Path(args.text).stem
    else:
        result = evaluate.perplexity_of_split(lm, args.split)
        source = args.split
    out = args.json or pathlib.Path(args.run) / "eval" / f"perplexity-{source}.json"
    evaluate.write_json(out, result)
    evaluate.print_table(f"perplexity of {args.run} on {source}", result)
    return 0


def _cmd_eval_text_metric(args: argparse.Namespace) -> int:
    from jaxgen.evaluate import perplexity as evaluate

    hyps, refs = evaluate.paired(args.predictions, args.references)
    result = getattr(evaluate, args.metric)(hyps, refs)
    evaluate.write_json(args.json or f"{args.predictions}.{args.metric}.json", result)
    evaluate.print_table(f"{args.metric.upper()} of {args.predictions}", result)
    return 0


# ----------------------------------------------------------------------------- bench


def add_bench_generate(bench_sub) -> None:
    q = bench_sub.add_parser("generate", help="prefill/decode tokens/s, ms per step, compile s")
    q.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    q.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 and 8)")
    q.add_argument("--prompt-len", type=int, default=32)
    q.add_argument("--new-tokens", type=int, default=256)
    q.add_argument("--num-beams", type=int, default=0, help="also time beam search with this many beams")
    q.add_argument("--no-baseline", action="store_true", help="skip the full-forward-per-token baseline")
    q.add_argument(
        "--sample", action="append", default=[], metavar="OPTIONS",
        help='also time sampling at the first batch size, e.g. "top_p=0.9" or "temperature=0.7 top_k=50" '
        "(repeatable)",
    )  # fmt: skip
    q.set_defaults(handler=_cmd_bench_generate)


def _cmd_bench_generate(args: argparse.Namespace) -> int:
    from jaxgen.bench.generate import parse_sample, run
    from jaxgen.config import load_config

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not pathlib.Path(path).exists():  # no config, only overrides
        path, overrides = None, [path, *overrides]
    config = load_config(path, overrides)
    for line in run(
        config, batches=tuple(args.batch or (1, 8)), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        num_beams=args.num_beams, baseline=not args.no_baseline,
        samplers=tuple(parse_sample(spec) for spec in args.sample),
    ):  # fmt: skip
        print(json.dumps(line), flush=True)
    return 0
