"""The programs a plan compiles: the real train step and the real decoding loop, with
abstract arguments (`jax.ShapeDtypeStruct`s carrying their `NamedSharding`s).

The train step is `TrainStep.jit_step` (train/step.py), the function `jaxgen train` and
`jaxgen finetune` run, built from the same config sections, mesh and tuning; the
decoding program is `decode.loop.compiled(...)`'s whole-generation function, the one
`jaxgen generate` runs. Only their arguments are abstract, so the compiled memory and
FLOPs are those of the real programs on the target.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.config import Config
from jaxgen.data.pipeline import FIELDS
from jaxgen.decode import loop, request, sampling
from jaxgen.errors import JaxgenError
from jaxgen.model.kvcache import CACHE_NAMES
from jaxgen.model.serving import unstack_layers
from jaxgen.model.transformer import abstract_params, abstract_variables
from jaxgen.runtime.mesh import (
    activate,
    batch_sharding,
    data_parallel_size,
    logical_sharding,
    param_shardings,
)
from jaxgen.train.loop import check_shapes
from jaxgen.train.step import TrainStep
from jaxgen.train.tuning import Tuning


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program and the per-device bytes of its named argument groups.

    Attributes:
        kind: "train" or "generate".
        compiled: the `jax.stages.Compiled` for the target devices.
        compile_seconds: wall time of lower + compile.
        groups: per-device bytes of each argument group ("params", "optimizer", ...),
            in the order a report lists them.
        tokens: tokens one call processes (train: global batch x seq_len; generate:
            batch x new-token buffer).
        shape: the call's shape in words ("batch 1024 x 8192").
    """

    kind: str
    compiled: Any
    compile_seconds: float
    groups: dict[str, int]
    tokens: int
    shape: str
    out_of_memory: tuple[int, int] | None = None  # (bytes needed, bytes available) per device


