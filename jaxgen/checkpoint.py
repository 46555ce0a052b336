"""Run directories and orbax checkpoints.

A run directory holds everything needed to resume, evaluate or generate:

    runs/<name>/
      config.yaml          the resolved config (model.vocab_size already from the tokenizer)
      tokenizer.model      (or tokenizer.json / vocab.json + merges.txt for HF imports)
      metrics.jsonl        one JSON object per logged step / evaluation
      events/              TensorBoard event files
      checkpoints/<step>/  orbax items: params, opt (optimizer state, step, rng),
                           data (input iterator state, JSON), meta (JSON)

Params are their own item so generation and evaluation restore them alone, and an
imported model (params only) is a valid run directory to fine-tune from.

A run directory may also be a URL (`gs://bucket/run`, jaxgen/paths.py): the same layout, as
objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxgen.config import Config, MeshConfig, load_config, to_yaml
from jaxgen.errors import JaxgenError
from jaxgen.model.transformer import abstract_params, abstract_variables
from jaxgen.paths import RunPath, is_url, run_path, write_whole
from jaxgen.runtime.mesh import make_mesh, param_shardings

CONFIG_FILE = "config.yaml"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",  # special tokens, chat template
    "special_tokens_map.json",
    "chat_template.jinja",
)


# What a run directory holds besides the tokenizer: `--overwrite` removes exactly these.
RUN_ENTRIES = (CONFIG_FILE, "checkpoints", "metrics.jsonl", "events", "damaged", "finetune.json")
# orbax writes this file into a step directory as the last act of a save.
COMMIT_MARKER = "commit_success.txt"


class CheckpointDamaged(JaxgenError):
    """A checkpoint that cannot be read back (resuming falls back to an older one)."""


def checkpoint_dir(run_dir: str | RunPath) -> RunPath:
    run_dir = run_path(run_dir)
    return (run_dir if is_url(run_dir) else run_dir.absolute()) / "checkpoints"


def check_links(run_dir: str | pathlib.Path) -> None:
    """Refuses a run directory holding a symlink that leads outside it.

    Training appends to metrics.jsonl, copies the tokenizer over tokenizer.model and lets
    orbax delete old checkpoints; through such a link each would write or delete files
    elsewhere on the machine. (The run directory itself may be a link.) An object store
    has no links.
    """
    if is_url(run_dir):
        return
    root = pathlib.Path(run_dir).resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # links are listed, never entered
        for name in (*dirnames, *filenames):
            path = pathlib.Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise JaxgenError(
                    f"{path}: a symlink to {path.resolve()}, outside the run directory; jaxgen reads"
                    " and writes only inside it"
                )


def write_run_config(run_dir: str | RunPath, config: Config) -> None:
    """Writes config.yaml atomically (temp file + rename, or one object write)."""
    run_dir = run_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_links(run_dir)
        write_whole(run_dir / CONFIG_FILE, to_yaml(config))
    except OSError as e:
        raise JaxgenError(f"{run_dir}: cannot write the run directory ({e.strerror or e})") from None


def read_run_config(run_dir: str | RunPath) -> Config:
    path = run_path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise JaxgenError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    check_links(run_dir)
    if is_url(path):  # the YAML loader reads local files; the text is the same
        with tempfile.TemporaryDirectory() as tmp:
            local = pathlib.Path(tmp) / CONFIG_FILE
            local.write_text(path.read_text())
            return load_config(local)
    return load_config(path)


def step_dirs(run_dir: str | RunPath) -> dict[int, RunPath]:
    """{step: directory} of every step directory, committed or not (orbax lists both)."""
    ckpt = checkpoint_dir(run_dir)
    found = ckpt.iterdir() if ckpt.is_dir() else ()
    return {int(p.name): p for p in found if p.name.isdigit() and p.is_dir()}


def uncommitted(step_dir: RunPath) -> str | None:
    """Why `step_dir` is not a finished save, or None when it is."""
    if (step_dir / COMMIT_MARKER).is_file():
        return None
    try:  # checkpoints of orbax versions before the marker record their commit time instead
        meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and meta.get("commit_timestamp_nsecs"):
        return None
    return f"no commit marker ({COMMIT_MARKER}): its save never finished"


def stored_shapes(step_dir: RunPath, item: str) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of an array item, read from its metadata (no array data)."""
    tree = ocp.StandardCheckpointHandler().metadata(step_dir / item).tree
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def copy_tokenizer(source: str | pathlib.Path, run_dir: str | RunPath) -> None:
    """Copies a tokenizer file, or the tokenizer files of a directory, into the run."""
    source, run_dir = pathlib.Path(source), run_path(run_dir)
    files = [source] if source.is_file() else [source / n for n in TOKENIZER_FILES if (source / n).exists()]
    for file in files:
        target = run_dir / ("tokenizer.model" if file.suffix == ".model" else file.name)
        if is_url(target):
            target.write_bytes(file.read_bytes())
        elif file.resolve() != target.resolve():
            shutil.copyfile(file, target)


