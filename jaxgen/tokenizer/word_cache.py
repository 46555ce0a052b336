"""Exact, faster SentencePiece batch encoding through a cache of space-delimited units.

Text is cut into units: a newline, or a run of spaces with the non-space characters
after it (" *[^ \\n]+"), or a run of spaces before a newline or the end. When no piece of the vocabulary
spans such a cut, SentencePiece's segmentation of the whole text is the concatenation
of its units' segmentations: BPE only ever merges two symbols into a vocabulary piece,
so it cannot cross a cut that no piece crosses (char models: trivially). Units repeat
(natural text is Zipfian), so each distinct unit is encoded once and the batch is
gathered from the cache with numpy: ~1.6-2x SentencePiece's own BPE throughput on one
core (benchmarks/RESULTS.md).

`WordCache.for_model` checks the conditions on the model itself and returns None when
they do not hold (not BPE or char, another normaliser, a dummy prefix, pieces containing "x▁"
or "\\n" beside other characters), and the tokenizer then encodes the plain way.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
from sentencepiece import sentencepiece_model_pb2

_SPACE = "\u2581"  # how SentencePiece writes " " inside pieces
# A batch is cut in one regex pass over its texts joined by NUL, a unit of its own with
# no ids (a batch whose texts contain NUL is encoded without the cache).
_SEP = "\x00"
_UNIT_OR_SEP = re.compile(r"\n|\x00| *[^ \n\x00]+| +")
_MAX_UNITS = 200_000  # the cache starts over beyond this many distinct units


def flatten(id_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (ids back to back [int32], each list's length [int64])."""
    counts = np.fromiter(map(len, id_lists), np.int64, len(id_lists))
    return np.fromiter(itertools.chain.from_iterable(id_lists), np.int32, int(counts.sum())), counts


def _separable(proto: bytes, pieces: Sequence[str]) -> bool:

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    norm = model.normalizer_spec
    # Unigram would qualify too (a Viterbi path is a sequence of pieces), but SentencePiece
    # encodes it at ~13 MB per CPU-second, faster than this cache (~9.5); BPE runs at ~6,
    # and char models are slow in the Python lists of one id per character.
    if model.trainer_spec.model_type not in (model.trainer_spec.BPE, model.trainer_spec.CHAR):
        return False
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        return False
    if model.trainer_spec.treat_whitespace_as_suffix or _SPACE not in pieces or "\n" not in pieces:
        return False
    for piece in pieces:
        if "\n" in piece and piece != "\n":
            return False
        if any(a != _SPACE and b == _SPACE for a, b in itertools.pairwise(piece)):
            return False
    return True


class WordCache:
    """Encodes batches exactly as `processor.encode` would, reusing each unit's ids."""

    def __init__(self, processor):
        self._sp = processor
        self._clear()

    @classmethod
    def for_model(cls, processor, proto: bytes) -> WordCache | None:
        pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        return cls(processor) if _separable(proto, pieces) else None

    def _clear(self) -> None:
        self._index: dict[str, int] = {_SEP: 0}  # slot 0: the separator, no ids
        self._ids = np.zeros(0, np.int32)  # every cached unit's ids, back to back
        self._offsets = np.zeros(2, np.int64)  # unit k's ids: _ids[_offsets[k]:_offsets[k + 1]]

    def _add(self, units: list[str]) -> None:
        encoded = self._sp.encode(units)
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum()))
        base = len(self._offsets) - 1
        self._index.update(zip(units, range(base, base + len(units)), strict=True))
        self._ids = np.concatenate([self._ids, flat])
        self._offsets = np.concatenate([self._offsets, self._offsets[-1] + np.cumsum(lengths)])

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all texts' ids back to back [int32], each text's id count [int64])."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        joined = _SEP.join(texts)
        if joined.count(_SEP) != len(texts) - 1:
            return flatten(self._sp.encode(list(texts)))
        units = _UNIT_OR_SEP.findall(joined)
        if not units:  # one empty text
            return np.zeros(0, np.int32), np.zeros(1, np.int64)
        new = [u for u in set(units) if u not in self._index]
        if len(self._index) + len(new) > _MAX_UNITS:
            self._clear()
            new = [u for u in set(units) if u not in self._index]
        if new:
            self._add(new)
        slot = np.fromiter(map(self._index.__getitem__, units), np.int64, len(units))
        starts = self._offsets[slot]
        lengths = self._offsets[slot + 1] - starts
        # Gather: output position p of unit k reads _ids[starts[k] + p - (ids before unit k)].
        ends = np.cumsum(lengths)
        ids = self._ids[np.arange(ends[-1]) - np.repeat(ends - lengths - starts, lengths)]
        text_ends = np.append(ends[slot == 0], ends[-1])  # ids up to each separator, then all
        return ids, np.diff(text_ends, prepend=0)
