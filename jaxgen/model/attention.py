"""Causal multi-head / grouped-query attention with an optional in-place KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.config import ModelConfig
from jaxgen.model.layers import Einsum, compute_dtype, constrain, rope


def attention_mask(q_segment: jax.Array, kv_segment: jax.Array, offset: jax.Array) -> jax.Array:
    """[B, 1, T, S] bool: causal (query slot offset+t sees key slots <= it) and same segment.

    Args:
        q_segment: [B, T] segment ids of the queries; kv_segment: [B, S] of the keys.
        offset: slot of the first query (the cache index; 0 without a cache).
    """
    t, s = q_segment.shape[1], kv_segment.shape[1]
    q_slot = offset + jnp.arange(t)[:, None]  # [T, 1]
    causal = jnp.arange(s)[None, :] <= q_slot  # [T, S]
    same = q_segment[:, :, None] == kv_segment[:, None, :]  # [B, T, S]
    return (causal[None] & same)[:, None]


def _implementation(config: ModelConfig, masked: bool) -> str | None:
    # "auto" lets JAX pick the fastest kernel for the call; cuDNN's fused kernel is
    # only asked for where it is known to apply (causal, no segment mask).
    if config.attention_impl == "auto":
        return None
    if masked and config.attention_impl == "cudnn":
        return "xla"
    return config.attention_impl


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        segment_ids: jax.Array | None,  # [B, T] or None (one segment, no padding)
        kv_segment: jax.Array | None,  # [B, S] with a cache, else None
        layer: jax.Array,  # [] int32, this layer's index into the cache
        cache: tuple[jax.Array, jax.Array, jax.Array] | None,  # (k, v, index)
    ) -> tuple[jax.Array, tuple | None]:
        cfg = self.config
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        bias = int(cfg.use_attention_bias) * 2
        kw = dict(dtype=compute_dtype(cfg), param_dtype=jnp.dtype(cfg.param_dtype))
        q = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), bias, name="query", **kw)(x)
        kk = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), bias, name="key", **kw)(x)
        vv = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), bias, name="value", **kw)(
            x
        )
        if cfg.family == "llama":
            q = rope(q, positions, cfg.rope_theta)
            kk = rope(kk, positions, cfg.rope_theta)
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))

        if cache is not None:
            k_all, v_all, index = cache
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, kk[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, vv[None].astype(v_all.dtype), start)
            cache = (k_all, v_all, index)
            keys, values = k_all[layer], v_all[layer]  # [B, S, K, H]
            mask = attention_mask(segment_ids, kv_segment, index)
        else:
            keys, values = kk, vv
            mask = None if segment_ids is None else attention_mask(segment_ids, segment_ids, 0)

        out = jax.nn.dot_product_attention(
            q,
            keys.astype(q.dtype),
            values.astype(q.dtype),
            mask=mask,
            is_causal=mask is None,
            implementation=_implementation(cfg, mask is not None),
        )  # [B, T, N, H]
        out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
        scale = (2 * cfg.num_layers) ** -0.5
        y = Einsum(
            "BTNH,NHD->BTD",
            (n, h, d),
            ("heads", "head_dim", "embed"),
            int(cfg.use_attention_bias),
            scale,
            name="out",
            **kw,
        )(out)
        return y, cache
