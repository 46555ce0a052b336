"""SentencePiece tokenizers: load, train from the config's sources, size the model's vocab.

Trained tokenizers keep text exactly: identity normalisation, no dummy prefix, no
whitespace folding, and "\\n" as one fixed piece. So `decode(encode(text)) == text`
for every character seen in training, and encoding is separable at line breaks
(`encode(a + b) == encode(a) + encode(b)` when `a` ends with "\\n"), which lets
dataset preparation stream a large file in blocks without changing its tokens.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import socket
from collections.abc import Iterable, Sequence

import numpy as np

from jaxgen.errors import JaxgenError
from jaxgen.unit_cache import UnitCache, flatten

TOKENIZER_FILE = "tokenizer.model"
_STAMP_FILE = "tokenizer.fingerprint"  # not tokenizer.json: that name means a HF tokenizer
_UNCHECKED = object()


class Tokenizer:
    """A loaded SentencePiece model.

    Attributes:
        path: the `.model` file.
        vocab_size: number of pieces (ids are 0 .. vocab_size - 1).
        pad_id, bos_id, eos_id, unk_id: special ids, None where the model has none.
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = pathlib.Path(path)
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
        (jaxgen/unit_cache.py; checked once, on first use).
        """
        if self._units is _UNCHECKED:
            self._units = UnitCache.for_model(self._sp, self._proto)
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
            from jaxgen.convert.hf_tokenizer import HFTokenizer

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


# ----------------------------------------------------------------------------- training


def tokenizer_dir(config) -> pathlib.Path:
    """`<data_dir>/<data.name>`: where a trained tokenizer and the prepared data live."""
    return pathlib.Path(config.data.data_dir) / config.data.name


def tokenizer_path(config) -> pathlib.Path:
    """The tokenizer file the config uses: `tokenizer.path`, else the trained one's place."""
    if config.tokenizer.path is not None:
        path = pathlib.Path(config.tokenizer.path)
        return path / TOKENIZER_FILE if path.is_dir() and (path / TOKENIZER_FILE).exists() else path
    return tokenizer_dir(config) / TOKENIZER_FILE


def tokenizer_fingerprint(config, file_digests: dict[str, str]) -> str:
    """Hash of what a trained tokenizer depends on: its config and the input contents."""
    tok = config.tokenizer.model_dump(mode="json", exclude={"path", "vocab_multiple"})
    keys = ("format", "documents", "text_field", "prompt_field", "response_field", "messages_field")
    data = {k: getattr(config.data, k) for k in keys}
    blob = json.dumps({"tokenizer": tok, "data": data, "files": file_digests}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_up_to_date(config, fingerprint: str) -> bool:
    stamp = tokenizer_dir(config) / _STAMP_FILE
    model = tokenizer_dir(config) / TOKENIZER_FILE
    return model.is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint


def train_tokenizer(config, *, fingerprint: str | None = None) -> pathlib.Path:
    """Trains a SentencePiece model from `config.data.train_files`.

    Streams sentences (lines of the training documents) into the trainer, which keeps
    at most `tokenizer.train_sentences` of them (sampled). Writes
    `<data_dir>/<data.name>/tokenizer.model` atomically and returns its path.

    Raises:
        JaxgenError: no training text, or a vocab too small for the characters.
    """
    import sentencepiece as spm

    from jaxgen.data.sources import file_digests, sentence_iterator

    tok = config.tokenizer
    if fingerprint is None:
        fingerprint = tokenizer_fingerprint(config, file_digests(config, config.data.train_files))
    sentences = _CountingIterator(sentence_iterator(config))
    out = io.BytesIO()
    options = _trainer_options(tok)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=out, **options)
    except RuntimeError as e:
        if sentences.error is not None:  # our own error (a bad source) surfaced through SentencePiece
            raise sentences.error from None
        raise JaxgenError(_training_error(config, str(e), sentences)) from None
    if sentences.count == 0:
        raise JaxgenError(f"data.train_files: {list(config.data.train_files)} contain no text")
    target = tokenizer_dir(config) / TOKENIZER_FILE
    _atomic_write(target, out.getvalue())
    _atomic_write(tokenizer_dir(config) / _STAMP_FILE, fingerprint.encode())
    return target


class _CountingIterator:
    """Passes sentences through, counting them and their distinct characters.

    SentencePiece turns an exception raised by its input iterator into a RuntimeError;
    `error` keeps ours so the caller can re-raise the one-line message.
    """

    def __init__(self, it: Iterable[str]):
        self._it = iter(it)
        self.count = 0
        self.chars: set[str] = set()
        self.error: JaxgenError | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            s = next(self._it)
        except JaxgenError as e:
            self.error = e
            raise
        self.count += 1
        if len(self.chars) < 100_000:
            self.chars.update(s)
        return s


def _trainer_options(tok) -> dict:
    # User symbols are always single pieces: "\n" keeps line structure exactly and makes
    # encoding separable at line breaks; control tokens such as <style=formal> never split.
    user_symbols = ["\n", *tok.control_tokens]
    return dict(
        model_type=tok.kind,
        vocab_size=tok.vocab_size,
        character_coverage=tok.character_coverage,
        byte_fallback=tok.byte_fallback,
        pad_id=tok.pad_id,
        unk_id=tok.unk_id,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        user_defined_symbols=user_symbols,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=tok.max_sentence_length,
        input_sentence_size=tok.train_sentences,
        shuffle_input_sentence=True,
        # A char model's size is the alphabet; a small corpus may not fill a unigram vocab.
        hard_vocab_limit=tok.kind == "bpe",
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def _training_error(config, message: str, sentences: _CountingIterator) -> str:
    tok = config.tokenizer
    first = message.strip().splitlines()[-1] if message.strip() else "SentencePiece failed"
    if sentences.count == 0:
        return f"data.train_files: {list(config.data.train_files)} contain no text"
    if "Vocabulary size too high" in message:
        limit = message.rsplit("<=", 1)[-1].strip(" .")
        return (
            f"tokenizer.vocab_size: {tok.vocab_size} is more than a {tok.kind} model of this training "
            f"text can have (at most {limit}); lower it, or use kind: unigram"
        )
    match = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if match:
        fallback = " plus 256 byte pieces (byte_fallback)" if tok.byte_fallback else ""
        return (
            f"tokenizer.vocab_size: {tok.vocab_size} is too small for the "
            f"{len(sentences.chars)} distinct characters of the training text{fallback} "
            f"and the special pieces: it needs at least {match.group(2)}"
        )
    return f"tokenizer: SentencePiece training failed: {first}"


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
