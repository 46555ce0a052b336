"""Batches for the trainer: global `jax.Array`s sharded over the mesh's batch axes.

`train_batches` repeats (per `data.num_epochs`) in a seeded shuffle; `eval_batches`
covers a split exactly once. Both yield `{tokens, targets, positions, segment_ids,
loss_mask}`, each [batch, seq_len] (int32; loss_mask float32), and checkpoint their
position with `get_state()` / `set_state()` (a JSON-serialisable dict).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from jaxgen.data import pipeline
from jaxgen.data.pipeline import Shard
from jaxgen.data.prepare import dataset_dir, read_metadata
from jaxgen.data.workers import WorkerWatch
from jaxgen.errors import JaxgenError
from jaxgen.runtime.mesh import batch_sharding, data_parallel_size

_STATE_VERSION = 1


class Batches(Iterator):
    """An iterator of batches with a checkpointable position.

    With a mesh, batches are global jax.Arrays (this process loads only its rows);
    without one (`mesh=None`), this process's rows as numpy arrays.
    """

    def __init__(
        self, dataset, mesh, global_shape: tuple[int, int], what: str, watch: WorkerWatch | None = None
    ):
        self._dataset = dataset
        self._it = iter(dataset)
        self._watch = watch
        self._mesh = mesh
        self._shape = global_shape
        self._what = what
        self._sharding = None
        if mesh is not None:
            self._sharding = batch_sharding(mesh)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        local = next(self._it) if self._watch is None else self._watch.next(self._it)
        if self._sharding is None:
            return local

        return {
            k: jax.make_array_from_process_local_data(self._sharding, local[k], self._shape)
            for k in pipeline.FIELDS
        }

    def close(self) -> None:
        """Stops reader threads / worker processes now rather than at garbage collection."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        if self._watch is not None:
            self._watch.close()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_state(self) -> dict:
        """Where the iterator is: restoring it with `set_state` yields the same next batch."""
        return {"version": _STATE_VERSION, "what": self._what, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION or state.get("what") != self._what:
            raise JaxgenError(
                f"data state: saved for {state.get('what')!r} (version {state.get('version')}), "
                f"cannot resume {self._what!r}"
            )
        self._it.set_state(state["grain"])


def _shard(mesh, shape: tuple[int, int], process_index, process_count) -> Shard:
    """This process's block of rows: given explicitly, or read off the batch sharding."""
    if process_index is not None or process_count is not None:
        index, count = process_index or 0, process_count or 1
        if not 0 <= index < count:
            raise JaxgenError(f"data: process_index {index} is not in [0, {count})")
        return Shard(index, count)
    if mesh is None:
        return Shard(0, 1)

    slices = batch_sharding(mesh).addressable_devices_indices_map(shape).values()
    rows = sorted({(s[0].start or 0, s[0].stop or shape[0]) for s in slices})
    start, stop = rows[0][0], rows[-1][1]
    return Shard(start // (stop - start), shape[0] // (stop - start))


def _check(config, mesh, batch_size: int, key: str) -> None:
    if mesh is None:
        return

    n = data_parallel_size(mesh)
    if batch_size % n:
        raise JaxgenError(f"{key}: {batch_size} is not a multiple of the {n} batch shards of the mesh")


# Dataset kinds whose rows pack several texts (segment ids 1..n); the others' rows hold
# one text from slot 0, then padding.
_PACKED = {"sft": pipeline.sft_dataset, "preference": pipeline.preference_dataset}


def prefix_segments(config) -> bool:
    """Whether the prepared dataset's rows are one text each, then padding (segment ids
    1...1 0...0), as pretraining windows are: attention can then take sequence lengths
    instead of a segment mask (model/attention.py). False when no dataset is prepared."""
    meta = read_metadata(config)
    return meta is not None and meta["kind"] not in _PACKED


def _batches(config, mesh, split, shard, seed, train, shape, what) -> Batches:
    meta = read_metadata(config)
    if meta is None:
        raise JaxgenError(f"{dataset_dir(config)}: no prepared dataset (run `jaxgen data prepare`)")
    if split not in meta["splits"]:
        raise JaxgenError(f"{dataset_dir(config)}: no {split!r} split (has {sorted(meta['splits'])})")
    pipeline.check_batch(shape[0], shard, "train.batch_size" if train else "eval.batch_size")
    d = config.data
    read = pipeline.Read(d, shape[1], str(dataset_dir(config)), meta, split, shard, seed, train, shape[0])
    make = _PACKED.get(meta["kind"], pipeline.pretrain_dataset)
    watch = WorkerWatch(d.worker_count, d.worker_timeout, f"'{what}'") if d.worker_count else None
    return Batches(make(read, watch), mesh, shape, what, watch)


def train_batches(config, mesh, *, seed=None, process_index=None, process_count=None) -> Batches:
    """Training batches `[train.batch_size, train.seq_len]`, repeated per `data.num_epochs`.

    With a finite `num_epochs` the stream ends: pretraining drops the last partial global
    batch (fewer than batch_size windows); SFT and preference pad it (loss_mask 0) so no
    example (pair) is lost.

    Args:
        mesh: the device mesh (None: numpy batches of this process's rows).
        seed: shuffle seed (default `data.shuffle_seed`).
        process_index, process_count: override the process's share (default: from the mesh).
    """
    b, t = config.train.batch_size, config.train.seq_len
    _check(config, mesh, b, "train.batch_size")
    shard = _shard(mesh, (b, t), process_index, process_count)
    seed = config.data.shuffle_seed if seed is None else seed
    return _batches(config, mesh, "train", shard, seed, True, (b, t), f"train/seed={seed}/batch={b}/seq={t}")


def eval_batches(
    config,
    mesh,
    split: str = "validation",
    batch_size: int | None = None,
    *,
    process_index=None,
    process_count=None,
) -> Batches:
    """Every token of `split` exactly once, in order; the last batch padded (loss_mask 0).

    `batch_size` defaults to `eval.batch_size`.
    """
    b, t = batch_size or config.eval.batch_size, config.train.seq_len
    _check(config, mesh, b, "eval.batch_size")
    shard = _shard(mesh, (b, t), process_index, process_count)
    return _batches(config, mesh, split, shard, 0, False, (b, t), f"{split}/batch={b}/seq={t}")


def as_numpy(batch: dict) -> dict[str, np.ndarray]:
    """A batch's arrays on the host (for tests and tools)."""
    return {k: np.asarray(v) for k, v in batch.items()}
