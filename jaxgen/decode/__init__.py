"""Decoding token ids: the compiled prefill + while-loop program over a KV cache, sampling
strategies and logit processors, beam search. Text, prompts and options live in inference/."""

from jaxgen.decode.beam import beam_ids
from jaxgen.decode.loop import Completion, DecodeSpec, generate_ids, stream_ids

__all__ = ["Completion", "DecodeSpec", "beam_ids", "generate_ids", "stream_ids"]
