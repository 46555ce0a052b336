"""A draft model's drafter for speculative decoding (decode/speculative.py): k tokens
from a smaller model of the same tokenizer, with its distributions q when sampling.

The draft keeps its own KV cache at the target's per-row slots (decode/ragged.py); each
round sets its write index from the row's slot, so a roll-back of the target's cache needs
nothing from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.decode import loop, ragged, sampling
from jaxgen.model.kvcache import KVCache


def warped(scores: jax.Array, spec: loop.DecodeSpec, knobs: sampling.SampleKnobs) -> jax.Array:
    """float32 [B, T, V] scores -> the sampling distribution [B, T, V] (softmax after the warpers)."""
    b, t, v = scores.shape
    flat = sampling.limit_vocab(scores, spec.processors.vocab_limit).reshape(b * t, v)
    row_knobs = jax.tree.map(lambda x: jnp.repeat(x, t), knobs)
    return jax.nn.softmax(sampling.warp(flat, spec.strategy, row_knobs), axis=-1).reshape(b, t, v)


def draft_tokens(model, params, rows: ragged.RowState, cache: KVCache, k: int, spec: loop.DecodeSpec):
    """k tokens per row from the draft model, in k passes.

    A row's draft cache lacks at most its second-newest token: the last draft, where the
    target kept all k (no pass has fed it yet). So the first pass feeds the row's two
    newest tokens at their slots, rewriting the second-newest where it is already cached
    (the same token at the same position over the same cache: the same entry), and the
    other k - 1 passes one token each. The alternative, a (k + 1)-th one-token step after
    the last draft just to cache it, costs a whole draft step per round; a two-token pass
    costs little more than a one-token one (RESULTS.md, "A draft model in k passes").

    Returns:
        drafts [B, k], q [B, k, V] float32 (the draft's sampling distributions; None when
        greedy), the draft cache after the k passes.
    """
    greedy = isinstance(spec.strategy, sampling.Greedy)

    def sample(logits, j):  # float32 [B, V] -> (next token [B], q [B, V] or None)
        if greedy:
            scores = sampling.limit_vocab(logits, spec.processors.vocab_limit)
            return jnp.argmax(scores, axis=-1).astype(jnp.int32), None
        q = warped(logits[:, None], spec, rows.knobs)[:, 0]  # the vocabulary limit included
        return sampling.inverse_cdf(q, sampling.uniforms(rows.keys, rows.step, salt=1000 + j)), q

    # A row's slot is at least 2 here: its prompt and the prefill's token.
    newest = jnp.take_along_axis(rows.tokens, (rows.slot - 2)[:, None] + jnp.arange(2), axis=1)  # [B, 2]
    cache = cache.replace(index=rows.slot - 2)
    logits, cache = ragged.forward_rows(
        model, params, newest, rows.slot - 2, cache, logits_at=jnp.ones_like(rows.slot)
    )
    first, q_first = sample(logits[:, 0].astype(jnp.float32), 0)

    def one(carry, j):
        token, cache = carry
        positions = jnp.minimum(rows.slot - 1 + j, model.config.max_len - 1)
        logits, cache = loop.decode_step(model, params, token, positions, cache)
        nxt, q = sample(logits, j)
        return (nxt, cache), (nxt, q)

    (_, cache), (rest, q_rest) = jax.lax.scan(one, (first, cache), jnp.arange(1, k))
    drafts = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, k]
    q = None if greedy else jnp.concatenate([q_first[:, None], jnp.swapaxes(q_rest, 0, 1)], axis=1)
    return drafts, q, cache
