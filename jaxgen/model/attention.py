"""Causal multi-head / grouped-query attention with an optional in-place KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.config import LoraConfig, ModelConfig
from jaxgen.model.layers import Einsum, constrain, projection_kwargs, rope
from jaxgen.runtime import cpu_kernels


def attention_mask(q_segment: jax.Array, kv_segment: jax.Array, offset: jax.Array) -> jax.Array:
    """[B, 1, T, S] bool: causal (query slot offset+t sees key slots <= it) and same segment.

    Args:
        q_segment: [B, T] segment ids of the queries; kv_segment: [B, S] of the keys.
        offset: slot of the first query: [] for every row (the cache index; 0 without a
            cache) or [B], one per row.
    """
    t, s = q_segment.shape[1], kv_segment.shape[1]
    q_slot = jnp.reshape(offset, (-1, 1, 1)) + jnp.arange(t)[:, None]  # [1 or B, T, 1]
    causal = jnp.arange(s) <= q_slot  # [1 or B, T, S]
    same = q_segment[:, :, None] == kv_segment[:, None, :]  # [B, T, S]
    return (causal & same)[:, None]


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention over the cache, read in its own [B, K, S, H] layout.

    `jax.nn.dot_product_attention` takes keys as [B, S, K, H]; given the cache's layout
    XLA on CPU then copied each layer's keys and values into another order on every
    decoded token. Here the dots batch over (B, K) and contract H (scores) and S
    (values), so each (row, head) [S, H] matrix is read in place. Same math as
    dot_product_attention's XLA path: 1/sqrt(H) scale, float32 softmax, masked logits
    set to its large negative number.

    Args:
        q: [B, T, N, H]; keys, values: [B, K, S, H] (N = K * G query heads per kv head);
        mask: [B, 1, T, S] bool.
    Returns:
        [B, T, N, H].
    """
    b, t, n, h = q.shape
    kv = keys.shape[1]
    g = n // kv
    qg = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)  # [B, K, G*T, H]
    batch = ((0, 1), (0, 1))
    logits = jax.lax.dot_general(qg, keys, (((3,), (3,)), batch), preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv, g, t, -1) * h**-0.5  # [B, K, G, T, S]
    big_negative = -0.7 * jnp.finfo(jnp.float32).max
    logits = jnp.where(mask[:, :, None], logits, big_negative)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype).reshape(b, kv, g * t, -1)
    out = jax.lax.dot_general(probs, values, (((3,), (2,)), batch))  # [B, K, G*T, H]
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# New tokens per row up to which CPU attention over the cache goes through the kernel when
# it attends one slot at a time; where it takes 16 slots at a time (AVX-512, head sizes
# 16-128: cpu_kernels.attends_in_blocks) prefills of any length do. XLA's path first copies
# the layer's keys and values out of the stacked cache and masks [B, N, T, S] scores.
# Prefill of the 6 x 512 edit model (head size 32) on a Xeon with AVX-512 (RESULTS.md,
# "Prompt lookup at 2x"), ms, XLA's dots -> the kernel:
#   one slot at a time:  32 tokens 11.4 -> 9.0, 64: 20.5 -> 17.2, 128: 36.2 -> 34.9, 256: 71.6 -> 77.9
#   16 slots at a time: 256 tokens 78.4 -> 63.0, 512: 191 -> 139, 1024: 485 -> 360
KERNEL_QUERIES = 128


def reads_cache_in_place(q: jax.Array, cache: jax.Array) -> bool:
    """Whether attention over the cache goes through the CPU kernel (runtime/cache_attention.cc),
    which reads the layer in the stacked cache where it lies: XLA's dots copy each layer's
    keys and values out of it first, on every decoded token. Decode steps, verify passes and
    prefills (see KERNEL_QUERIES), float32."""
    if not (q.dtype == cache.dtype == jnp.float32 and cpu_kernels.available()):
        return False
    return q.shape[1] <= KERNEL_QUERIES or cpu_kernels.attends_in_blocks(q.shape[-1])


