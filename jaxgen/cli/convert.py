"""`jaxgen convert import-hf|export-hf|export-peft`: Hugging Face checkpoints to and from run
directories, and a LoRA run's adapters as a PEFT adapter."""

from __future__ import annotations

import argparse

from jaxgen.errors import JaxgenError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="import/export Hugging Face checkpoints and PEFT adapters")
    convert_sub = p.add_subparsers(dest="convert_command", required=True, metavar="ACTION")
    q = convert_sub.add_parser("import-hf", help="HF GPT-2/Llama directory -> jaxgen run directory")
    q.add_argument("hf_dir", help="directory with config.json and model.safetensors (or a sharded index)")
    q.add_argument("out_run_dir", help="run directory to create (must not exist or be empty)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    q.set_defaults(handler=_cmd_import)
    q = convert_sub.add_parser("export-hf", help="jaxgen run directory -> HF directory (from_pretrained)")
    q.add_argument("run_dir", help="run directory (its latest checkpoint is exported)")
    q.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    q.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    q.add_argument("--max-shard-gb", type=float, default=5.0, help="shard files above this size")
    q.set_defaults(handler=_cmd_export)
    q = convert_sub.add_parser("export-peft", help="LoRA run over an HF base -> PEFT LoRA adapter directory")
    q.add_argument("run_dir", help="LoRA fine-tuning run whose finetune.init_from is an HF model directory")
    q.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    q.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    q.set_defaults(handler=_cmd_export_peft)


def _cmd_import(args: argparse.Namespace) -> int:
    from jaxgen.convert.hf import import_hf

    config = import_hf(args.hf_dir, args.out_run_dir, dtype=args.dtype)
    m = config.model
    shape = f"{m.num_layers} layers, d_model {m.d_model}, {m.param_dtype}"
    print(f"imported {m.family} ({shape}) -> {args.out_run_dir}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from jaxgen.convert.hf import export_hf
    from jaxgen.train.finetune import load_run_params

    if not args.max_shard_gb > 0:
        raise JaxgenError(f"--max-shard-gb: {args.max_shard_gb} must be > 0")
    max_bytes = int(args.max_shard_gb * 1e9)
    files = export_hf(
        args.run_dir, args.out_dir, max_shard_bytes=max_bytes, step=args.step, load=load_run_params
    )
    print(f"exported {len(files)} files -> {args.out_dir}")
    return 0


def _cmd_export_peft(args: argparse.Namespace) -> int:
    from jaxgen.convert.peft import export_peft
    from jaxgen.train.finetune import load_adapters

    files = export_peft(args.run_dir, args.out_dir, step=args.step, load=load_adapters)
    print(f"exported PEFT adapter ({', '.join(files)}) -> {args.out_dir}")
    return 0
