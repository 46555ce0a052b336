"""The decoding KV cache: a typed pytree passed into and returned from the model.

Layout `[layers, batch, kv_heads, max_len, head_dim]`. Layers lead, as in the scanned
parameter layout, so the layer scan carries the whole cache and each layer writes only
its new tokens in place (`dynamic_update_slice` at `[layer, :, :, index]`); reading and
writing whole per-layer slices instead would copy the cache every step. Heads come
before slots so that each (row, head) is one contiguous [max_len, head_dim] matrix, the
operand layout of the attention dots: with slots before heads, XLA on CPU transposed
every layer's keys and values on every decoded token (benchmarks/RESULTS.md, "HF
interop"). XLA's attention dots still read a layer only after copying it out of the
stacked cache (a slice is no dot operand on XLA:CPU), so CPU decoding attends through
jaxgen/runtime/cache_attention.cc, which reads the layer where it lies
(model/attention.py, `reads_cache_in_place`).

Rows of different prompt lengths are *left-padded*: every row writes its next token
at the same slot `index`, so one `dynamic_update_slice` serves the batch. `segment`
marks each slot's owner (0 = padding or empty, 1 = this row's text); attention only
sees keys of the query's own segment, so padding is invisible, and positions are
passed separately per row (they start at 0 at each row's first real token).

`index` may also be one slot per row ([B]): speculative decoding and continuous refill
(jaxgen/decode/ragged.py) keep each row's text from slot 0 and advance rows by different
counts. A rejected draft token is then rolled back by lowering its row's index; the
stale entries it leaves lie after the row's last real slot, where the causal mask hides
them until the row's next tokens overwrite them. Rows then write through a scatter
instead of one dynamic_update_slice, so the shared index stays the plain decoding loop's
layout.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxgen.config import ModelConfig
from jaxgen.model.layers import compute_dtype


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    segment: jax.Array  # [B, S] int32; 0 = padding / not yet written
    index: jax.Array  # [] int32 (or [B]: one per row); the next slot to write

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def lengths(self) -> jax.Array:
        """[B] number of real (non-padding) tokens held per row."""
        return jnp.sum(self.segment != 0, axis=-1)


CACHE_NAMES = ("layers", "batch", "act_kv_heads", "cache_length", "head_dim")


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache. Call under `jax.jit(..., out_shardings=...)` to create it sharded."""

    dtype = dtype or compute_dtype(config)
    shape = (config.num_layers, batch, config.kv_heads, max_len, config.dim_per_head)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        segment=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def write_slots(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """`buffer` [B, S] with `update` [B, T] written from slot `index`: [] (every row at the
    same slot: one dynamic_update_slice) or [B] (a slot per row: one scatter)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer, update, (0, index))
    rows = jnp.arange(buffer.shape[0])[:, None]  # [B, 1]
    return buffer.at[rows, index[:, None] + jnp.arange(update.shape[1])].set(update)
