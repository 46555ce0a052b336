"""`jaxgen bench data|generate|train`: each benchmark's `run` yields lines, printed as JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from collections.abc import Iterable

from jaxgen.cli.common import add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks printing one JSON line per setting")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    q = bench_sub.add_parser("data", help="prepare MB/s and peak RSS; pipeline batches/s")
    q.add_argument("--mb", type=float, default=200.0, help="size of the synthetic corpus")
    q.add_argument("--batches", type=int, default=500, help="pipeline batches to time (16 x 1024)")
    q.add_argument("--kind", default="bpe", help="tokenizer kind(s), comma-separated: bpe,unigram,char")
    q.add_argument("--workdir", help="where the corpus and dataset go (default: a temp dir)")
    q.set_defaults(handler=_cmd_data)
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
    q.add_argument(
        "--weights",
        default="",
        help="also time batch-1 greedy decoding with these weight formats, e.g. float32,int8"
        " (--speculative: one format, for the target and the draft)",
    )
    q.add_argument("--rounds", type=int, default=3, help="--speculative / --refill: timed rounds")
    q.add_argument(
        "--speculative", choices=("prompt_lookup", "draft"),
        help="time speculative against plain greedy decoding, batch 1, on --prompts (with --run)",
    )  # fmt: skip
    q.add_argument("--run", help="a run or HF directory to decode with (default: random weights)")
    q.add_argument("--prompts", help="JSONL of prompts for --speculative (benchmarks/prompts/grounded.jsonl)")
    q.add_argument("--draft-run", help="the draft model for --speculative draft")
    q.add_argument("--num-speculative-tokens", type=int, default=None)
    q.add_argument("--max-ngram", type=int, default=3)
    q.add_argument("--refill", action="store_true", help="time continuous refill against static batching")
    q.add_argument("--count", type=int, default=32, help="--refill: prompts")
    q.add_argument("--spread", type=int, default=10, help="--refill: longest / shortest requested length")
    q.set_defaults(handler=_cmd_generate)
    q = bench_sub.add_parser("train", help="train step tokens/s, ms/step, MFU, compile s, peak memory")
    add_config_args(q)
    q.add_argument("--steps", type=int, default=20, help="timed steps")
    q.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    q.set_defaults(handler=_cmd_train)
    for name in ("generate", "train"):
        bench_sub.choices[name].add_argument(
            "--profile",
            metavar="DIR",
            help="write a jax.profiler trace of the whole benchmark to DIR (TensorBoard's profile"
            " plugin or Perfetto; benchmarks/README.md)",
        )


def _print_lines(lines: Iterable[dict], profile: str | None = None) -> int:
    """Prints each line as JSON as its setting finishes (a long run shows progress), under a
    profiler trace written to `profile` when given (the lines are produced lazily, so the
    trace holds the benchmark's compiles and timed runs)."""
    from jaxgen.bench.profiling import trace

    with trace(profile) if profile else contextlib.nullcontext():
        for line in lines:
            print(json.dumps(line), flush=True)
    if profile:
        print(
            f"profile written to {profile} (tensorboard --logdir {profile}, or ui.perfetto.dev)",
            file=sys.stderr,
        )
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from jaxgen.bench import data

    return _print_lines(data.run(mb=args.mb, batches=args.batches, kind=args.kind, workdir=args.workdir))


def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxgen.bench import generate
    from jaxgen.config import load_config

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not pathlib.Path(path).exists():  # no config, only overrides
        path, overrides = None, [path, *overrides]
    if args.speculative or args.refill:
        return _print_lines(_offline_lines(args, path, overrides), args.profile)
    return _print_lines(
        generate.run(
            load_config(path, overrides), batches=tuple(args.batch or (1, 8)), prompt_len=args.prompt_len,
            new_tokens=args.new_tokens, num_beams=args.num_beams, baseline=not args.no_baseline,
            samplers=tuple(generate.parse_sample(spec) for spec in args.sample),
            weights=_weights(args),
        ),
        args.profile,
    )  # fmt: skip


def _weights(args: argparse.Namespace) -> tuple[str, ...]:
    """--weights as formats: "float32,int8" -> ("float32", "int8")."""
    return tuple(w for w in args.weights.split(",") if w)


def _offline_lines(args: argparse.Namespace, path, overrides):
    import jax

    import jaxgen
    from jaxgen.bench import offline
    from jaxgen.config import load_config
    from jaxgen.errors import JaxgenError
    from jaxgen.model.transformer import init_params

    if args.speculative:
        if not (args.run and args.prompts):
            raise JaxgenError("--speculative: give --run (a trained model) and --prompts (a JSONL file)")
        weights = _weights(args)
        if len(weights) > 1:
            raise JaxgenError(f"--weights: --speculative times one format (got {args.weights})")
        lm = jaxgen.load(args.run, weights=weights[0] if weights else None)
        yield from offline.speculative_lines(
            lm, offline.read_prompts(args.prompts), mode=args.speculative, new_tokens=args.new_tokens,
            num_tokens=args.num_speculative_tokens, max_ngram=args.max_ngram, draft_run=args.draft_run,
            rounds=args.rounds,
        )  # fmt: skip
    if args.refill:
        config = load_config(path, overrides)
        params = jax.jit(init_params, static_argnums=0)(config.model, jax.random.key(0))
        yield from offline.refill_lines(
            config, params, batch=(args.batch or [8])[0], count=args.count, prompt_len=args.prompt_len,
            new_tokens=args.new_tokens, spread=args.spread, rounds=args.rounds,
        )  # fmt: skip


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxgen.bench import train
    from jaxgen.config import load_config

    return _print_lines(
        train.run(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup),
        args.profile,
    )
