"""HFTokenizer: tokenizer.json and GPT-2's vocab.json + merges.txt behind jaxgen's interface."""

import json
import pathlib

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxgen.convert.hf import find_tokenizer
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer.hf import HFTokenizer

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello jax", "naïve café ☕ 123"] * 20
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """A byte-level BPE trained here, saved both as tokenizer.json and as vocab.json + merges.txt."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    json_dir = tmp_path_factory.mktemp("tokenizer_json")
    tok.save(str(json_dir / "tokenizer.json"))
    files_dir = tmp_path_factory.mktemp("vocab_merges")
    tok.model.save(str(files_dir))
    return json_dir, files_dir


def test_both_formats_agree_and_round_trip(gpt2_dirs):
    a, b = HFTokenizer(gpt2_dirs[0]), HFTokenizer(gpt2_dirs[1])
    assert a.path.name == "tokenizer.json" and b.path.name == "vocab.json"
    assert a.vocab_size == b.vocab_size
    for text in set(TEXT) | {"unseen Words ∑ and emoji 🙂"}:
        ids = a.encode(text)
        assert ids == b.encode(text)
        assert a.decode(ids) == b.decode(ids) == text  # byte-level BPE is lossless
    assert a.encode_batch(TEXT[:3]) == [a.encode(t) for t in TEXT[:3]]
    assert a.decode_batch(a.encode_batch(TEXT[:3])) == TEXT[:3]


def test_gpt2_specials_default_to_endoftext(gpt2_dirs):
    for directory in gpt2_dirs:
        tok = HFTokenizer(directory)
        eot = tok.piece_to_id(EOT)
        assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (eot, eot, eot, None)
        assert tok.encode(f"hi{EOT}") == tok.encode("hi") + [eot]  # a special token, never split
        assert tok.decode(tok.encode("hi") + [eot]) == "hi"


def test_byte_level_pieces_mark_spaces(gpt2_dirs):
    tok = HFTokenizer(gpt2_dirs[0])
    pieces = [tok.id_to_piece(i) for i in tok.encode("hello world")]
    assert pieces[0] == "hello" and pieces[1].startswith("Ġ")  # GPT-2's marker for a leading space


def test_special_tokens_from_tokenizer_config(gpt2_dirs, tmp_path):
    directory = tmp_path / "t"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((gpt2_dirs[0] / "tokenizer.json").read_bytes())
    settings = {"bos_token": {"content": EOT, "lstrip": False}, "eos_token": EOT, "pad_token": "Ġthe"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    tok = HFTokenizer(directory)
    assert tok.bos_id == tok.eos_id == tok.piece_to_id(EOT)
    assert tok.pad_id == tok.piece_to_id("Ġthe") != tok.unk_id


def test_find_tokenizer(gpt2_dirs, tmp_path):
    assert isinstance(find_tokenizer(gpt2_dirs[1]), HFTokenizer)
    assert find_tokenizer(tmp_path) is None


def test_vocab_without_merges_is_an_error(gpt2_dirs, tmp_path):
    (tmp_path / "vocab.json").write_bytes((gpt2_dirs[1] / "vocab.json").read_bytes())
    with pytest.raises(JaxgenError, match="vocab.json without merges.txt"):
        HFTokenizer(tmp_path)


def test_corrupt_tokenizer_json_is_an_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(JaxgenError, match="tokenizer.json: cannot load tokenizer"):
        HFTokenizer(tmp_path)
