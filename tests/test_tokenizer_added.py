"""Control tokens added to a trained tokenizer: one new id each, old text and ids unchanged."""

import json
import pathlib
import random

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxgen.errors import JaxgenError
from jaxgen.tokenizer import HFTokenizer, Tokenizer, add_tokens, load_tokenizer
from jaxgen.tokenizer.word_cache import WordCache

NEW = ["<style=formal>", "<lang=de>"]
_WORDS = "Hello hello world the style formal lang de a b <x> = speak hear we proceed any further".split()


def _lines(n: int = 300) -> list[str]:
    # Words and the characters of the tokens, so BPE learns pieces such as "style" and
    # "<" that a split control token would fall back to.
    rng = random.Random(0)
    seps = [" ", " ", "  ", ", ", "=", "<", ">", ""]
    return [
        "".join(rng.choice(_WORDS) + rng.choice(seps) for _ in range(rng.randint(1, 12))) for _ in range(n)
    ]


LINES = _lines()
# Random lines may spell a new token; text without them must keep its ids exactly.
PLAIN = [line for line in LINES if not any(t in line for t in NEW)]
GLUED = ["<style=formal>", "<style=formal>Hello", "a<style=formal>b", "x <lang=de><style=formal> y\n"]


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> Tokenizer:
    """A BPE model trained as jaxgen trains them (identity, "\\n" a fixed piece, no control tokens)."""
    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=120,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    return load_tokenizer(folder)


def _hf_dir(folder: pathlib.Path, variant: str) -> pathlib.Path:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(LINES, trainer)
    if variant == "json":
        tok.save(str(folder / "tokenizer.json"))
        eot = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False}
        config = {"added_tokens_decoder": {"0": {**eot, "single_word": False, "special": True}}}
        config |= {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 64}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    else:  # GPT-2's original files; HFTokenizer builds the byte-level pipeline itself
        tok.model.save(str(folder))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    return folder


@pytest.fixture(scope="module", params=["json", "gpt2"])
def hf(request, tmp_path_factory) -> HFTokenizer:
    return load_tokenizer(_hf_dir(tmp_path_factory.mktemp(f"hf_{request.param}"), request.param))


def _specials(tok):
    return (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)


def _splits(tok) -> bool:
    return all(len(tok.encode(t)) > 1 for t in NEW)


def _check_grown(old, new, added):
    """Properties shared by both kinds: new ids at the end, old text and ids unchanged."""
    ids = [new.piece_to_id(t) for t in added]
    assert ids == list(range(old.vocab_size, old.vocab_size + len(added)))
    assert new.vocab_size == old.vocab_size + len(added)
    assert _specials(new) == _specials(old)
    assert [new.id_to_piece(i) for i in range(old.vocab_size)] == [
        old.id_to_piece(i) for i in range(old.vocab_size)
    ]
    assert len(PLAIN) > 250 and new.encode_batch(PLAIN) == old.encode_batch(PLAIN)
    style, lang = ids
    for token, i in zip(added, ids, strict=True):
        assert new.encode(token) == [i]
    assert new.encode("<style=formal>Hello") == [style, *old.encode("Hello")]
    assert new.encode("a<style=formal>b") == [*old.encode("a"), style, *old.encode("b")]
    assert new.encode("x <lang=de><style=formal> y") == [*old.encode("x "), lang, style, *old.encode(" y")]


def test_sentencepiece_tokens_are_single_pieces_at_the_end(sp, tmp_path):
    assert _splits(sp)  # the tokens are not one piece before
    added = add_tokens(sp, [*NEW, NEW[0]], tmp_path / "out")
    assert added == NEW
    grown = load_tokenizer(tmp_path / "out")
    assert grown.path == tmp_path / "out" / "tokenizer.model"
    _check_grown(sp, grown, added)
    for text in [*GLUED, *LINES[:50]]:
        assert grown.decode(grown.encode(text)) == text
    assert sp.vocab_size == 120  # the source is untouched


def test_sentencepiece_bulk_encoding_still_equals_sentencepiece(sp, tmp_path):
    add_tokens(sp, NEW, tmp_path)
    grown = load_tokenizer(tmp_path)
    # The unit cache stays on: user-defined pieces without whitespace never span a unit cut.
    assert WordCache.for_model(grown._sp, grown.path.read_bytes()) is not None
    texts = [*LINES, *GLUED, "", " <lang=de>", "<style=formal>\n<style=formal>", "<style=formal >"]
    ids, counts = grown.encode_flat(texts)
    expected = grown.encode_batch(texts)
    assert counts.tolist() == [len(e) for e in expected]
    np.testing.assert_array_equal(ids, np.concatenate([np.asarray(e, np.int32) for e in expected]))


def test_hf_tokens_are_special_tokens_at_the_end(hf, tmp_path):
    assert _splits(hf)
    added = add_tokens(hf, [*NEW, NEW[0]], tmp_path)
    assert added == NEW
    grown = load_tokenizer(tmp_path)
    assert grown.path == tmp_path / "tokenizer.json"  # also from vocab.json + merges.txt
    _check_grown(hf, grown, added)
    # HFTokenizer.decode skips special tokens; the tokens themselves survive without skipping.
    assert grown.decode(grown.encode("a<style=formal>b")) == "ab"
    for text in GLUED:
        assert grown._tok.decode(grown.encode(text), skip_special_tokens=False) == text
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def test_hf_added_tokens_decoder_gets_the_new_ids(tmp_path):
    source = load_tokenizer(_hf_dir(tmp_path, "json"))
    add_tokens(source, NEW, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert decoder[str(source.vocab_size + 1)] == {
        "content": "<lang=de>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert decoder["0"]["content"] == "<|endoftext|>" and len(decoder) == 3
    assert config["model_max_length"] == 64
    # The same entries as tokenizer.json's added tokens, so transformers re-adds nothing.
    saved = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["added_tokens"]
    assert {str(t.pop("id")): t for t in saved} == decoder


def test_present_tokens_are_not_added_again(sp, hf, tmp_path):
    add_tokens(sp, NEW, tmp_path / "sp1")
    grown = load_tokenizer(tmp_path / "sp1")
    assert add_tokens(grown, [*NEW, "a"], tmp_path / "sp2") == []  # "a" is a piece
    again = load_tokenizer(tmp_path / "sp2")
    assert again.vocab_size == grown.vocab_size
    assert (tmp_path / "sp2" / "tokenizer.model").read_bytes() == grown.path.read_bytes()
    assert add_tokens(hf, ["<|endoftext|>"], tmp_path / "hf") == []
    copy = load_tokenizer(tmp_path / "hf")
    assert copy.vocab_size == hf.vocab_size and _specials(copy) == _specials(hf)
    assert copy.encode_batch(LINES) == hf.encode_batch(LINES)


@pytest.mark.parametrize("token", ["", "<a b>", "<a\tb>", "<a\nb>", "<a\u2581b>"])
def test_invalid_tokens_are_refused(sp, tmp_path, token):
    with pytest.raises(JaxgenError, match=r"^tokenizer\.control_tokens: .*'") as e:
        add_tokens(sp, ["<ok>", token], tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "tokenizer.model").exists()  # refused before writing anything


def test_hf_refuses_a_directory_whose_tokenizer_model_would_win(hf, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(JaxgenError, match="tokenizer.model: would shadow"):
        add_tokens(hf, NEW, tmp_path)