def local_tokenizer(run_dir: str | RunPath) -> pathlib.Path:
    """A local directory holding the run's tokenizer files: the run directory itself, or,
    for a run on an object store, a copy in a temporary directory kept for this process
    (the tokenizer libraries read local files)."""
    run_dir = run_path(run_dir)
    if not is_url(run_dir):
        return run_dir
    key = str(run_dir)
    if key not in _TOKENIZER_COPIES:
        _TOKENIZER_COPIES[key] = tempfile.TemporaryDirectory(prefix="jaxgen-tokenizer-")
        for name in TOKENIZER_FILES:
            if (run_dir / name).is_file():
                (pathlib.Path(_TOKENIZER_COPIES[key].name) / name).write_bytes((run_dir / name).read_bytes())
    return pathlib.Path(_TOKENIZER_COPIES[key].name)


# {run URL: its tokenizer's local copy}, removed when the process exits.
_TOKENIZER_COPIES: dict[str, tempfile.TemporaryDirectory] = {}


def manager(run_dir: str | RunPath, config: Config | None = None, *, read_only: bool = False):
    """An orbax CheckpointManager over `run_dir/checkpoints` (async saves, keep policy)."""
    ckpt = config.checkpoint if config is not None else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt.keep if ckpt else None,
        keep_period=ckpt.keep_every if ckpt else None,
        enable_async_checkpointing=ckpt.async_save if ckpt else False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any], *, force: bool = False) -> bool:
    """Saves `items` (pytrees for params/opt, JSON-able dicts for data/meta)."""
    args = {
        name: ocp.args.JsonSave(value) if name in ("data", "meta") else ocp.args.StandardSave(value)
        for name, value in items.items()
    }
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


@contextlib.contextmanager
def writing(run_dir: str | RunPath) -> Iterator[None]:
    """Turns a failed checkpoint write (a full disk, a lost permission) into one line naming
    the newest checkpoint left intact: orbax writes into a temporary directory and renames
    it only once whole, so the steps before stay as they were."""
    try:
        yield
    except OSError as e:
        intact = [s for s, d in step_dirs(run_dir).items() if uncommitted(d) is None]
        left = (
            f"checkpoint {max(intact)} is intact and the run resumes from it"
            if intact
            else "no checkpoint yet"
        )
        raise JaxgenError(
            f"{checkpoint_dir(run_dir)}: cannot write a checkpoint ({e.strerror or e}); {left}"
        ) from None


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, targets: dict[str, Any]) -> dict[str, Any]:
    """Restores the named items. Array items take `(abstract_tree, shardings)`; orbax
    reshards onto the target shardings, so a run may resume on a different mesh."""
    args = {}
    for name, target in targets.items():
        if name in ("data", "meta"):
            args[name] = ocp.args.JsonRestore()
        else:
            args[name] = ocp.args.StandardRestore(_abstract(*target))
    where = f"{checkpoint_dir(mngr.directory.parent)}/{step}"
    try:
        with _unraisable_kept():
            return dict(mngr.restore(step, args=ocp.args.Composite(**args)).items())
    except Exception as e:  # TensorStore reports unreadable data as a plain Exception
        text = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if isinstance(e, (ValueError, KeyError)) and any(m in text for m in _MISMATCH):
            raise JaxgenError(f"{where}: checkpoint does not match the model ({text})") from None
        raise CheckpointDamaged(f"{where}: checkpoint is damaged ({text})") from None


# What orbax says when a checkpoint is whole but of another model (vs. unreadable data).
_MISMATCH = ("not compatible with the stored shape", "pytree structure", "Requested shape")


@contextlib.contextmanager
def _unraisable_kept() -> Iterator[list]:
    """Collects the "Exception ignored in coroutine" reports of a failed restore (orbax's
    reads left pending when one fails) instead of printing them: the error raised says it."""
    kept: list = []
    previous, sys.unraisablehook = sys.unraisablehook, kept.append
    try:
        yield kept
    finally:
        sys.unraisablehook = previous


def save_params(
    run_dir: str | RunPath,
    config: Config,
    params,
    *,
    step: int = 0,
    tokenizer_path: str | pathlib.Path | None = None,
) -> RunPath:
    """Writes a complete run directory holding only params (e.g. an imported model)."""
    run_dir = run_path(run_dir)
    write_run_config(run_dir, config)
    if tokenizer_path is not None:
        copy_tokenizer(tokenizer_path, run_dir)
    mngr = manager(run_dir)
    save(mngr, step, {"params": params, "meta": {"step": step}}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return run_dir


def pick_step(mngr: ocp.CheckpointManager, run_dir, step: int | None) -> int:
    """`step`, or the latest one; a JaxgenError listing the steps when there is no such one."""
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        available = ", ".join(map(str, mngr.all_steps())) or "none"
        raise JaxgenError(f"{checkpoint_dir(run_dir)}: no checkpoint {step} (available: {available})")
    return step


def load_params(
    run_dir: str | RunPath,
    *,
    step: int | None = None,
    mesh=None,
    dtype: str | None = None,
) -> tuple[Config, Any]:
    """Reads a run's config and the params of checkpoint `step` (default: the latest).

    Params are placed with the model's shardings on `mesh` (default: all devices) and
    cast to `dtype` when given (e.g. "bfloat16" for serving).
    """

    config = read_run_config(run_dir)
    mesh = mesh or make_mesh(MeshConfig())
    mngr = manager(run_dir, read_only=True)
    step = pick_step(mngr, run_dir, step)
    abstract = abstract_variables(config.model)
    shardings = param_shardings(mesh, abstract)["params"]
    shapes = abstract_params(config.model)
    params = restore(mngr, step, {"params": (shapes, shardings)})["params"]
    mngr.close()
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    return config, params
