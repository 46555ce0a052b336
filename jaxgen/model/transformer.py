"""The decoder-only transformer (GPT-2 and Llama families in one module tree).

Parameters (after `init`, unboxed) for L layers:

    embed/embedding              [V, D]     (vocab, embed)
    pos_embed/embedding          [P, D]     gpt2 only
    layers/attn_norm/scale       [L, D]     (+ bias for gpt2)
    layers/attn/{query,key,value,out}/kernel  [L, D, N|K, H] / [L, N, H, D]
    layers/mlp_norm/...          [L, D]
    layers/mlp/{gate,up,down}/kernel          [L, D, F] / [L, F, D]  (gate: llama only)
    final_norm/...               [D]
    lm_head/kernel               [D, V]     untied only

Layers are always stored stacked along a leading `layers` axis. `scan_layers: false`
(the default on GPU and CPU) runs the same scan fully unrolled (lax.scan `unroll=L`),
which gave unrolled-layer speed (see README) while keeping one parameter layout, so
checkpoints move freely between the two settings.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.config import LoraConfig, ModelConfig
from jaxgen.model.attention import Attention
from jaxgen.model.kvcache import KVCache, write_slots
from jaxgen.model.layers import INIT_STD, Mlp, Norm, compute_dtype, constrain, weight_einsum

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layers_scanned(cfg: ModelConfig) -> bool:
    """Whether the layer loop stays rolled: `model.scan_layers`, or by platform when null
    (TPU pods scan for a compile time flat in depth; GPUs and CPUs unroll, see README)."""
    return cfg.scan_layers if cfg.scan_layers is not None else jax.default_backend() == "tpu"


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    config: ModelConfig
    deterministic: bool = True
    lora: LoraConfig | None = None
    prefix_segments: bool = False  # see Attention

    @nn.compact
    def __call__(self, carry, layer, positions, segment_ids, kv_segment, index):
        x, kv = carry  # x: [B, T, D]; kv: (k, v) [L, B, K, S, H] or None
        cfg = self.config
        cache = None if kv is None else (*kv, index)
        h, cache = Attention(cfg, self.lora, self.deterministic, self.prefix_segments, name="attn")(
            Norm(cfg, name="attn_norm")(x), positions, segment_ids, kv_segment, layer, cache
        )
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = Mlp(cfg, self.lora, self.deterministic, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        x = constrain(x, ("batch", "length", "act_embed"))
        return (x, None if cache is None else cache[:2]), None


class Transformer(nn.Module):
    """`apply({'params': p}, tokens, positions, segment_ids=None, cache=None) -> (logits, cache)`.

    With `lora`, the targeted projections also read adapters from a "lora" collection
    (`apply({'params': p, 'lora': adapters}, ...)`, jaxgen/model/lora.py).
    `prefix_segments`: the segment ids are one text per row then padding (Attention).
    """

    config: ModelConfig
    deterministic: bool = True
    lora: LoraConfig | None = None
    prefix_segments: bool = False

    def setup(self):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        emb_init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed"))
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=emb_init, param_dtype=pdt, name="embed"
        )
        if cfg.family == "gpt2":
            pos_init = nn.with_logical_partitioning(nn.initializers.normal(0.01), ("position", "embed"))
            self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, embedding_init=pos_init, param_dtype=pdt)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=1 if layers_scanned(cfg) else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.deterministic, self.lora, self.prefix_segments)
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("embed", "vocab"))
            self.lm_head = self.param("lm_head", init, (cfg.d_model, cfg.vocab_size), pdt)

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        segment_ids: jax.Array | None = None,  # [B, T] int32, 0 = padding
        cache: KVCache | None = None,
        *,
        return_hidden: bool = False,
        logits_at: jax.Array | None = None,  # [B] or [B, T] int32: positions to score (see `head`)
    ) -> tuple[jax.Array, KVCache | None]:
        """Returns logits [B, T, V] in the compute dtype (or final hidden states [B, T, D])."""
        x = self.embed_inputs(tokens, positions)
        kv, kv_segment, index, segment_ids = cache_inputs(cache, segment_ids, tokens)
        layer_ids = jnp.arange(self.config.num_layers)
        (x, kv), _ = self.layers((x, kv), layer_ids, positions, segment_ids, kv_segment, index)
        return self.head(x, return_hidden, logits_at), cache_outputs(kv, kv_segment, index, tokens)

    def embed_inputs(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token (+ learned position) embeddings: [B, T] ids -> [B, T, D] in the compute dtype."""
        x = self.embed(tokens)  # [B, T, D] as stored
        if x.dtype == jnp.int8:  # "int8-head" weights (model/quant.py): a scale per row
            x = x.astype(jnp.float32) * jnp.take(self._scale("embed"), tokens, axis=0)[..., None]
        x = x.astype(compute_dtype(self.config))
        if self.config.family == "gpt2":
            x = x + self.pos_embed(positions).astype(x.dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def head(
        self,
        x: jax.Array,
        return_hidden: bool = False,
        logits_at: jax.Array | None = None,
        serving: bool = False,
    ) -> jax.Array:
        """The last block's output [B, T, D] -> logits [B, T, V] (or normed hidden states).

        `logits_at` [B] keeps one position per row first ([B, 1, V] out), [B, T] keeps T
        ([B, T, V]): a prefill needs only each prompt's last logits (and those of drafts
        placed after it, decode/speculative.py), and the head over every position was
        ~20-40% of a prefill's FLOPs (vocab x width per token) and a [B, P, V] buffer.
        `serving`: see `project`.
        """
        if logits_at is not None:
            at = logits_at if logits_at.ndim == 2 else logits_at[:, None]
            x = jnp.take_along_axis(x, at[..., None], axis=1)  # [B, T, D]
        x = self.final_norm(x)
        return x if return_hidden else self.project(x, serving)

    def project(self, x: jax.Array, serving: bool = False) -> jax.Array:
        """Final hidden states [B, T, D] -> logits [B, T, V].

        `serving` (decoding, never differentiated): a float32 tied head scoring a few
        positions of a row at once (a speculative verify pass) may go through the CPU
        kernel (`layers.weight_einsum`'s `few_rows`). One position per row (decode steps,
        prefills, whatever the batch) stays with XLA's dot, so that a row's logits do not
        depend on how many rows share its batch (refill's "same ids as decoding it alone").
        """
        eq, kernel = (
            ("BTD,VD->BTV", self.embed.embedding)
            if self.config.tie_embeddings
            else ("BTD,DV->BTV", self.lm_head)
        )
        scale = None
        if kernel.dtype == jnp.int8:
            scale = self._scale("embed" if self.config.tie_embeddings else "lm_head")
        logits = weight_einsum(eq, x, kernel, scale, few_rows=serving and x.shape[1] > 1)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def _scale(self, table: str) -> jax.Array:
        """[V] float32: the scale of each vocab entry of the int8 "embed" or "lm_head" weights."""
        params = self.variables["params"]
        return params["embed"]["scale"] if table == "embed" else params["lm_head_scale"]


def cache_inputs(cache: KVCache | None, segment_ids: jax.Array | None, tokens: jax.Array):
    """What the blocks read from a cache: ((k, v), kv_segment [B, S], index, segment_ids).

    All None (segment_ids unchanged) without a cache; with one, the new tokens' segment
    ids (default: all 1) are written into the cache's slots from `index`.
    """
    if cache is None:
        return None, None, None, segment_ids
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    kv_segment = write_slots(cache.segment, segment_ids.astype(jnp.int32), cache.index)
    return (cache.k, cache.v), kv_segment, cache.index, segment_ids


def cache_outputs(kv, kv_segment, index, tokens: jax.Array) -> KVCache | None:
    """The cache after the blocks wrote `tokens` [B, T] at `index` (None without a cache)."""
    if kv is None:
        return None
    return KVCache(k=kv[0], v=kv[1], segment=kv_segment, index=index + tokens.shape[1])


def abstract_variables(config: ModelConfig):
    """Boxed variable shapes (with logical axis metadata) without allocating anything."""
    model = Transformer(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)


def abstract_params(config: ModelConfig):
    """Unboxed `jax.ShapeDtypeStruct`s of the params (no allocation, no mesh needed)."""
    boxed = abstract_variables(config)["params"]
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def init_params(config: ModelConfig, rng: jax.Array):
    """Unboxed float params. Jit this with `out_shardings` to create them sharded.

    Always traced with the layer loop rolled: unrolling does not change a scan's
    values (tests/test_model.py checks this bit for bit) but multiplies the random
    initialisers XLA compiles (quickstart model on CPU: 3.7 s unrolled vs 2.4 s).
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    rolled = config.model_copy(update={"scan_layers": True})
    return nn.unbox(Transformer(rolled).init(rng, tokens, tokens))["params"]


def param_count(config: ModelConfig) -> int:
    leaves = jax.tree.leaves(abstract_params(config))
    return sum(leaf.size for leaf in leaves)


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 L N H T (PaLM appendix B; nanoGPT's estimate).

    N counts only parameters that take part in matmuls: position embeddings are a
    lookup, and so is the token embedding when the output head is untied.
    """
    n = param_count(config)
    if config.family == "gpt2":
        n -= config.max_len * config.d_model
    if not config.tie_embeddings:
        n -= config.vocab_size * config.d_model
    attn = 12 * config.num_layers * config.num_heads * config.dim_per_head * seq_len
    return 6 * n + attn
