"""`jaxgen finetune`: the training loop of `jaxgen train`, started from trained weights.

A fine-tuning run directory is a training run directory (config.yaml, tokenizer,
checkpoints, metrics.jsonl, events/) plus `finetune.json`, what the run was built from:

    {"init_from": "/abs/runs/base", "kind": "run" | "hf", "step": 500 | null,
     "source_vocab_size": 128, "first_new_id": 67, "added_tokens": ["<style=formal>"],
     "attributes": {"style": ["casual", "formal"]}, "control_template": "<{key}={value}>"}

`init_from` is read for a fresh run only; a run directory with checkpoints resumes from
them (a LoRA run re-reads its base through this record, since its checkpoints hold the
adapters and added rows alone). The model's shape comes from the source; only fields
that leave parameter shapes alone (`SHAPE_FREE`) may be changed. Control tokens the
source tokenizer lacks (`tokenizer.control_tokens`, and the data's attribute values) are
added to a copy of it in the run directory and grow the embedding (model/vocab.py).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax
from rich.console import Console

from jaxgen import checkpoint
from jaxgen.config import Config, MeshConfig, ModelConfig
from jaxgen.convert.hf import find_tokenizer, read_config, read_params
from jaxgen.data import attributes
from jaxgen.errors import JaxgenError
from jaxgen.model import lora as lora_lib
from jaxgen.model import vocab
from jaxgen.model.transformer import abstract_variables
from jaxgen.paths import RunPath, is_url, run_path, write_whole
from jaxgen.runtime.mesh import make_mesh, param_shardings
from jaxgen.tokenizer import add_tokens, load_tokenizer, model_vocab_size
from jaxgen.train.loop import TrainResult, barrier, begin, check_resume, prepare_data, run_training
from jaxgen.train.tuning import Tuning

FINETUNE_FILE = "finetune.json"
# Model fields a fine-tuning run may change: they leave every parameter's shape alone.
SHAPE_FREE = frozenset({"dropout", "remat", "dtype", "param_dtype", "attention_impl", "scan_layers"})
# ... and for rotary positions (llama), the context length: no parameter depends on it, so a
# run may fine-tune at a longer context than it was pretrained at (GPT-2 has a position table).
ROTARY_SHAPE_FREE = SHAPE_FREE | {"max_len"}
# Beside the tokenizer files that `checkpoint.copy_tokenizer` copies: HF generation defaults.
_SIDE_FILES = ("generation_config.json",)


# ----------------------------------------------------------------------------- the source


def parse_init_from(init_from: str | None) -> tuple[pathlib.Path, int | None]:
    """`DIR` or `DIR@STEP` -> (directory, step or None)."""
    if not init_from:
        raise JaxgenError(
            "finetune.init_from: not set (a jaxgen run directory, DIR@STEP, or a Hugging Face model dir)"
        )
    path, _, step = init_from.rpartition("@") if "@" in init_from else (init_from, "", "")
    if step and not step.isdigit():
        raise JaxgenError(f"finetune.init_from: {init_from!r}: the step after @ must be a number")
    return pathlib.Path(path).absolute(), int(step) if step else None


def source_kind(path: pathlib.Path) -> str:
    """ "run" (config.yaml) or "hf" (config.json); a one-line error for anything else."""
    if not path.is_dir():
        raise JaxgenError(f"finetune.init_from: {path} does not exist or is not a directory")
    if (path / checkpoint.CONFIG_FILE).is_file():
        return "run"
    if (path / "config.json").is_file():
        return "hf"
    raise JaxgenError(
        f"finetune.init_from: {path} is not a model (no config.yaml of a jaxgen run, no config.json"
        " of a Hugging Face model)"
    )


def source_model(record: dict) -> ModelConfig:
    path = pathlib.Path(record["init_from"])
    if record["kind"] == "hf":
        return read_config(path).model
    return checkpoint.read_run_config(path).model


def finetuned_model(source: ModelConfig, config: Config, vocab_size: int) -> ModelConfig:
    """The source's model with the config's shape-free fields; a one-line error naming
    the first field whose change would alter parameter shapes."""
    asked = config.model
    free = ROTARY_SHAPE_FREE if source.family == "llama" else SHAPE_FREE
    for key in sorted(asked.model_fields_set - free - {"preset", "vocab_size"}):
        if getattr(asked, key) != getattr(source, key):
            raise JaxgenError(
                f"model.{key}: {getattr(asked, key)!r} differs from the fine-tuned model's"
                f" {getattr(source, key)!r} and would change parameter shapes (only"
                f" {', '.join(sorted(free))} may be changed)"
            )
    changes = {key: getattr(asked, key) for key in asked.model_fields_set & free}
    return source.model_copy(update={**changes, "vocab_size": vocab_size, "preset": None})


def load_base(record: dict, model: ModelConfig, mesh):
    """The source's params on `mesh`, grown to `model.vocab_size` (new rows at the mean row)."""
    path = pathlib.Path(record["init_from"])
    source = source_model(record).model_copy(update={"param_dtype": model.param_dtype})
    if record["kind"] == "hf":
        params = read_params(path, source, mesh)
    else:
        _, params = checkpoint.load_params(path, step=record["step"], mesh=mesh, dtype=model.param_dtype)
    shardings = param_shardings(mesh, abstract_variables(model))["params"]
    first, count = record["first_new_id"], len(record["added_tokens"])
    grow = jax.jit(
        lambda p: vocab.grow(p, source, model.vocab_size, first, count),
        out_shardings=shardings,
        donate_argnums=0,
    )
    return grow(params)


