"""Token negative log-likelihood: the one function training, validation and `jaxgen eval` use.

Sums, not means: gradient accumulation, multi-batch evaluation and per-character figures
all divide once, at the end, by the count they need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.config import ModelConfig
from jaxgen.model.transformer import Transformer


def projector(config: ModelConfig, params):
    """hidden [B, t, D] -> logits [B, t, V] with the model's head, for params in either layout
    (the head never reads the layers, so the serving tree works as well as the stacked one)."""
    head = {"params": {k: v for k, v in params.items() if k != "layers"}}
    model = Transformer(config)
    return lambda h: model.apply(head, h, method=Transformer.project)


def _chunking(t: int, chunk: int):
    """(the largest chunk size <= `chunk` dividing `t`, [B, T, ...] -> [n, B, size, ...])."""
    size = max(d for d in range(1, min(chunk, t) + 1) if t % d == 0)
    n = t // size
    return size, lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def token_nll(project, hidden, targets, mask, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Sum of masked token NLL and of z-loss (logsumexp^2), in float32.

    The sequence is cut into chunks of <= `chunk` positions and each chunk's logits are
    recomputed in the backward pass (jax.checkpoint), so float32 logits for the whole
    batch ([B, T, V], 3.3 GB for GPT-2 at 16 x 1024) never exist at once. When the
    sequence fits in one chunk, nothing is recomputed.

    Args:
        project: hidden [B, t, D] -> logits [B, t, V].
        hidden: [B, T, D]; targets: [B, T] int; mask: [B, T] float32.
    """
    t = hidden.shape[1]
    size, chunks = _chunking(t, chunk)

    def piece(h, y, m):  # [B, c, D], [B, c], [B, c]
        logits = project(h).astype(jnp.float32)  # [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * m), jnp.sum(jnp.square(lse) * m)

    if size == t:  # one chunk: keeping its logits for the backward pass is cheaper
        return piece(hidden, targets, mask)
    piece = jax.checkpoint(piece)

    def body(carry, xs):
        nll, z = piece(*xs)
        return (carry[0] + nll, carry[1] + z), None

    (nll, z), _ = jax.lax.scan(
        body, (jnp.zeros(()), jnp.zeros(())), (chunks(hidden), chunks(targets), chunks(mask))
    )
    return nll, z


def token_logps(project, hidden, targets, chunk: int) -> jax.Array:
    """Log-probability of each target, [B, T] float32: what preference losses sum per sequence.

    Chunked like `token_nll` (logits of <= `chunk` positions at a time, recomputed in the
    backward pass), so [B, T, V] float32 logits never exist at once.
    """
    t = hidden.shape[1]
    size, chunks = _chunking(t, chunk)

    def piece(h, y):  # [B, c, D], [B, c] -> [B, c]
        logits = project(h).astype(jnp.float32)  # [B, c, V]
        target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return target_logit - jax.nn.logsumexp(logits, axis=-1)

    if size == t:
        return piece(hidden, targets)
    out = jax.lax.map(lambda xs: jax.checkpoint(piece)(*xs), (chunks(hidden), chunks(targets)))  # [n, B, c]
    return jnp.moveaxis(out, 0, 1).reshape(targets.shape)