# libtpu refuses to finish a program that does not fit the chip; its message still
# says how much the program needs. "G" is GiB ("32.00G" for a 32 GiB argument).
_TPU_OOM = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"
)
_UNIT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves, each carrying its sharding from `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree: each leaf's shard, not the whole array."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += jnp.dtype(leaf.dtype).itemsize * math.prod(shard)
    return total


def _compile(kind: str, jitted, args: tuple, mesh: Mesh, groups: dict, tokens: int, shape: str) -> Program:
    started = time.perf_counter()
    with activate(mesh):  # the layers' logical constraints resolve against this mesh
        lowered = jitted.lower(*args)
        try:
            compiled = lowered.compile()
        except Exception as e:  # jaxlib's error types move between versions
            m = _TPU_OOM.search(str(e))
            if m is None:
                raise
            need, have = (int(float(m.group(i)) * _UNIT[m.group(i + 1)]) for i in (1, 3))
            seconds = time.perf_counter() - started
            return Program(kind, None, seconds, groups, tokens, shape, out_of_memory=(need, have))
    return Program(kind, compiled, time.perf_counter() - started, groups, tokens, shape)


def tuning_of(config: Config) -> Tuning:
    """What trains: a fine-tuning config's method (init_from set), else every parameter."""
    if not config.finetune.init_from:
        return Tuning()
    return Tuning.from_config(config.finetune, None, config.data.format)


def train_program(config: Config, mesh: Mesh) -> Program:
    """Compiles `TrainStep.jit_step` of `config` for `mesh`'s devices.

    Args:
        config: a config already resolved for the target (`plan.resolve_for`).
        mesh: the (data, fsdp, tensor) mesh over the target's devices.

    Returns:
        The program, with per-device bytes of params, optimizer state, frozen weights
        (LoRA base or DPO reference; absent otherwise) and the batch.
    """
    check_shapes(config, mesh)
    step = TrainStep.from_config(config, mesh, tuning_of(config))
    state = abstract(step.abstract_state(), step.state_shardings)
    frozen = {}
    if step.tuning.has_frozen_base:
        frozen = abstract(abstract_params(config.model), step.frozen_shardings)
    t = config.train
    batch = {
        field: jax.ShapeDtypeStruct(
            (t.batch_size, t.seq_len),
            jnp.float32 if field == "loss_mask" else jnp.int32,
            sharding=step.batch_sharding,
        )
        for field in FIELDS
    }  # [B, T] each, as data.train_batches lays them out
    groups = {"parameters": device_bytes(state.params), "optimizer state": device_bytes(state.opt_state)}
    if frozen:
        groups["frozen weights"] = device_bytes(frozen)
    groups["batch"] = device_bytes(batch)
    tokens, shape = t.batch_size * t.seq_len, f"batch {t.batch_size} x {t.seq_len} tokens"
    return _compile("train", step.jit_step, (state, frozen, batch), mesh, groups, tokens, shape)


def generate_shape(config: Config, mesh: Mesh) -> tuple[int, int, loop.DecodeSpec]:
    """(batch B, prompt length P, decode spec) of the generation a plan compiles: the
    configured batch (rounded up to the data-parallel size, as `jaxgen generate` pads it)
    and the longest prompt that leaves room for `max_new_tokens` in `model.max_len`."""
    g, m = config.generate, config.model
    if g.num_beams > 1:
        raise JaxgenError(
            f"generate.num_beams: {g.num_beams}: plan --generate compiles the sampling loop only;"
            " plan beam search with generate.num_beams=1 and num_beams times the batch"
        )
    spec = request.resolve(g, m).spec
    prompt = m.max_len - spec.buffer
    if prompt < 1:
        raise JaxgenError(
            f"generate.max_new_tokens: {g.max_new_tokens} (a {spec.buffer}-token buffer) leaves no"
            f" room for a prompt in model.max_len={m.max_len}"
        )
    dp = data_parallel_size(mesh)
    batch = -(-loop.bucket(g.batch_size) // dp) * dp
    return batch, prompt, spec


def generate_program(config: Config, mesh: Mesh) -> Program:
    """Compiles the whole-generation program (prefill + while loop) of `config.generate`.

    The weights go in the serving layout `jaxgen generate` holds them in (one array per
    layer); the KV cache, created inside the program, is `[L, B, K, P + buffer, H]`.

    Returns:
        The program, with per-device bytes of the weights and of the KV cache (the cache
        is part of the program's temporaries, listed for reading, not added twice).
    """
    batch, prompt, spec = generate_shape(config, mesh)
    m = config.model
    stacked = param_shardings(mesh, abstract_variables(m))["params"]
    params = abstract(
        unstack_layers_abstract(abstract_params(m), m), unstack_shardings(stacked, m.num_layers)
    )
    rows = lambda ndim: batch_sharding(mesh, ndim)  # noqa: E731
    replicated = NamedSharding(mesh, PartitionSpec())
    knobs = sampling.knobs(spec.strategy, batch)
    args = (
        params,
        jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rows(2)),  # prompt [B, P]
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows(1)),  # lengths [B]
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows(1)),  # row ids [B]
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),  # seed
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),  # limit
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows(1)), knobs),
    )
    cache = cache_bytes(config, mesh, batch, prompt + spec.buffer)
    groups = {"parameters": device_bytes(params), "kv cache (in temporaries)": cache}
    whole, _, _ = loop.compiled(m, spec)
    shape = f"batch {batch}, prompt {prompt} + {spec.buffer} new tokens"
    return _compile("generate", whole, args, mesh, groups, batch * spec.buffer, shape)


def unstack_layers_abstract(params, config):
    """The serving layout of abstract params (shapes only; nothing is computed)."""
    return jax.eval_shape(lambda p: unstack_layers(p, config), params)


def unstack_shardings(stacked, num_layers: int):
    """The serving layout's shardings: each layer's slice keeps its spec without the
    leading (never sharded) `layers` axis."""

    def drop_layers(s: NamedSharding) -> NamedSharding:
        return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))

    layer = jax.tree.map(drop_layers, stacked["layers"])
    return {**stacked, "layers": tuple(layer for _ in range(num_layers))}


def cache_bytes(config: Config, mesh: Mesh, batch: int, length: int) -> int:
    """Per-device bytes of the decoding KV cache (keys and values, [L, B, K, S, H] each)."""
    m = config.model
    shape = (m.num_layers, batch, m.kv_heads, length, m.dim_per_head)
    one = jax.ShapeDtypeStruct(shape, jnp.dtype(m.dtype), sharding=logical_sharding(mesh, CACHE_NAMES))
    return 2 * device_bytes(one)
