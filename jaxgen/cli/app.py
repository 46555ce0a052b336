"""The `jaxgen` command: parse arguments, call one library function, print errors as one line.

Heavy imports (JAX, orbax, TFDS) happen inside the handlers so `--help` stays instant.
Each subcommand has its own `_cmd_*` handler; the library functions they call are the
Python API (see README), so a notebook can do everything the CLI does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from jaxgen.cli import generate as cli_generate
from jaxgen.errors import JaxgenError

NOT_IMPLEMENTED = 2  # exit code for commands that later issues fill in


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (may `extends:` another)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")


def _not_implemented(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        print(f"jaxgen {name}: not implemented yet", file=sys.stderr)
        return NOT_IMPLEMENTED

    return handler


# ----------------------------------------------------------------------------- config


def _cmd_config_show(args: argparse.Namespace) -> int:
    from jaxgen.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


# ----------------------------------------------------------------------------- convert


def _cmd_convert_import(args: argparse.Namespace) -> int:
    from jaxgen.convert.hf import import_hf

    config = import_hf(args.hf_dir, args.out_run_dir, dtype=args.dtype)
    m = config.model
    shape = f"{m.num_layers} layers, d_model {m.d_model}, {m.param_dtype}"
    print(f"imported {m.family} ({shape}) -> {args.out_run_dir}")
    return 0


def _cmd_convert_export(args: argparse.Namespace) -> int:
    from jaxgen.convert.hf import export_hf

    if not args.max_shard_gb > 0:
        raise JaxgenError(f"--max-shard-gb: {args.max_shard_gb} must be > 0")
    max_bytes = int(args.max_shard_gb * 1e9)
    files = export_hf(args.run_dir, args.out_dir, max_shard_bytes=max_bytes, step=args.step)
    print(f"exported {len(files)} files -> {args.out_dir}")
    return 0


# ----------------------------------------------------------------------------- train


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
        f"final: step {result.step} val loss {figures.get('loss', float('nan')):.4f}{per_char}"
        f" in {result.wall_seconds:.1f} s wall ({result.run_dir})"
    )
    return 0


# ----------------------------------------------------------------------------- data


def _cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from jaxgen.config import load_config
    from jaxgen.data.prepare import ensure_tokenizer
    from jaxgen.tokenizer import load_tokenizer, model_vocab_size

    config = load_config(args.config, args.overrides)
    tok = load_tokenizer(ensure_tokenizer(config, print))
    multiple = config.tokenizer.vocab_multiple
    print(f"{tok.path}: {tok.vocab_size} pieces (model vocab {model_vocab_size(tok, multiple)})")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from jaxgen.config import load_config
    from jaxgen.data import prepare

    prepare(load_config(args.config, args.overrides))
    return 0


# ----------------------------------------------------------------------------- bench


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from jaxgen.bench.train import main as bench_train
    from jaxgen.config import load_config

    return bench_train(load_config(args.config, args.overrides), args.steps, args.warmup)


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from jaxgen.bench.data import run

    run(mb=args.mb, batches=args.batches, kind=args.kind, workdir=args.workdir)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxgen",
        description="Pretrain, fine-tune and sample transformer language models with JAX/Flax.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_text in (
        ("train", "pretrain a model from a config (resumes from the run directory)"),
        ("finetune", "fine-tune a model from a config (SFT, LoRA, control tokens)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
        p.set_defaults(handler=_cmd_train if name == "train" else _not_implemented(name))

    cli_generate.add_generate_parser(sub)
    cli_generate.add_eval_parser(sub)

    p = sub.add_parser("data", help="train tokenizers and prepare datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("tokenizer", "train (or load) the SentencePiece tokenizer of a config"),
        ("prepare", "tokenize the config's sources into a TFDS array_record dataset"),
    ):
        q = data_sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(q)
        q.set_defaults(handler=_cmd_data_tokenizer if name == "tokenizer" else _cmd_data_prepare)

    p = sub.add_parser("convert", help="import/export Hugging Face checkpoints")
    convert_sub = p.add_subparsers(dest="convert_command", required=True, metavar="ACTION")
    q = convert_sub.add_parser("import-hf", help="HF GPT-2/Llama directory -> jaxgen run directory")
    q.add_argument("hf_dir", help="directory with config.json and model.safetensors (or a sharded index)")
    q.add_argument("out_run_dir", help="run directory to create (must not exist or be empty)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    q.set_defaults(handler=_cmd_convert_import)
    q = convert_sub.add_parser("export-hf", help="jaxgen run directory -> HF directory (from_pretrained)")
    q.add_argument("run_dir", help="run directory (its latest checkpoint is exported)")
    q.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    q.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    q.add_argument("--max-shard-gb", type=float, default=5.0, help="shard files above this size")
    q.set_defaults(handler=_cmd_convert_export)

    p = sub.add_parser("plan", help="compile ahead of time for a pod topology and report memory")
    p.set_defaults(handler=_not_implemented("plan"))

    p = sub.add_parser("bench", help="benchmarks printing one JSON line per setting")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    q = bench_sub.add_parser("data", help="prepare MB/s and peak RSS; pipeline batches/s")
    q.add_argument("--mb", type=float, default=200.0, help="size of the synthetic corpus")
    q.add_argument("--batches", type=int, default=500, help="pipeline batches to time (16 x 1024)")
    q.add_argument("--kind", default="bpe", help="tokenizer kind(s), comma-separated: bpe,unigram,char")
    q.add_argument("--workdir", help="where the corpus and dataset go (default: a temp dir)")
    q.set_defaults(handler=_cmd_bench_data)
    cli_generate.add_bench_generate(bench_sub)
    q = bench_sub.add_parser("train", help="train step tokens/s, ms/step, MFU, compile s, peak memory")
    _add_config_args(q)
    q.add_argument("--steps", type=int, default=20, help="timed steps")
    q.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    q.set_defaults(handler=_cmd_bench_train)

    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = config_sub.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(q)
    q.set_defaults(handler=_cmd_config_show)
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
