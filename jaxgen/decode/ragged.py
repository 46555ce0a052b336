"""Rows that advance separately: each row's text from slot 0 and a cache slot per row.

The plain loop (decode/loop.py) left-pads prompts so that every row writes its next
token at one shared slot. Two things break that lockstep: speculative decoding
(decode/speculative.py: a row keeps between 1 and k + 1 tokens per target pass) and
continuous refill (a finished row takes the next prompt of a file while the others go
on). Here every row's text starts at slot 0 (prompts right-padded), its next token goes
to its own slot `prompt_length + step`, and the KV cache holds one index per row
(jaxgen/model/kvcache.py). Positions equal slots. A token's cache entry can be rolled
back by lowering its row's index; what it leaves behind lies after the row's text,
hidden by the causal mask until it is overwritten.

The appending and stopping rules are the plain loop's (`loop.append`), so a row stops
at the same token either way.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decode import loop, sampling
from jaxgen.errors import JaxgenError
from jaxgen.model.kvcache import KVCache


@flax.struct.dataclass
class RowState:
    """What a ragged decoding loop carries: `loop.SamplingState` with a step per row."""

    tokens: jax.Array  # [B, W] int32: prompt at [0, len), generated from len
    valid: jax.Array  # [B, W] bool
    cache: KVCache  # index [B]: each row's next cache slot (its slot - 1 between steps)
    step: jax.Array  # [B] int32: tokens generated so far per row
    prompt_lengths: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    finish: jax.Array  # [B] int32 code into loop.FINISH_REASONS
    num_tokens: jax.Array  # [B] int32 completion tokens kept
    logprob: jax.Array  # [B] float32
    keys: jax.Array  # [B] PRNG keys
    knobs: sampling.SampleKnobs
    limit: jax.Array  # [] or [B] int32 max new tokens

    @property
    def slot(self) -> jax.Array:
        """[B]: where each row's next token goes (its text length)."""
        return self.prompt_lengths + self.step

    def last_token(self) -> jax.Array:
        """[B]: each row's newest token, the next model input."""
        return jnp.take_along_axis(self.tokens, (self.slot - 1)[:, None], axis=1)[:, 0]


def right_pad(prompts, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ([B, width] int32 prompts from slot 0, [B] lengths)."""
    out = np.zeros((len(prompts), width), np.int32)
    lengths = np.ones((len(prompts),), np.int32)  # padding rows hold one token
    for i, toks in enumerate(prompts):
        if not len(toks):
            raise JaxgenError(f"prompt {i}: empty (give at least one token, e.g. the bos token)")
        out[i, : len(toks)] = toks
        lengths[i] = len(toks)
    return out, lengths


def positions_at(config, start: jax.Array, count: int) -> jax.Array:
    """[B, count] positions from each row's `start` ([B]). Slots past the model's last position
    (draft tokens beyond a row's limit, never kept) reuse it."""
    return jnp.minimum(start[:, None] + jnp.arange(count), config.max_len - 1)


def forward_rows(model, params, inputs: jax.Array, start: jax.Array, cache: KVCache, logits_at=None):
    """Tokens [B, T] through the model at each row's slots `start` [B] onward (positions
    equal slots), written into `cache` from its index -> (logits, cache)."""
    positions = positions_at(model.config, start, inputs.shape[1])
    return model.apply(
        {"params": params}, inputs, positions, jnp.ones_like(inputs), cache=cache, logits_at=logits_at
    )


def prefill_rows(model, params, prompt: jax.Array, lengths: jax.Array, cache: KVCache, *, seen=None, at=None):
    """Right-padded prompts [B, P] (lengths [B]) through the model into an empty cache.

    `seen` [B] (default: `lengths`): how many leading slots of each row this pass reads,
    the prompt and then tokens placed in its padding for the pass to check (speculative
    drafts); `at` [B, T]: the slots whose final hidden states to return instead.

    Returns:
        float32 logits of each row's last prompt token [B, V] (or the hidden states at
        `at`: [B, T, D], for `model.project`), and the cache with a per-row index at each
        row's prompt length (slots past it are rolled back; padding slots are segment 0
        until overwritten).
    """
    p = prompt.shape[1]
    seen = lengths if seen is None else seen
    segment = (jnp.arange(p)[None] < seen[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.minimum(jnp.arange(p), model.config.max_len - 1), prompt.shape)
    last = (lengths - 1).astype(jnp.int32)
    out, cache = model.apply(
        {"params": params},
        prompt,
        positions,
        segment,
        cache=cache,
        return_hidden=at is not None,
        logits_at=last if at is None else at,
    )
    cache = cache.replace(index=lengths.astype(jnp.int32))
    return (out[:, 0].astype(jnp.float32) if at is None else out), cache


def rows_cache(model, prompt: jax.Array, spec, cache_room: int = 0) -> KVCache:
    """An empty cache for `prompt` [B, P] and `spec.buffer` generated slots per row, and
    `cache_room` more (speculative tokens past a row's end)."""
    b, p = prompt.shape
    return loop.new_cache(model.config, b, p + spec.buffer + cache_room)


def new_rows(prompt, lengths, cache: KVCache, row_ids, seed, limit, knobs, spec) -> RowState:
    """The rows after their prefill (into `cache`), before any new token."""
    b, p = prompt.shape
    width = p + spec.buffer
    slots = jnp.arange(width)[None]
    return RowState(
        tokens=jnp.zeros((b, width), jnp.int32).at[:, :p].set(prompt),
        valid=slots < lengths[:, None],
        cache=cache,
        step=jnp.zeros((b,), jnp.int32),
        prompt_lengths=lengths,
        **loop.fresh_rows(b, row_ids, seed, limit, knobs, spec),
    )


def start_rows(model, params, prompt, lengths, row_ids, seed, limit, knobs, spec, cache_room: int = 0):
    """Prefill and the first new token: a `RowState` with `spec.buffer` generated slots per
    row and `cache_room` more cache slots (speculative tokens past a row's end)."""
    cache = rows_cache(model, prompt, spec, cache_room)
    logits, cache = prefill_rows(model, params, prompt, lengths, cache)
    state = new_rows(prompt, lengths, cache, row_ids, seed, limit, knobs, spec)
    return loop.append(state, *loop.next_token(state, logits, spec), spec.stopping)


def step_rows(model, params, state: RowState, spec) -> RowState:
    """One plain decode step: each row's newest token in, one token out per running row."""
    logits, cache = loop.decode_step(model, params, state.last_token(), state.slot - 1, state.cache)
    state = state.replace(cache=cache)
    return loop.append(state, *loop.next_token(state, logits, spec), spec.stopping)


def completions_of(state: RowState, buffer: int):
    """(tokens [B, buffer] generated per row, num_tokens, finish, logprob): the plain loop's outputs."""
    slots = jnp.minimum(state.prompt_lengths[:, None] + jnp.arange(buffer), state.tokens.shape[1] - 1)
    return jnp.take_along_axis(state.tokens, slots, axis=1), state.num_tokens, state.finish, state.logprob
