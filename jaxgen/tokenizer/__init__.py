"""Tokenizers: SentencePiece models, Hugging Face tokenizers behind the same interface, the word cache."""

from jaxgen.tokenizer.added import add_tokens
from jaxgen.tokenizer.hf import HFTokenizer
from jaxgen.tokenizer.sentencepiece import (
    TOKENIZER_FILE,
    Tokenizer,
    check_vocab,
    load_tokenizer,
    model_vocab_size,
)

__all__ = [
    "TOKENIZER_FILE",
    "HFTokenizer",
    "Tokenizer",
    "add_tokens",
    "check_vocab",
    "load_tokenizer",
    "model_vocab_size",
]
