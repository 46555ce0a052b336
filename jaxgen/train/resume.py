"""Resuming a run: the newest intact checkpoint, never a silent fresh start.

A checkpoint may be damaged (an array file truncated by a full disk or a crash, a missing
item, a step directory whose save never reached its commit marker) or belong to another
model (copied in from elsewhere). Resuming tries the checkpoints newest first:

- a damaged one is reported with what is wrong and the next older one is tried; once an
  intact one is found, the damaged newer ones are moved to `damaged/<step>` (kept for a
  look, out of orbax's sight: it would otherwise count them as the latest steps);
- one whose parameters have other shapes stops the run with a line naming the first
  parameter that differs: that is another model, not damage to fall back from;
- when a run has checkpoints but none is intact, or has metrics but no checkpoint at all,
  the run stops: starting it from scratch over what is there takes `--overwrite`.

After resuming from step S, metrics.jsonl keeps only records of steps <= S: the steps
after it run again and log again, so no step is listed twice. (On an object store the file
is one object, rewritten whole: jaxgen/metrics.py.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from jaxgen import checkpoint
from jaxgen.errors import JaxgenError
from jaxgen.paths import RunPath, is_url, move, remove

METRICS_FILE = "metrics.jsonl"


def clear(run_dir: RunPath) -> None:
    """`--overwrite`: removes what an earlier run left (checkpoints, metrics, config); the
    directory and anything else in it stay."""
    for name in (*checkpoint.RUN_ENTRIES, *checkpoint.TOKENIZER_FILES):
        remove(run_dir / name)


def check_fresh_start(run_dir: RunPath) -> None:
    """Refuses to start from step 0 in a directory whose metrics show an earlier run."""
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and _size(metrics) > 0:
        raise JaxgenError(
            f"{run_dir}: has {METRICS_FILE} from an earlier run but no checkpoint to resume from;"
            " pass --overwrite to start the run over"
        )


def _size(path: RunPath) -> int:
    return path.stat().length if is_url(path) else path.stat().st_size  # epath's stat names it so


def _shape_mismatch(step_dir: RunPath, expected: dict[str, tuple[int, ...]]) -> str | None:
    """The first parameter whose stored shape differs from this model's, as a message."""
    stored = checkpoint.stored_shapes(step_dir, "params")
    for path in sorted(expected.keys() | stored.keys()):
        there, here = stored.get(path), expected.get(path)
        if there != here:
            there_text = "absent" if there is None else f"shape {there}"
            here_text = "absent" if here is None else f"shape {here}"
            return f"params{path} is {there_text} there, {here_text} in this model"
    return None


def _problem(step_dir: RunPath, items: tuple[str, ...], expected: dict) -> str | None:
    """Why the checkpoint in `step_dir` cannot be resumed from (None: it looks whole).

    Raises:
        JaxgenError: the checkpoint is whole but its parameters have other shapes.
    """
    reason = checkpoint.uncommitted(step_dir)
    if reason:
        return reason
    missing = [item for item in items if not (step_dir / item).is_dir()]
    if missing:
        return f"item {missing[0]!r} is missing"
    try:
        mismatch = _shape_mismatch(step_dir, expected)
    except Exception as e:  # unreadable metadata: orbax raises several types
        return f"params metadata unreadable ({(str(e).splitlines() or [type(e).__name__])[0][:160]})"
    if mismatch:
        raise JaxgenError(
            f"{step_dir}: checkpoint is for another model ({mismatch}); use another --run-dir or --overwrite"
        )
    return None


def newest_intact(
    run_dir: RunPath,
    restore: Callable[[int], dict[str, Any]],
    items: tuple[str, ...],
    expected: dict[str, tuple[int, ...]],
    warn: Callable[[str], None],
) -> tuple[int, dict[str, Any], list[int]] | None:
    """Restores the newest intact checkpoint of `run_dir`.

    Args:
        restore: reads step N's items (raises CheckpointDamaged when its data is unreadable).
        items: the items a checkpoint must hold; expected: {params path: shape} of this model.
        warn: prints one line per damaged checkpoint passed over.
    Returns:
        (step, restored items, the damaged newer steps passed over: see `move_aside`), or
        None when the run has no checkpoint at all.
    Raises:
        JaxgenError: no intact checkpoint among existing ones, or one of another model.
    """
    dirs = checkpoint.step_dirs(run_dir)
    damaged: list[tuple[int, str]] = []
    for step in sorted(dirs, reverse=True):
        reason = _problem(dirs[step], items, expected)
        if reason is None:
            try:
                restored = restore(step)
            except checkpoint.CheckpointDamaged as e:
                reason = str(e).split(": checkpoint is damaged ", 1)[-1].strip("()")
            else:
                return step, restored, [bad for bad, _ in damaged]
        warn(f"warning: {dirs[step]}: checkpoint is damaged ({reason}); trying an older one")
        damaged.append((step, reason))
    if not damaged:
        return None
    listed = "; ".join(f"{step}: {reason}" for step, reason in damaged)
    raise JaxgenError(
        f"{checkpoint.checkpoint_dir(run_dir)}: no intact checkpoint ({listed}); pass --overwrite"
        " to start the run over"
    )


def move_aside(run_dir: RunPath, steps: list[int]) -> None:
    """Moves damaged step directories to `damaged/<step>`, out of orbax's sight."""
    for step in steps:
        target = run_dir / "damaged" / str(step)
        target.parent.mkdir(exist_ok=True)
        remove(target)
        move(checkpoint.checkpoint_dir(run_dir) / str(step), target)


def trim_metrics(run_dir: RunPath, step: int) -> None:
    """Keeps the metrics records of steps <= `step`.

    Rewritten in place (not replaced by a new file): the run's MetricsWriter already holds
    the file open for appending, and appends land at the end of the truncated file. An
    object is rewritten whole; the writer reads it back only at its first record.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    if is_url(path):
        lines = path.read_bytes().splitlines(keepends=True)
        kept = _kept(lines, step)
        if kept != lines:
            path.write_bytes(b"".join(kept))
        return
    with open(path, "r+b") as f:
        lines = f.read().splitlines(keepends=True)
        kept = _kept(lines, step)
        if kept == lines:
            return
        f.seek(0)
        f.write(b"".join(kept))
        f.truncate()


def _kept(lines: list[bytes], step: int) -> list[bytes]:
    """The records of steps <= `step`, each ending in a newline."""
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    return [line if line.endswith(b"\n") else line + b"\n" for line in kept]


def _step_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut by a crash mid-write
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None
