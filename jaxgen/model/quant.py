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
Where that kernel is the AVX-512 build, each block projection's kernel (float32 too) is
stored as `kernel_tiles` instead: the same shape and elements, in the kernel's 16 x 128
tiles (`cpu_kernels.to_tiles` of its [K, N] view), so that a block of rows is one
contiguous stream (GPT-2 124M int8-head: a decode step at 1.1x of the bare weight pass
instead of 1.4-1.6x; float32 at 6 x 512 to 124M: 1.0-1.1x instead of XLA's 1.3-1.4x,
benchmarks/RESULTS.md). Float32 goes through the kernel only in tiles, i.e. for serving:
with many rows (prefill, scoring) it runs a GEMM's loop order and keeps up with XLA's dot.
A different name, so that nothing reads tiles as a plain kernel; `plain_layout` turns
them back.

Plain XLA ops were chosen over qwix: qwix quantizes by intercepting Flax module calls
at trace time, while jaxgen's serving path applies per-layer trees through
`apply_unstacked`; a stored int8 kernel and a scale in the module's own params keep the
tree a plain pytree that shards, donates and saves like any other.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxgen.config import ModelConfig
from jaxgen.errors import JaxgenError
from jaxgen.model.layers import compute_dtype
from jaxgen.runtime import cpu_kernels

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


def _map_projections(tree, fn, key="kernel", path=()):
    """`tree` with each projection (a dict holding `key`) replaced by fn(name, it, where);
    tuples (the serving layout's layers) are walked too."""
    if isinstance(tree, tuple):
        return tuple(_map_projections(value, fn, key, (*path, str(i))) for i, value in enumerate(tree))
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict) and key in value:
            out[name] = fn(name, value, "/".join((*path, name)))
        else:
            out[name] = _map_projections(value, fn, key, (*path, name))
    return out


def _quantized(name, module, where):
    if name not in INPUT_DIMS:
        raise JaxgenError(f"weights: int8 does not cover the projection {where!r} (covered: "
                          f"{', '.join(INPUT_DIMS)})")  # fmt: skip
    q, scale = quantize_kernel(module["kernel"], INPUT_DIMS[name])
    return {**module, "kernel": q, "scale": scale}


def _rows(name, kernel) -> int:
    """K of a block projection kernel's [K, N] view: the size of its input dims (INPUT_DIMS)."""
    return math.prod(kernel.shape[: INPUT_DIMS[name]])


def _relaid(module, old: str, new: str, relayout):
    """`module` with its kernel moved from `old` to `new`, passed through `relayout`."""
    rest = {key: value for key, value in module.items() if key != old}
    return {**rest, new: relayout(module[old])}


# Float32 kernels smaller than this stay with XLA's dot: they sit in cache, where its dot
# costs less per call than the kernel's custom call (the quickstart's 4 x 128 model, 64 KB
# projections: 0.096-0.106 ms per decode step through the kernel, 0.077-0.093 without).
FLOAT32_TILES_MIN_BYTES = 256 << 10


def _tiled(name, module, where):
    kernel = module["kernel"]
    if name not in INPUT_DIMS or kernel.dtype not in (jnp.int8, jnp.bfloat16, jnp.float32):
        return module
    if kernel.dtype == jnp.float32 and kernel.size * kernel.dtype.itemsize < FLOAT32_TILES_MIN_BYTES:
        return module
    k = _rows(name, kernel)
    if not cpu_kernels.tileable(k, kernel.size // k):
        return module
    return _relaid(module, "kernel", "kernel_tiles", lambda w: cpu_kernels.to_tiles(w, k))


def _plain(name, module, where):
    return _relaid(module, "kernel_tiles", "kernel", lambda w: cpu_kernels.from_tiles(w, _rows(name, w)))


def plain_layout(params):
    """`params` with every `kernel_tiles` back in the plain layout, as `kernel`."""
    return _map_projections(params, _plain, key="kernel_tiles")


def tiles_for(config: ModelConfig) -> bool:
    """`serving_weights`' `tiles` for a model computing as `config` says: the CPU kernel
    takes float32 activations only."""
    return compute_dtype(config) == jnp.float32


def converts(weights: str | None, tiles: bool) -> bool:
    """Whether `serving_weights(params, weights or "float32", tiles)` changes anything: a
    format other than as loaded, or tiles the CPU kernel reads (a conversion copies every
    array, so as-loaded weights are left alone where it would not)."""
    return weights not in (None, "float32") or (tiles and cpu_kernels.reads_tiles())


def serving_weights(params, weights: str, tiles: bool = True):
    """The serving tree `params` with its weights stored as `weights` (see the module doc).

    `tiles`: block kernels in the CPU kernel's tiles where it reads them; False
    (`tiles_for`) when the model computes in another dtype than float32, where XLA's dot
    would reorder tiles back on every call. Runs under jit when called from one
    (shardings follow the inputs).
    """
    if weights not in WEIGHTS:
        raise JaxgenError(f"weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    params = plain_layout(params)
    if weights == "float32":  # as stored (float32 unless loaded otherwise)
        out = params
    elif weights == "bfloat16":
        out = jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    else:
        out = {**params, "layers": _map_projections(params["layers"], _quantized, path=("layers",))}
        out = _quantize_head(out) if weights == "int8-head" else out
    if not (tiles and cpu_kernels.reads_tiles()):
        return out
    return {**out, "layers": _map_projections(out["layers"], _tiled)}


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
