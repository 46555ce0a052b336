"""Datasets: local sources -> a tokenized TFDS array_record dataset -> grain batches.

    info = prepare(config)                 # tokenizer + dataset, a no-op when up to date
    it = train_batches(config, mesh)       # next(it) -> {tokens, targets, positions, segment_ids, loss_mask}
    state = it.get_state(); it.set_state(state)
    for batch in eval_batches(config, mesh): ...
    split_stats(config, "validation").chars  # for nats per character

The pipeline names resolve lazily, so `prepare` (and a tokenizing worker process,
which imports `jaxgen.data.encode`) does not import grain.
"""

import importlib

# Imported eagerly: the function `prepare` must shadow the submodule of the same name.
from jaxgen.data.prepare import DatasetInfo, SplitStats, dataset_dir, prepare, split_stats

_LAZY = {name: "jaxgen.data.loader" for name in ("Batches", "as_numpy", "eval_batches", "train_batches")}
__all__ = [
    "Batches",
    "DatasetInfo",
    "SplitStats",
    "as_numpy",
    "dataset_dir",
    "eval_batches",
    "prepare",
    "split_stats",
    "train_batches",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxgen.data' has no attribute {name!r}")
