"""The input pipeline: grain over the prepared TFDS array_record splits.

Pretraining: the split is one token stream; window w is tokens [w*T, w*T + T + 1) and
gives `tokens = window[:-1]`, `targets = window[1:]`. Positions are `arange(T)` and
segment ids all 1 — documents are separated by eos and attend across it, as in GPT-2
and nanoGPT (no per-document reset). Training draws windows in a seeded global
shuffle (a fresh permutation each epoch); evaluation walks every window once in order
(the last one padded), so each token of the split is a target exactly once.

SFT: examples are first-fit packed into rows of T; segment ids 1..n per example
(0 = padding), positions restart per example, loss_mask is 1 only on response targets.

Preference (DPO): whole pairs are first-fit packed into rows of T, so a pair's two
sequences always share a row; then each sequence is a segment of its own. In a row
holding n pairs, for k = 1..n:

    segment_ids  2k - 1 on the k-th pair's chosen sequence, 2k on its rejected one, which
                 follows it directly; 0 = padding (after the last pair)
    positions    0, 1, ... restarting at the start of each sequence
    tokens       seq[:-1] of each sequence (bos first), targets seq[1:] (eos last): no
                 target crosses from one sequence into the next
    loss_mask    1 only on completion targets (completion tokens and eos), 0 on prompt
                 targets and padding

Same-segment causal attention (the model's mask) keeps the two sequences apart, so one
forward pass scores both; the loss pairs odd segment 2k - 1 with even segment 2k of the
same row. A pair takes Lc - 1 + Lr - 1 <= T columns (data/preference.py).

Global batch k is the same whatever the number of processes: process p of P takes rows
[p*B/P, (p+1)*B/P) of it. So the iterator state (grain's, JSON) is just "where in the
stream", and restoring it gives exactly the next batch of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import grain
import numpy as np
from absl import flags

from jaxgen.config import DataConfig
from jaxgen.data import builder
from jaxgen.data.workers import WorkerWatch
from jaxgen.errors import JaxgenError

# The batch fields, in this order wherever a batch is laid out: [B, T] each (loss_mask float32).
FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which rows of each global batch this process loads: [index*rows, (index+1)*rows)."""

    index: int
    count: int

    def rows(self, batch_size: int) -> int:
        return batch_size // self.count


