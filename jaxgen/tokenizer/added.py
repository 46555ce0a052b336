"""Adding control tokens (such as `<style=formal>`) to an existing tokenizer.

Fine-tuning may condition on control tokens that the pretrained tokenizer lacks.
`add_tokens` writes a copy of the tokenizer with them appended at the end of the
vocabulary, so every old id keeps its piece (the checkpoint's embedding rows stay
valid and new rows are appended after them), and each new token never splits:

- SentencePiece: the pieces are appended to the ModelProto as USER_DEFINED, which
  SentencePiece matches greedily in the raw text before BPE and never merges, exactly
  as jaxgen's own training makes control tokens (jaxgen/data/tokenizer_training.py).
  Text without the tokens encodes as before.
- Hugging Face: the tokens are added as special tokens (`normalized=False`, so they
  match the raw text), and `tokenizer_config.json`'s `added_tokens_decoder`, where it
  exists, gets the same entries so transformers' AutoTokenizer agrees on the ids.
  jaxgen's `HFTokenizer.decode` skips special tokens, so they decode to "".
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import tokenizers
from sentencepiece import sentencepiece_model_pb2

from jaxgen.errors import JaxgenError
from jaxgen.tokenizer.hf import HFTokenizer
from jaxgen.tokenizer.sentencepiece import TOKENIZER_FILE, Tokenizer

_HF_FILE = "tokenizer.json"
_HF_CONFIG = "tokenizer_config.json"
# Read by HFTokenizer for special ids; carried along so they resolve identically.
_HF_SIDE_FILES = (_HF_CONFIG, "special_tokens_map.json", "config.json", "generation_config.json")
_SP_SPACE = "\u2581"  # SentencePiece's escaped space: a token holding it would match " "


def add_tokens(tokenizer, tokens: Sequence[str], out_dir: str | pathlib.Path) -> list[str]:
    """Writes `tokenizer` with the `tokens` it lacks appended into `out_dir`.

    New ids are `tokenizer.vocab_size`, `+1`, ... in the order given (duplicates and
    tokens that already are one piece of the vocabulary are skipped). `out_dir` always
    gets a loadable copy (`load_tokenizer(out_dir)`), also when nothing was added.

    Args:
        tokenizer: a loaded `Tokenizer` (SentencePiece) or `HFTokenizer`.
        tokens: control tokens, each non-empty and without whitespace.
        out_dir: where to write; created if missing. SentencePiece writes
            `tokenizer.model`; Hugging Face writes `tokenizer.json` and copies
            tokenizer_config.json, special_tokens_map.json, config.json and
            generation_config.json where the source has them.

    Returns:
        The tokens added, in id order.
    """
    for token in tokens:
        _check_token(token)
    out_dir = pathlib.Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JaxgenError(f"{out_dir}: cannot create the tokenizer directory ({e.strerror})") from None
    wanted = list(dict.fromkeys(tokens))
    if isinstance(tokenizer, Tokenizer):
        return _add_sentencepiece(tokenizer, wanted, out_dir)
    if isinstance(tokenizer, HFTokenizer):
        return _add_hf(tokenizer, wanted, out_dir)
    raise JaxgenError(f"tokenizer.control_tokens: cannot add tokens to a {type(tokenizer).__name__}")


def _check_token(token: str) -> None:
    if not isinstance(token, str) or not token:
        raise JaxgenError(f"tokenizer.control_tokens: {token!r} is not a non-empty string")
    if any(c.isspace() for c in token):
        raise JaxgenError(f"tokenizer.control_tokens: {token!r} contains whitespace")
    if _SP_SPACE in token:
        raise JaxgenError(f"tokenizer.control_tokens: {token!r} contains U+2581, SentencePiece's space")


def _write(path: pathlib.Path, data: bytes) -> None:
    """Writes atomically (temp file + rename): a crash never leaves half a tokenizer."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        raise JaxgenError(f"{path}: cannot write ({e.strerror})") from None


def _add_sentencepiece(tokenizer: Tokenizer, tokens: list[str], out_dir: pathlib.Path) -> list[str]:
    try:
        proto = tokenizer.path.read_bytes()
    except OSError as e:
        raise JaxgenError(f"{tokenizer.path}: cannot read tokenizer ({e.strerror})") from None
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    have = {p.piece for p in model.pieces}
    added = [t for t in tokens if t not in have]
    for token in added:
        # USER_DEFINED, not NORMAL: BPE could only reach a NORMAL piece through merges
        # of pieces the model lacks, so the token would split into characters.
        model.pieces.add(
            piece=token, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        )
    _write(out_dir / TOKENIZER_FILE, model.SerializeToString() if added else proto)
    return added


def _add_hf(tokenizer: HFTokenizer, tokens: list[str], out_dir: pathlib.Path) -> list[str]:
    if (out_dir / TOKENIZER_FILE).exists():
        # load_tokenizer prefers tokenizer.model, so it would never load what we write.
        raise JaxgenError(f"{out_dir / TOKENIZER_FILE}: would shadow the tokenizer.json written there")
    side = {name: _read_bytes(tokenizer.directory / name) for name in _HF_SIDE_FILES}
    # A copy through JSON: the caller's tokenizer stays as it was. `_tok` is the built
    # tokenizer, also for a vocab.json + merges.txt source (HFTokenizer builds it).
    tok = tokenizers.Tokenizer.from_str(tokenizer._tok.to_str())
    added = [t for t in tokens if tok.token_to_id(t) is None]
    if added:
        tok.add_special_tokens([_added_token(t) for t in added])
        ids = [tok.token_to_id(t) for t in added]
        if ids != list(range(tokenizer.vocab_size, tokenizer.vocab_size + len(added))):
            raise JaxgenError(
                f"{tokenizer.path}: added tokens got ids {ids}, not the next ones after the "
                f"vocab of {tokenizer.vocab_size} (the vocab has gaps)"
            )
        if side[_HF_CONFIG] is not None:
            side[_HF_CONFIG] = _config_with(side[_HF_CONFIG], tokenizer.directory / _HF_CONFIG, added, ids)
    data = _read_bytes(tokenizer.path) if tokenizer.path.name == _HF_FILE and not added else None
    if data is None:
        data = tok.to_str(pretty=True).encode("utf-8")
    _write(out_dir / _HF_FILE, data)
    for name, content in side.items():
        if content is not None:
            _write(out_dir / name, content)
    return added


def _read_bytes(path: pathlib.Path) -> bytes | None:
    if not path.is_file():
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise JaxgenError(f"{path}: cannot read ({e.strerror})") from None


def _added_token(token: str) -> tokenizers.AddedToken:
    # normalized=False: matched in the raw text, before any normalizer could change it.
    return tokenizers.AddedToken(
        token, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False
    )


def _config_with(data: bytes, path: pathlib.Path, added: list[str], ids: list[int]) -> bytes:
    """tokenizer_config.json with `added_tokens_decoder` entries for the new ids.

    transformers (>= 4.34) writes `added_tokens_decoder` as {"<id>": AddedToken fields}
    and re-adds any entry that the tokenizer.json lacks or describes differently, so the
    entries carry exactly the fields given to `tokenizers`. A config without the key
    (older transformers) reads added tokens from tokenizer.json alone and is kept as is.
    """
    try:
        config = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxgenError(f"{path}: cannot read tokenizer settings ({e})") from None
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if not isinstance(decoder, dict):
        return data
    for token, i in zip(added, ids, strict=True):
        decoder[str(i)] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
