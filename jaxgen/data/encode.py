"""Tokenizing pretraining text in worker processes, in order, with bounded memory.

Encoding does not scale across threads (SentencePiece's BPE ran ~4-6 MB/s on one core
whatever `num_threads`; the word cache in jaxgen/tokenizer/word_cache.py is numpy and Python), so
prepare spreads `Tokenizer.encode_flat` calls over processes.
At most `2 * workers` batches are in flight, so memory stays bounded.
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from jaxgen.tokenizer import load_tokenizer

Segment = tuple[str, bool]
_tokenizer = None  # per worker process


def encode_segments(tokenizer, batch: list[Segment]) -> tuple[np.ndarray, int, int, int]:
    """(flat int32 ids with eos after each document end, chars, UTF-8 bytes, documents ended)."""
    texts = [text for text, _ in batch]
    ids, counts = tokenizer.encode_flat(texts)
    ends = np.fromiter((end for _, end in batch), bool, len(batch))
    ids = np.insert(ids, np.cumsum(counts)[ends], tokenizer.eos_id)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return ids, sum(map(len, texts)), n_bytes, int(ends.sum())


def _init(path: str) -> None:
    global _tokenizer

    _tokenizer = load_tokenizer(path)


def _job(batch: list[Segment]) -> tuple[np.ndarray, int, int, int]:
    return encode_segments(_tokenizer, batch)


def encode_all(
    tokenizer, path, batches: Iterable[list[Segment]], workers: int
) -> Iterator[tuple[np.ndarray, int, int, int]]:
    """`encode_segments` of each batch, in order; in `workers` processes when > 1.

    `path` is what `load_tokenizer` loads the same tokenizer from in a worker.
    """
    if workers <= 1:
        for batch in batches:
            yield encode_segments(tokenizer, batch)
        return
    # spawn, not fork: the caller may have started JAX's threads, which fork would copy.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=(str(path),)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.submit(_job, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
