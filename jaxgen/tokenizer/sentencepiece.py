"""SentencePiece tokenizers: load (or a Hugging Face one from its directory), size the model's vocab.

Trained tokenizers keep text exactly: identity normalisation, no dummy prefix, no
whitespace folding, and "\\n" as one fixed piece. So `decode(encode(text)) == text`
for every character seen in training, and encoding is separable at line breaks
(`encode(a + b) == encode(a) + encode(b)` when `a` ends with "\\n"), which lets
dataset preparation stream a large file in blocks without changing its tokens. Training
one is a data step: jaxgen/data/tokenizer_training.py.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from jaxgen.errors import JaxgenError
from jaxgen.tokenizer.hf import HFTokenizer, check_size
from jaxgen.tokenizer.word_cache import WordCache, flatten

TOKENIZER_FILE = "tokenizer.model"
_UNCHECKED = object()


class Tokenizer:
    """A loaded SentencePiece model.

    Attributes:
        path: the `.model` file.
        vocab_size: number of pieces (ids are 0 .. vocab_size - 1).
        pad_id, bos_id, eos_id, unk_id: special ids, None where the model has none.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        check_size(self.path)
        try:
            proto = self.path.read_bytes()
        except OSError as e:
            raise JaxgenError(f"{self.path}: cannot read tokenizer ({e.strerror})") from None
        self._proto = proto
        self._units = _UNCHECKED
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError):
            raise JaxgenError(f"{self.path}: not a SentencePiece model") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = _special(self._sp.pad_id())
        self.bos_id = _special(self._sp.bos_id())
        self.eos_id = _special(self._sp.eos_id())
        self.unk_id = _special(self._sp.unk_id())

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts)) if texts else []

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Bulk encoding: (all ids back to back [int32], each text's id count [int64]).

        Same ids as `encode_batch`, through a unit cache where the model allows it
        (jaxgen/tokenizer/word_cache.py; checked once, on first use).
        """
        if self._units is _UNCHECKED:
            self._units = WordCache.for_model(self._sp, self._proto)
        if self._units is None:
            return flatten(self.encode_batch(texts))
        return self._units.encode_flat(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`; the unk id (or 0) when the piece is not in the vocab."""
        return int(self._sp.piece_to_id(piece))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def _special(i: int) -> int | None:
    return None if i < 0 else int(i)


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer from a `.model` file or a directory.

    A directory with `tokenizer.model` loads that file; one with `tokenizer.json` or
    `vocab.json` + `merges.txt` is a Hugging Face tokenizer (`HFTokenizer`, same interface).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return Tokenizer(path / TOKENIZER_FILE)
        if (path / "tokenizer.json").is_file() or (
            (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        ):
            return HFTokenizer(path)
        raise JaxgenError(
            f"{path}: no tokenizer.model, tokenizer.json or vocab.json+merges.txt in this directory"
        )
    if not path.exists():
        raise JaxgenError(f"{path}: tokenizer file not found")
    return Tokenizer(path)


def model_vocab_size(tokenizer, multiple: int = 128) -> int:
    """The tokenizer's vocab size rounded up to `multiple` (faster matmuls, shardable)."""
    return -(-tokenizer.vocab_size // multiple) * multiple


def check_vocab(model_vocab: int, tokenizer) -> None:
    """Raises JaxgenError when a model's vocab cannot hold every id of `tokenizer`."""
    if model_vocab < tokenizer.vocab_size:
        raise JaxgenError(
            f"model.vocab_size: the checkpoint has {model_vocab} embeddings but the tokenizer "
            f"{tokenizer.path} has {tokenizer.vocab_size} pieces"
        )
