"""Training the SentencePiece tokenizer of a dataset (`jaxgen data tokenizer`, or first thing in `prepare`).

The tokenizer lives beside the prepared data (`<data_dir>/<data.name>/tokenizer.model`) with
a fingerprint of its config and input files, so it is retrained only when either changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import socket
from collections.abc import Iterable

import sentencepiece as spm

from jaxgen.data.sources import file_digests, sentence_iterator
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer import TOKENIZER_FILE

_STAMP_FILE = "tokenizer.fingerprint"  # not tokenizer.json: that name means a HF tokenizer


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
    if config.data.format == "preference":  # not for other formats: their fingerprints stay as they were
        keys += ("chosen_field", "rejected_field")
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
