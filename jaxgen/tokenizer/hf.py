"""Hugging Face tokenizers behind jaxgen's tokenizer interface.

Reads a `tokenizer.json` (GPT-2 byte-level BPE, Llama 3, ...) or GPT-2's original
`vocab.json` + `merges.txt` with the `tokenizers` library. Special ids come from
`tokenizer_config.json` / `special_tokens_map.json`, then from `config.json` /
`generation_config.json`, then from GPT-2's `<|endoftext|>`; an id that is not
defined is None (as in jaxgen's SentencePiece `Tokenizer`).

`encode` adds no special tokens (as jaxgen's SentencePiece tokenizer does not):
callers that want a BOS prepend `bos_id` themselves.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from jaxgen.errors import JaxgenError
from jaxgen.tokenizer.word_cache import flatten

_GPT2_EOT = "<|endoftext|>"
_ROLES = ("pad", "bos", "eos", "unk")
# The largest tokenizer file read: published ones are at most tens of megabytes (Gemma's
# tokenizer.json ~34 MB); a larger file is refused before it is read into memory.
MAX_TOKENIZER_BYTES = 256 << 20


def check_size(path: pathlib.Path) -> None:
    """A one-line error when the tokenizer file `path` is larger than MAX_TOKENIZER_BYTES."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # reading it names the problem
    if size > MAX_TOKENIZER_BYTES:
        raise JaxgenError(
            f"{path}: {size:,} bytes is too large for a tokenizer file (limit {MAX_TOKENIZER_BYTES:,})"
        )


def _read(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    check_size(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSON, UTF-8, a number of > 4,300 digits
        raise JaxgenError(f"{path}: cannot read tokenizer settings ({str(e).split(';')[0]})") from None
    return data if isinstance(data, dict) else {}


def _gpt2_bpe(vocab: pathlib.Path, merges: pathlib.Path) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE, built as transformers' GPT2TokenizerFast builds it."""
    check_size(vocab)
    check_size(merges)
    try:
        tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise JaxgenError(f"{vocab}: cannot load vocab.json + merges.txt ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id(_GPT2_EOT) is not None:
        tok.add_special_tokens([_GPT2_EOT])
    return tok


class HFTokenizer:
    """A `tokenizers` tokenizer with jaxgen's interface.

    Attributes:
        path: the main file (tokenizer.json or vocab.json); directory: where it lives.
        vocab_size: number of ids, added tokens included.
        pad_id, bos_id, eos_id, unk_id: special ids, None when undefined.
    """

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        if (self.directory / "tokenizer.json").is_file():
            self.path = self.directory / "tokenizer.json"
            check_size(self.path)
            try:
                self._tok = tokenizers.Tokenizer.from_file(str(self.path))
            except Exception as e:
                raise JaxgenError(f"{self.path}: cannot load tokenizer ({e})") from None
        elif (self.directory / "vocab.json").is_file():
            self.path = self.directory / "vocab.json"
            if not (self.directory / "merges.txt").is_file():
                raise JaxgenError(f"{self.directory}: vocab.json without merges.txt")
            self._tok = _gpt2_bpe(self.path, self.directory / "merges.txt")
        else:
            raise JaxgenError(f"{self.directory}: no tokenizer.json or vocab.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = self._special_ids()
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (ids[r] for r in _ROLES)

    def _special_ids(self) -> dict[str, int | None]:
        settings = {
            **_read(self.directory / "special_tokens_map.json"),
            **_read(self.directory / "tokenizer_config.json"),
        }
        model_ids = {
            **_read(self.directory / "config.json"),
            **_read(self.directory / "generation_config.json"),
        }
        eot = self._tok.token_to_id(_GPT2_EOT)
        ids = {}
        for role in _ROLES:
            token = settings.get(f"{role}_token")
            if isinstance(token, dict):  # {"content": "<s>", "lstrip": ..., ...}
                token = token.get("content")
            found = self._tok.token_to_id(token) if isinstance(token, str) else None
            if found is None:
                found = model_ids.get(f"{role}_token_id")
                found = found[0] if isinstance(found, list) and found else found
            if found is None and role != "pad":
                found = eot  # GPT-2's files name no specials: it uses <|endoftext|> for all three
            ids[role] = found if isinstance(found, int) and found >= 0 else None
        return ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids back to back [int32], each text's id count [int64])."""
        return flatten(self.encode_batch(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of one vocabulary piece (`unk_id` when it is not in the vocabulary)."""
        found = self._tok.token_to_id(piece)
        return self.unk_id if found is None else found

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.directory)!r}, vocab_size={self.vocab_size})"
