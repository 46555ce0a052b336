"""Datasets: local sources -> a tokenized TFDS array_record dataset -> grain batches.

info = prepare(config)                 # tokenizer + dataset, a no-op when up to date
bad_lines(info)                        # JSONL lines skipped as bad (data.bad_lines: skip)
it = train_batches(config, mesh)       # next(it) -> {tokens, targets, positions, segment_ids, loss_mask}
state = it.get_state(); it.set_state(state)
for batch in eval_batches(config, mesh): ...
split_stats(config, "validation").chars  # for nats per character
"""

from jaxgen.data.loader import Batches, as_numpy, eval_batches, prefix_segments, train_batches
from jaxgen.data.pipeline import FIELDS

# Last: the function `prepare` must shadow the submodule of the same name.
from jaxgen.data.prepare import DatasetInfo, SplitStats, bad_lines, dataset_dir, prepare, split_stats

__all__ = [
    "FIELDS",
    "Batches",
    "DatasetInfo",
    "SplitStats",
    "as_numpy",
    "bad_lines",
    "dataset_dir",
    "eval_batches",
    "prefix_segments",
    "prepare",
    "split_stats",
    "train_batches",
]