def window_batch(windows: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """The batch (FIELDS) of token windows [B, T+1]: each token predicts the next one.

    `valid` [B, T+1] marks real tokens (False: padding, which neither attends nor counts).
    """
    b, t = windows.shape[0], windows.shape[1] - 1
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    segment_ids, loss_mask = valid[:, :-1].astype(np.int32), valid[:, 1:].astype(np.float32)
    return dict(
        zip(FIELDS, (windows[:, :-1], windows[:, 1:], positions, segment_ids, loss_mask), strict=True)
    )


class WindowReader:
    """Turns an array of window ids into a batch dict; id -1 is a padding row.

    Picklable, so grain worker processes can run it: the split is reopened as the reader
    is unpickled, on the worker's main thread.
    """

    def __init__(self, directory: str, split: str, seq_len: int, num_tokens: int):
        self._dir, self._split = directory, split
        self._t, self._n = seq_len, num_tokens
        # Open (and so import TFDS) here, on the caller's thread: TFDS swaps `__import__`
        # for a lazy importer while it loads, and a first import from a grain reader
        # thread deadlocked against another thread's import (rich's progress refresh).
        self._source = builder.open_split(self._dir, self._split)

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __setstate__(self, state):
        # Not lazily on first use: in a worker process the first use comes from grain's read
        # threads at once, and two threads importing TFDS deadlocked (one holds an import
        # lock and waits for etils' lazy-module lock, the other the reverse); see
        # tests/test_data_workers.py.
        self.__dict__.update(state)
        self._source = builder.open_split(self._dir, self._split)

    def _chunks(self, first: int, last: int) -> np.ndarray:
        return np.concatenate([self._source[c]["tokens"] for c in range(first, last + 1)])

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        t, c = self._t, builder.CHUNK_TOKENS
        b = len(ids)
        tokens = np.zeros((b, t + 1), np.int32)  # [B, T+1] window incl. the last target
        valid = np.zeros((b, t + 1), bool)
        for row, w in enumerate(ids):
            if w < 0:
                continue
            start, end = int(w) * t, min(int(w) * t + t + 1, self._n)
            chunk = self._chunks(start // c, (end - 1) // c)
            offset = start // c * c
            tokens[row, : end - start] = chunk[start - offset : end - offset]
            valid[row, : end - start] = True
        return window_batch(tokens, valid)


@dataclasses.dataclass(frozen=True)
class Read:
    """What one loader reads: its data section, the sequence length, and which rows of which split."""

    data: DataConfig
    seq_len: int
    directory: str  # the prepared dataset (TFDS builder directory)
    meta: dict  # its jaxgen metadata (kind, splits and their token counts)
    split: str
    shard: Shard
    seed: int
    train: bool
    batch_size: int  # global rows per batch


def check_batch(batch_size: int, shard: Shard, key: str) -> None:
    if batch_size % shard.count:
        raise JaxgenError(f"{key}: {batch_size} rows do not split evenly over {shard.count} processes")


def _finish(data: DataConfig, ds: grain.MapDataset, watch: WorkerWatch | None) -> grain.IterDataset:
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch)
    )
    if watch is not None:
        # grain's worker processes read absl flags; jaxgen has none, so defaults are parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=watch.count)
        it = it.mp_prefetch(options, worker_init_fn=watch.init_fn())
    return it


