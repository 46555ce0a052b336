"""The unit-cache bulk encoder gives exactly SentencePiece's ids, or is not used."""

import random

import numpy as np
import pytest
import sentencepiece as spm
from test_tokenizer import TEXT, _config

from jaxgen.data.tokenizer_training import train_tokenizer
from jaxgen.tokenizer import load_tokenizer
from jaxgen.tokenizer.word_cache import WordCache, flatten

# Characters the training text has and has not seen (unknown -> byte fallback or unk),
# runs of spaces, tabs, newlines, digits, a control token.
_ALPHABET = [*"abcdefghijklmnopqrstuvwxyz  \n\t,.:", "  ", "   ", "\n\n", "\u00e9", "\u2603", "7"]
_ALPHABET.append("<style=formal>")


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\n", "  a", "a  ", " \n ", TEXT[:500]]
    texts += ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(n)]
    return texts


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_bulk_encoding_equals_sentencepiece(tmp_path, kind):
    tok = load_tokenizer(train_tokenizer(_config(tmp_path, TEXT, f"tokenizer.kind={kind}")))
    # Trained BPE and char models qualify; unigram encodes faster without the cache.
    assert (WordCache.for_model(tok._sp, tok.path.read_bytes()) is not None) == (kind != "unigram")
    batches = [_random_texts(seed, 300) for seed in range(3)]  # later ones hit the cache
    # NUL joins a batch for one regex pass; texts holding one take the one-by-one path.
    batches += [[""], ["", ""], ["a \x00 b", "\n\x00\n", "\x00"], [TEXT[:300], "x\x00y"]]
    for texts in batches:
        ids, counts = tok.encode_flat(texts)
        expected = tok.encode_batch(texts)
        assert ids.dtype == np.int32 and counts.tolist() == [len(e) for e in expected]
        np.testing.assert_array_equal(ids, np.concatenate([np.asarray(e, np.int32) for e in expected]))


def test_models_that_are_not_separable_encode_the_plain_way(tmp_path):
    # SentencePiece's defaults: NFKC normalisation, a dummy prefix, whitespace folding.
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT.replace("\n\n", "\n"), encoding="utf-8")
    prefix = tmp_path / "default"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=50, minloglevel=2)
    tok = load_tokenizer(f"{prefix}.model")
    assert WordCache.for_model(tok._sp, tok.path.read_bytes()) is None
    texts = ["two  spaces", " lead", "x"]
    ids, counts = tok.encode_flat(texts)
    np.testing.assert_array_equal(ids, flatten(tok.encode_batch(texts))[0])
    assert counts.tolist() == [len(tok.encode(t)) for t in texts]