def read_record(run_dir: RunPath) -> dict:
    path = run_dir / FINETUNE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise JaxgenError(f"{path}: cannot read the fine-tuning record ({e})") from None


def _write_record(run_dir: RunPath, record: dict) -> None:
    write_whole(run_dir / FINETUNE_FILE, json.dumps(record, indent=2) + "\n")


def trained_attributes(run_dir: str | RunPath) -> dict[str, list[str]] | None:
    """{attribute: values} a fine-tuned run's data carried; None for other runs."""
    path = run_path(run_dir) / FINETUNE_FILE
    return read_record(run_path(run_dir)).get("attributes") if path.is_file() else None


def tuning_of(config: Config, record: dict) -> Tuning:
    new_rows = (record["first_new_id"], len(record["added_tokens"]))
    return Tuning.from_config(config.finetune, new_rows, config.data.format)


# ----------------------------------------------------------------------------- a fresh run


def _has_checkpoints(run_dir: RunPath) -> bool:
    ckpt = checkpoint.checkpoint_dir(run_dir)
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def _start(config: Config, run_dir: RunPath) -> dict:
    """Sets up a fresh run directory: the grown tokenizer and the record. Returns the record."""
    path, step = parse_init_from(config.finetune.init_from)
    kind = source_kind(path)
    tokenizer = find_tokenizer(path)
    if tokenizer is None:
        raise JaxgenError(
            f"finetune.init_from: {path} has no tokenizer (tokenizer.model, tokenizer.json or vocab.json)"
        )
    if kind == "run":
        mngr = checkpoint.manager(path, read_only=True)
        steps = mngr.all_steps()
        mngr.close()
        if not steps:
            raise JaxgenError(f"finetune.init_from: {path} has no checkpoint to start from")
        if step is not None and step not in steps:
            raise JaxgenError(f"finetune.init_from: {path} has no checkpoint {step} (has {steps})")
        step = max(steps) if step is None else step
    source = source_model({"init_from": str(path), "kind": kind})
    found = attributes.collect(config)
    tokens = [
        *config.tokenizer.control_tokens,
        *attributes.control_tokens(found, config.generate.control_template),
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    # Beside the run on disk; a run in a bucket gets a local scratch directory.
    with tempfile.TemporaryDirectory(dir=None if is_url(run_dir) else run_dir) as tmp:
        added = add_tokens(tokenizer, tokens, tmp)
        checkpoint.copy_tokenizer(tmp, run_dir)
        for name in _SIDE_FILES:
            if (pathlib.Path(tmp) / name).is_file():
                (run_dir / name).write_bytes((pathlib.Path(tmp) / name).read_bytes())
    record = {
        "init_from": str(path),
        "kind": kind,
        "step": step,
        "source_vocab_size": source.vocab_size,
        "first_new_id": tokenizer.vocab_size,
        "added_tokens": added,
        "attributes": found,
        "control_template": config.generate.control_template,
    }
    _write_record(run_dir, record)
    return record


def _vocab_size(record: dict, tokenizer, multiple: int) -> int:
    """The source's vocab when the tokenizer still fits it, else rounded up to `multiple`."""
    if tokenizer.vocab_size <= record["source_vocab_size"]:
        return record["source_vocab_size"]
    return model_vocab_size(tokenizer, multiple)


def resolve(config: Config, run_dir: RunPath, *, start: bool = True) -> tuple[Config, dict]:
    """The run's config (model from the source, tokenizer from the run dir) and its record.

    `start`: set up a fresh run directory when it has no checkpoint yet (process 0 does;
    the other processes of a job only read what it wrote).
    """
    if start and not (_has_checkpoints(run_dir) and (run_dir / FINETUNE_FILE).is_file()):
        record = _start(config, run_dir)
    else:
        record = read_record(run_dir)
    tokenizer = load_tokenizer(checkpoint.local_tokenizer(run_dir))
    model = finetuned_model(
        source_model(record), config, _vocab_size(record, tokenizer, config.tokenizer.vocab_multiple)
    )
    if config.finetune.method == "lora":
        lora_lib.check(model, config.finetune.lora)
    at = "" if record["step"] is None else f"@{record['step']}"
    resolved = config.model_copy(
        update={
            "model": model,
            "tokenizer": config.tokenizer.model_copy(update={"path": str(tokenizer.path)}),
            "finetune": config.finetune.model_copy(update={"init_from": record["init_from"] + at}),
        }
    )
    return resolved, record


def finetune(
    config: Config,
    run_dir: str | RunPath | None = None,
    *,
    console: Console | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tunes `config` in `run_dir` (default `runs/<config.name>`), resuming if possible;
    `overwrite` starts over instead."""
    started = time.perf_counter()
    leader = jax.process_index() == 0
    console, run_dir = begin(config, run_dir, console, overwrite)
    if leader:
        config, record = resolve(config, run_dir)
        tuning = tuning_of(config, record)  # bad patterns fail before data preparation
    barrier("jaxgen-finetune-start")
    if not leader:
        config, record = resolve(config, run_dir, start=False)
        tuning = tuning_of(config, record)
    prepare_data(config)
    check_resume(run_dir, config)
    if leader:
        checkpoint.write_run_config(run_dir, config)
    barrier("jaxgen-run-dir")
    added = f", {len(record['added_tokens'])} tokens added" if record["added_tokens"] else ""
    console.print(f"fine-tuning from {config.finetune.init_from} ({config.finetune.method}{added})")
    return run_training(
        config,
        run_dir,
        console,
        started,
        tuning=tuning,
        load_base=lambda: load_base(record, config.model, make_mesh(config.mesh)),
        title="fine-tuning",
    )


# ----------------------------------------------------------------------------- reading runs back


def load_adapters(run_dir: str | pathlib.Path, *, step: int | None = None, mesh=None):
    """(Config, record, trainable tree) of a LoRA run: {"lora": adapters, "rows"?: added rows}."""
    run_dir = pathlib.Path(run_dir)
    config = checkpoint.read_run_config(run_dir)
    if config.finetune.method != "lora":
        raise JaxgenError(f"{run_dir}: not a LoRA run (finetune.method is {config.finetune.method})")
    mesh = mesh or make_mesh(MeshConfig())
    record = read_record(run_dir)
    tuning = tuning_of(config, record)
    shardings = tuning.trainable_shardings(mesh, config.model)
    mngr = checkpoint.manager(run_dir, read_only=True)
    step = checkpoint.pick_step(mngr, run_dir, step)
    restored = checkpoint.restore(
        mngr, step, {"params": (tuning.abstract_trainable(config.model), shardings)}
    )
    mngr.close()
    return config, record, restored["params"]


def load_run_params(
    run_dir: str | pathlib.Path, *, step: int | None = None, mesh=None, dtype: str | None = None
):
    """(Config, plain model params) of any run directory: a LoRA run's adapters and added
    rows are folded into its base; other runs read their params as they are."""
    run_dir = pathlib.Path(run_dir)
    config = checkpoint.read_run_config(run_dir)
    if config.finetune.method != "lora":
        return checkpoint.load_params(run_dir, step=step, mesh=mesh, dtype=dtype)
    mesh = mesh or make_mesh(MeshConfig())
    config, record, trainable = load_adapters(run_dir, step=step, mesh=mesh)
    base = load_base(record, config.model, mesh)
    tuning = tuning_of(config, record)
    params = jax.jit(lambda t, b: tuning.model_params(t, b, config.model))(trainable, base)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return config, params


def merge_run(
    run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *, step: int | None = None
) -> pathlib.Path:
    """`jaxgen finetune merge`: a LoRA run's adapters folded into a normal run directory."""
    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise JaxgenError(f"{out_dir}: exists and is not empty (choose a new output directory)")
    config, params = load_run_params(run_dir, step=step)
    merged = config.model_copy(update={"finetune": config.finetune.model_copy(update={"method": "full"})})
    checkpoint.save_params(out_dir, merged, params, tokenizer_path=run_dir)
    for name in (FINETUNE_FILE, *_SIDE_FILES):
        if (run_dir / name).is_file():
            (out_dir / name).write_bytes((run_dir / name).read_bytes())
    return out_dir