def pretrain_dataset(read: Read, watch: WorkerWatch | None = None) -> grain.IterDataset:
    """grain IterDataset of this process's rows of each global batch (numpy dicts).

    `watch`: runs the reads in `watch.count` worker processes it supervises (None: threads).
    """
    split, shard, t, batch_size = read.split, read.shard, read.seq_len, read.batch_size
    n = read.meta["splits"][split]["tokens"]
    reader = WindowReader(read.directory, split, t, n)
    rows = shard.rows(batch_size)
    if read.train:
        windows = (n - 1) // t
        if windows < 1:
            raise JaxgenError(
                f"data: the {split} split has {n} tokens, fewer than train.seq_len + 1 = {t + 1}"
            )
        ids = grain.MapDataset.range(windows).shuffle(seed=read.seed).repeat(read.data.num_epochs)
        ids = ids.batch(rows, drop_remainder=True)
        if read.data.num_epochs is not None:  # only whole global batches
            ids = ids[: len(ids) // shard.count * shard.count]
    else:
        windows = math.ceil((n - 1) / t)
        total = math.ceil(windows / batch_size) * batch_size
        ids = grain.MapDataset.range(total).map(functools.partial(_or_padding, windows)).batch(rows)
    return _finish(read.data, ids[shard.index :: shard.count].map(reader), watch)


def _or_padding(limit: int, i: int) -> int:
    return i if i < limit else -1


# ----------------------------------------------------------------------------- SFT


def _sft_example(record: dict) -> dict[str, np.ndarray]:
    tokens, mask = record["tokens"], record["loss_mask"]
    return {"tokens": tokens[:-1], "targets": tokens[1:], "loss_mask": mask[1:].astype(np.float32)}


def _sft_rows(shard: Shard, batch_size: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a packed global batch (padded to batch_size rows) in FIELDS names."""
    rows = shard.rows(batch_size)
    segment_ids = batch["tokens_segment_ids"]
    values = (batch["tokens"], batch["targets"], batch["tokens_positions"], segment_ids,
              batch["loss_mask"] * (segment_ids > 0))  # fmt: skip
    out = dict(zip(FIELDS, values, strict=True))
    pad = batch_size - len(out["tokens"])  # only the last batch of a finite stream is short
    out = {k: np.pad(v, ((0, pad), (0, 0))) if pad else v for k, v in out.items()}
    lo = shard.index * rows
    return {k: np.ascontiguousarray(v[lo : lo + rows]) for k, v in out.items()}


def sft_dataset(read: Read, watch: WorkerWatch | None = None) -> grain.IterDataset:
    """Packed SFT batches: every process packs the same global stream, then keeps its rows.

    Packing globally (rather than per process) keeps batch k independent of the process
    count; SFT sets are small next to the model's compute, so reading them P times is cheap.
    """
    return _packed(read, watch, _sft_example, (), _sft_rows)


def _packed(read: Read, watch, example, meta_features: tuple[str, ...], rows) -> grain.IterDataset:
    """Records mapped by `example` and first-fit packed into rows of T, batched, then `rows`."""
    t, batch_size = read.seq_len, read.batch_size
    ds = grain.MapDataset.source(builder.open_split(read.directory, read.split))
    if read.train:
        ds = ds.shuffle(seed=read.seed).repeat(read.data.num_epochs)
    ds = _finish(read.data, ds.map(example), watch)
    lengths = {k: t for k in ("tokens", "targets", "loss_mask", *meta_features)}
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct=lengths,
        num_packing_bins=batch_size,
        shuffle_bins=False,
        meta_features=meta_features,
    )
    # The last batch of a finite stream is padded, not dropped: an epoch sees every example.
    ds = ds.batch(batch_size, drop_remainder=False)
    return ds.map(functools.partial(rows, read.shard, batch_size))


# ----------------------------------------------------------------------------- preference


def _preference_example(record: dict) -> dict[str, np.ndarray]:
    """One pair, each sequence shifted on its own: [Lc - 1 + Lr - 1] per field."""
    tokens, mask, side = record["tokens"], record["loss_mask"], record["pair"]
    n, n_chosen = len(tokens), int(np.count_nonzero(side == 1))
    last = [n_chosen - 1, n - 1]  # each sequence's last token is a target only
    first = [0, n_chosen]  # and its first (bos) an input only
    return {
        "tokens": np.delete(tokens, last),
        "targets": np.delete(tokens, first),
        "loss_mask": np.delete(mask, first).astype(np.float32),
        "pair": np.delete(side, last).astype(np.int32),
    }


def _sequences(segment_ids: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions [B, T] of each sequence, from packed pair ids 1..n and sides 1/2."""
    seg = np.where(segment_ids > 0, 2 * segment_ids - (side == 1), 0).astype(np.int32)
    t = np.arange(seg.shape[1])
    starts = np.ones_like(seg, bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = np.maximum.accumulate(np.where(starts, t, 0), axis=1)  # where each run begins
    return seg, ((t - first) * (seg > 0)).astype(np.int32)


def _preference_rows(shard: Shard, batch_size: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids, positions = _sequences(batch["tokens_segment_ids"], batch["pair"])
    batch = {**batch, "tokens_segment_ids": segment_ids, "tokens_positions": positions}
    return _sft_rows(shard, batch_size, batch)


def preference_dataset(read: Read, watch: WorkerWatch | None = None) -> grain.IterDataset:
    """Packed preference batches (FIELDS; the layout in the module docstring).

    Packed globally, as `sft_dataset`, so batch k does not depend on the process count.

    Raises:
        JaxgenError: the split was prepared for a longer train.seq_len (its pairs may not fit).
    """
    prepared = read.meta.get("seq_len", read.seq_len)
    if read.seq_len < prepared:
        raise JaxgenError(
            f"train.seq_len: {read.seq_len} is shorter than the {prepared} the preference pairs were "
            "prepared for; run `jaxgen data prepare` with this seq_len"
        )
    return _packed(read, watch, _preference_example, ("pair",), _preference_rows)
