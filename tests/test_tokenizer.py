"""SentencePiece tokenizer: training from config, exact round trips, vocab sizing, errors."""

import pathlib

import pytest

from jaxgen.config import load_config
from jaxgen.data.tokenizer_training import train_tokenizer
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer import Tokenizer, check_vocab, load_tokenizer, model_vocab_size

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\tIndented  with  two spaces.\n"
    "Caf\u00e9 na\u00efve \u00fcber \u2014 <style=formal> 12345\n"
) * 40


def _config(tmp_path: pathlib.Path, text: str = TEXT, *overrides: str):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    return load_config(
        None,
        [
            f"data.train_files=[{corpus}]",
            f"data.data_dir={tmp_path / 'prepared'}",
            "tokenizer.vocab_size=160",
            "tokenizer.control_tokens=['<style=formal>']",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    config = _config(tmp_path_factory.mktemp("bpe"))
    return load_tokenizer(train_tokenizer(config))


def test_train_writes_model_in_data_dir_and_round_trips(tmp_path):
    config = _config(tmp_path)
    path = train_tokenizer(config)
    assert path == tmp_path / "prepared" / "default" / "tokenizer.model"
    tok = load_tokenizer(path.parent)  # a directory with tokenizer.model
    assert tok.path == path
    assert tok.vocab_size == 160
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT) / 2  # BPE merged something
    assert tok.decode(ids) == TEXT  # whitespace, newlines, tabs, accents kept exactly
    texts = ["hear me speak.\n", "  two\tspaces ", ""]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_control_token_and_newline_are_single_pieces(bpe):
    control = bpe.piece_to_id("<style=formal>")
    assert control not in (bpe.unk_id, 0)
    assert control in bpe.encode("x <style=formal> y")
    assert bpe.encode("\n") == [bpe.piece_to_id("\n")]


def test_encoding_is_separable_at_line_breaks(bpe):
    # prepare encodes large files block by block; this is why that changes nothing.
    for cut in range(0, 1400, 97):
        end = TEXT.find("\n", cut) + 1
        assert 0 < end <= 1500
        assert bpe.encode(TEXT[:end]) + bpe.encode(TEXT[end:1500]) == bpe.encode(TEXT[:1500])


def test_char_kind_gives_one_token_per_character(tmp_path):
    config = _config(tmp_path, TEXT, "tokenizer.kind=char", "tokenizer.vocab_size=512")
    tok = load_tokenizer(train_tokenizer(config))
    plain = TEXT.replace("<style=formal>", "")
    assert len(tok.encode(plain)) == len(plain)
    assert tok.decode(tok.encode(plain)) == plain
    # alphabet + 4 specials + "\n" and the control token as user symbols ("\n" is also a char)
    assert tok.vocab_size == len(set(plain) - {"\n"}) + 4 + 2


def test_special_ids_follow_config(tmp_path):
    config = _config(
        tmp_path,
        TEXT,
        "tokenizer.pad_id=-1",
        "tokenizer.unk_id=0",
        "tokenizer.bos_id=1",
        "tokenizer.eos_id=2",
    )
    tok = load_tokenizer(train_tokenizer(config))
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (None, 0, 1, 2)


def test_model_vocab_rounds_up_and_mismatch_is_an_error(bpe):
    assert model_vocab_size(bpe, 128) == 256
    assert model_vocab_size(bpe, 32) == 160
    check_vocab(256, bpe)
    with pytest.raises(JaxgenError, match=r"checkpoint has 128 embeddings.*has 160 pieces"):
        check_vocab(128, bpe)


def test_vocab_too_large_for_bpe_names_the_limit(tmp_path):
    config = _config(tmp_path, "tiny text\n" * 10, "tokenizer.vocab_size=5000")
    with pytest.raises(
        JaxgenError, match=r"^tokenizer.vocab_size: 5000 is more than a bpe model .*at most \d+"
    ):
        train_tokenizer(config)


def test_byte_fallback_vocab_too_small(tmp_path):
    config = _config(tmp_path, TEXT, "tokenizer.byte_fallback=true", "tokenizer.vocab_size=200")
    with pytest.raises(
        JaxgenError, match=r"^tokenizer.vocab_size: 200 is too small .*byte_fallback.*needs at least"
    ):
        train_tokenizer(config)


def test_training_on_blank_text_is_an_error(tmp_path):
    with pytest.raises(JaxgenError, match=r"^data.train_files: .* contain no text"):
        train_tokenizer(_config(tmp_path, "\n\n   \n"))


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(JaxgenError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(JaxgenError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(junk)
    with pytest.raises(JaxgenError, match="no tokenizer.model, tokenizer.json"):
        load_tokenizer(tmp_path)


def test_directory_with_tokenizer_json_loads_the_hf_tokenizer(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from jaxgen.tokenizer.hf import HFTokenizer

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [1, 2]
