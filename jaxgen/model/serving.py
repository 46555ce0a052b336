"""The serving layout: one parameter array per layer, for decoding loops.

The stored (checkpoint and training) layout keeps every layer parameter stacked along
a leading `layers` axis, and `Transformer` runs the layers with `nn.scan`. Inside a
decoding `lax.while_loop`, XLA on CPU materialises each layer's slice of the stacked
weights as a copy on every step: one cached GPT-2 124M decode step cost ~2x a plain
pass over the weights (see benchmarks/RESULTS.md, "## Generation"). Here the layers
are split once into separate arrays (`unstack_layers`), and `apply_unstacked` runs
the same `Block` module per layer in a Python loop, so each layer's weights are
their own buffers and nothing is sliced inside the loop.

The serving tree is derived, never saved: `{"layers": (layer_0, ..., layer_{L-1}),
...the other entries unchanged}`, each `layer_i` the stacked tree's slice `[i]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen.config import ModelConfig
from jaxgen.model.kvcache import KVCache
from jaxgen.model.transformer import Block, Transformer, cache_inputs, cache_outputs


def is_unstacked(params) -> bool:
    """Whether `params` is already in the serving layout (a tuple of per-layer trees)."""
    return isinstance(params["layers"], tuple | list)


def unstack_layers(params, config: ModelConfig):
    """The stacked param tree -> the serving tree (one copy of the layer weights only).

    Works eagerly (once per model) and under `jax.jit` (once per call, before the
    decoding loop). Each slice keeps its sharding (the `layers` axis is never sharded).
    A tree already unstacked is returned as is.
    """
    if is_unstacked(params):
        return params
    return {**params, "layers": _split_layers(params["layers"], config.num_layers)}


def stack_layers(params):
    """The serving tree -> the stacked (checkpoint-layout) tree; a stacked tree as is."""
    if not is_unstacked(params):
        return params
    return {**params, "layers": _stack(tuple(params["layers"]))}


@jax.jit
def _stack(layers):
    return jax.tree.map(lambda *a: jnp.stack(a), *layers)


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(layers, num_layers: int):
    # Jitted so that eager calls are one program, not one dispatch per slice; only the
    # layers go through it, as jit copies the arrays it merely passes through.
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers))


class ServingTransformer:
    """`Transformer`'s `apply` over serving-layout params (stacked ones are unstacked first).

    Duck-types the parts of a `Transformer` that decoding uses (`config`, `apply`), so
    `decode.loop.prefill` / `decode.loop.decode_step` take either.
    """

    def __init__(self, config: ModelConfig):
        self.config = config

    def apply(
        self,
        variables,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        segment_ids: jax.Array | None = None,  # [B, T] int32, 0 = padding
        cache: KVCache | None = None,
        *,
        return_hidden: bool = False,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Same arguments and results as `Transformer(config).apply`."""
        return apply_unstacked(
            self.config,
            variables["params"],
            tokens,
            positions,
            segment_ids,
            cache,
            return_hidden=return_hidden,
            logits_at=logits_at,
        )

    def project(self, variables, hidden: jax.Array) -> jax.Array:
        """Final (normed) hidden states [B, T, D], as `apply(..., return_hidden=True)` gives
        them -> logits [B, T, V], as `apply` would give them."""
        return Transformer(self.config).apply(
            _outer(variables["params"]), hidden, True, method=Transformer.project
        )


def _outer(params) -> dict:
    """The model's own variables without the layers: `embed_inputs`, `head` and `project`
    never touch them."""
    return {"params": {k: v for k, v in params.items() if k != "layers"}}


def apply_unstacked(
    config: ModelConfig,
    params,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    return_hidden: bool = False,
    logits_at: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """`Transformer(config).apply({'params': params}, ...)` with the layers run one by one.

    Args:
        params: the serving tree (`unstack_layers`); a stacked tree is unstacked here.
        tokens, positions: [B, T] int32; segment_ids: [B, T] int32 or None.
        cache: a `KVCache` ([L, B, K, S, H]) or None.
    Returns:
        (logits [B, T, V] in the compute dtype, or hidden states [B, T, D]; the cache).
    """
    params = unstack_layers(params, config)
    model = Transformer(config)
    outer = _outer(params)
    x = model.apply(outer, tokens, positions, method=Transformer.embed_inputs)  # [B, T, D]
    kv, kv_segment, index, segment_ids = cache_inputs(cache, segment_ids, tokens)
    block = Block(config)
    for i, layer in enumerate(params["layers"]):
        # A Python int layer index: the cache write and read at [i] are static slices.
        (x, kv), _ = block.apply({"params": layer}, (x, kv), i, positions, segment_ids, kv_segment, index)
    logits = model.apply(outer, x, return_hidden, logits_at, True, method=Transformer.head)
    return logits, cache_outputs(kv, kv_segment, index, tokens)
