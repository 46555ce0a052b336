"""Weights in fewer bytes for decoding: bfloat16 storage, or int8 weight-only quantization.

Batch-1 decoding reads every weight once per token, so its speed is the bytes of the
weights over the memory bandwidth. `serving_weights` converts a serving-layout param
tree (jaxgen/model/serving.py) when a model is loaded; checkpoints keep their dtype.

- "bfloat16": every float leaf stored in bfloat16; projections upcast to the compute
  dtype (float32 on CPU), so products and sums stay float32.
- "int8": each block projection's kernel becomes int8 with one float32 scale per output
  channel (symmetric: scale = max |w| over the input dims / 127, w ~ q * scale), stored
  beside it as `scale` in the same module (`Einsum` multiplies its output by it). The
  embeddings, the output head, norms and biases stay as they are.
- "int8-head": the same, and the token embedding and output head too, with a scale per
  vocab entry (`embed/scale`, or `lm_head_scale` for an untied head): at GPT-2 124M the
  [50304, 768] head is 40% of the model's matmul weights, so a batch-1 step reads 124 MB
  instead of 239. Its logits decide every token: `jaxgen eval perplexity --weights
  int8-head` reports what that costs.

On a CPU the narrow formats reach the matmuls through a weight-streaming kernel
(runtime/cpu_kernels.py); XLA's own dots convert them slower than they read float32.

Plain XLA ops were chosen over qwix: qwix quantizes by intercepting Flax module calls
at trace time, while jaxgen's serving path applies per-layer trees through
`apply_unstacked`; a stored int8 kernel and a scale in the module's own params keep the
tree a plain pytree that shards, donates and saves like any other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.errors import JaxgenError

WEIGHTS = ("float32", "bfloat16", "int8", "int8-head")

# Block projections and how many leading kernel dims each contracts (its input dims):
# attention out [N, H, D] contracts N and H; the others ([D, N, H], [D, F], [F, D]) one.
INPUT_DIMS = {"query": 1, "key": 1, "value": 1, "out": 2, "up": 1, "gate": 1, "down": 1}


def quantize_kernel(kernel: jax.Array, input_dims: int) -> tuple[jax.Array, jax.Array]:
    """float kernel [*in, *out] -> (int8 kernel, float32 scale [*out]) with kernel ~ q * scale."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(input_dims)))  # [*out]
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def _quantize_block(tree, path=()):
    """A layer's param tree with every projection kernel quantized (see INPUT_DIMS)."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict) and "kernel" in value:
            if name not in INPUT_DIMS:
                where = "/".join((*path, name))
                raise JaxgenError(f"weights: int8 does not cover the projection {where!r} (covered: "
                                  f"{', '.join(INPUT_DIMS)})")  # fmt: skip
            q, scale = quantize_kernel(value["kernel"], INPUT_DIMS[name])
            out[name] = {**value, "kernel": q, "scale": scale}
        elif isinstance(value, dict):
            out[name] = _quantize_block(value, (*path, name))
        else:
            out[name] = value
    return out


def serving_weights(params, weights: str):
    """The serving tree `params` with its weights stored as `weights` (see the module doc).

    Runs under jit when called from one (shardings follow the inputs).
    """
    if weights not in WEIGHTS:
        raise JaxgenError(f"weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights == "float32":
        return params
    if weights == "bfloat16":
        return jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    layers = tuple(_quantize_block(layer, (f"layers/{i}",)) for i, layer in enumerate(params["layers"]))
    out = {**params, "layers": layers}
    return _quantize_head(out) if weights == "int8-head" else out


def _quantize_head(params):
    """The embedding [V, D] (a scale per row) and an untied head [D, V] (per column) in int8."""
    q, scale = quantize_kernel(params["embed"]["embedding"].T, 1)  # per vocab entry
    out = {**params, "embed": {**params["embed"], "embedding": q.T, "scale": scale}}
    if "lm_head" in params:
        out["lm_head"], out["lm_head_scale"] = quantize_kernel(params["lm_head"], 1)
    return out


def weight_bytes(params) -> int:
    """Bytes of every leaf: what a batch-1 decode step reads."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