def write_layer(cache: jax.Array, new: jax.Array, layer: jax.Array | int, index: jax.Array) -> jax.Array:
    """The cache [L, B, K, S, H] with one layer's new keys or values [B, T, K, H] written
    from slot `index` ([] or [B], see jaxgen/model/kvcache.py)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, jnp.swapaxes(new, 1, 2)[None], (layer, 0, 0, index, 0))
    # Per-row slots: one scatter into the whole cache, which XLA updates in place. (Writing
    # into this layer's slice and putting it back copied the slice: batch-8 steps of the
    # quickstart model took 6.1 ms instead of 2.6.)
    rows = jnp.arange(new.shape[0])[:, None]  # [B, 1]
    slots = index[:, None] + jnp.arange(new.shape[1])  # [B, T]
    return cache.at[layer, rows, :, slots, :].set(new)  # indexed dims first: [B, T, K, H]


def _implementation(config: ModelConfig, dtype) -> str:
    """The kernel of `jax.nn.dot_product_attention` for training and prefill.

    JAX's own default (None) is its XLA path, which writes float32 scores [B, N, T, S]
    and keeps them for the backward pass: on an H200 GPT-2 124M trained at 0.53x nanoGPT's
    tokens/s with it, and TinyLlama at 8 x 2048 ran out of 139 GiB (benchmarks/RESULTS.md).
    "auto" asks for cuDNN's fused (flash) kernel on GPUs, for the dtypes and head sizes it
    takes; a segment mask reaches it as an additive bias.
    """
    if config.attention_impl != "auto":
        return config.attention_impl
    h = config.dim_per_head
    if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128:
        return "cudnn"
    return "xla"


def prefix_lengths(segment_ids: jax.Array) -> jax.Array:
    """[B] int32: how many slots of each row hold text, for rows laid out as one text from
    slot 0 then padding (segment ids 1...1 0...0). At least 1, so that a row of padding
    only has a key to attend to (its outputs count nowhere)."""
    return jnp.maximum(jnp.sum(segment_ids != 0, axis=1), 1).astype(jnp.int32)


class Attention(nn.Module):
    """Self-attention of one block; with a cache, over the cache (see `__call__`).

    Attributes:
        prefix_segments: without a cache, the segment ids are known to be one text per row
            from slot 0, then padding (pretraining windows). The padding then reaches the
            attention kernel as sequence lengths, which cuDNN applies as its own padding mask,
            instead of a [B, 1, T, T] mask it must read as an additive bias: forward plus
            backward 0.43 vs 0.67 ms per layer at GPT-2 124M's 16 x 1024 on an H200
            (benchmarks/RESULTS.md). Packed rows (SFT, preference pairs) need the mask.
    """

    config: ModelConfig
    lora: LoraConfig | None = None
    deterministic: bool = True
    prefix_segments: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        segment_ids: jax.Array | None,  # [B, T] or None (one segment, no padding)
        kv_segment: jax.Array | None,  # [B, S] with a cache, else None
        layer: jax.Array | int,  # this layer's index into the cache
        cache: tuple[jax.Array, jax.Array, jax.Array] | None,  # (k, v, index)
    ) -> tuple[jax.Array, tuple | None]:
        cfg = self.config
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        bias = int(cfg.use_attention_bias) * 2
        kw, adapter = projection_kwargs(cfg, self.lora, self.deterministic)

        def project_in(name: str, target: str, heads: int, heads_name: str) -> jax.Array:
            letter = "N" if heads_name == "heads" else "K"
            eq = f"BTD,D{letter}H->BT{letter}H"
            shape, names = (d, heads, h), ("embed", heads_name, "head_dim")
            return Einsum(eq, shape, names, bias, name=name, adapter=adapter(target), **kw)(x)

        q = project_in("query", "q", n, "heads")  # [B, T, N, H]
        kk = project_in("key", "k", k, "kv_heads")  # [B, T, K, H]
        vv = project_in("value", "v", k, "kv_heads")
        if cfg.family == "llama":
            q = rope(q, positions, cfg.rope_theta)
            kk = rope(kk, positions, cfg.rope_theta)
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))

        if cache is not None:
            k_all, v_all, index = cache
            k_all = write_layer(k_all, kk, layer, index)
            v_all = write_layer(v_all, vv, layer, index)
            cache = (k_all, v_all, index)
            mask = attention_mask(segment_ids, kv_segment, index)
            if reads_cache_in_place(q, k_all):
                out = cpu_kernels.cache_attention(q, k_all, v_all, mask[:, 0], layer)
            else:
                keys, values = k_all[layer], v_all[layer]  # [B, K, S, H]
                out = cached_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
        else:
            mask = lengths = None
            if segment_ids is not None and self.prefix_segments:
                # Exact for every real position: causality already hides the padding after it.
                lengths = prefix_lengths(segment_ids)
            elif segment_ids is not None:
                mask = attention_mask(segment_ids, segment_ids, 0)
            out = jax.nn.dot_product_attention(
                q,
                kk,
                vv,
                mask=mask,  # causal already; is_causal lets cuDNN skip the masked blocks
                is_causal=True,
                query_seq_lengths=lengths,
                key_value_seq_lengths=lengths,
                implementation=_implementation(cfg, q.dtype),
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
            adapter=adapter("o"),
            **kw,
        )(out)
        return y, cache
