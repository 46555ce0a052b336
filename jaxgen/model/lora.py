"""LoRA adapters: a small trainable tree beside the frozen base, merged for serving and export.

A targeted projection `y = x W` becomes `y = x W + (alpha / r) (x A) B` with A [in, r]
and B [r, out] (Hu et al. 2021; PEFT's layout and init: A kaiming-uniform, B zero, so
training starts from the base model's outputs). The adapters are their own variable
collection, "lora", built by the same modules as the base (`Einsum` with an `Adapter`):

    lora/layers/attn/{query,key,value,out}/{a,b}   [L, D, r] / [L, r, N|K, H] ...
    lora/layers/mlp/{gate,up,down}/{a,b}           [L, D, r] / [L, r, F] ...

Each carries the logical axis names of the kernel dims it shares (`embed`, `heads`,
`mlp`, stacked over `layers`), so the mesh rules shard an adapter like its base matrix
and the rank axis is replicated. Training differentiates only this tree: the base's
weight gradients are never formed, and the optimizer holds state for adapters alone.

`merge` folds W + (alpha / r) A B into a plain param tree: the serving layout, `jaxgen
finetune merge`, and the Hugging Face export all use it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.config import LORA_TARGETS, LoraConfig, ModelConfig
from jaxgen.errors import JaxgenError
from jaxgen.model.layers import adapter_input_dims
from jaxgen.model.transformer import Transformer, abstract_params

# LoRA target name -> (module, projection) inside each block.
TARGET_MODULES = {
    "q": ("attn", "query"),
    "k": ("attn", "key"),
    "v": ("attn", "value"),
    "o": ("attn", "out"),
    "mlp_in": ("mlp", "up"),
    "mlp_gate": ("mlp", "gate"),
    "mlp_out": ("mlp", "down"),
}
# The einsum of each projection (the kernel's input dims come first).
_EQUATIONS = {
    "query": "BTD,DNH->BTNH",
    "key": "BTD,DKH->BTKH",
    "value": "BTD,DKH->BTKH",
    "out": "BTNH,NHD->BTD",
    "up": "BTD,DF->BTF",
    "gate": "BTD,DF->BTF",
    "down": "BTF,FD->BTD",
}


def valid_targets(config: ModelConfig) -> tuple[str, ...]:
    return tuple(t for t in LORA_TARGETS if t != "mlp_gate" or config.family == "llama")


def check(config: ModelConfig, lora: LoraConfig) -> None:
    """One-line errors for targets this model lacks and ranks larger than a matrix allows."""
    valid = valid_targets(config)
    if not lora.targets:
        raise JaxgenError(f"finetune.lora.targets: empty (choose from {', '.join(valid)})")
    for target in lora.targets:
        if target not in valid:
            raise JaxgenError(
                f"finetune.lora.targets: {target!r} matches no projection of a {config.family} model"
                f" (valid: {', '.join(valid)})"
            )
    layers = abstract_params(config)["layers"]
    for target in lora.targets:
        module, name = TARGET_MODULES[target]
        shape = layers[module][name]["kernel"].shape[1:]  # without the layers axis
        n_in = adapter_input_dims(_EQUATIONS[name])
        size_in, size_out = _prod(shape[:n_in]), _prod(shape[n_in:])
        if lora.rank > min(size_in, size_out):
            raise JaxgenError(
                f"finetune.lora.rank: {lora.rank} exceeds the {size_in} x {size_out} matrix of target"
                f" {target!r} (rank <= {min(size_in, size_out)})"
            )


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _init_variables(config: ModelConfig, lora: LoraConfig, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    # Rolled layer loop: the values do not depend on unrolling, compile time does.
    rolled = config.model_copy(update={"scan_layers": True})
    return Transformer(rolled, lora=lora).init(rng, tokens, tokens)


def abstract_adapters(config: ModelConfig, lora: LoraConfig):
    """The boxed "lora" collection's shapes (logical axis metadata included)."""
    return jax.eval_shape(lambda rng: _init_variables(config, lora, rng), jax.random.key(0))["lora"]


def init_adapters(config: ModelConfig, lora: LoraConfig, rng: jax.Array):
    """Fresh unboxed adapters (B = 0). Jit with `out_shardings`: the base params that
    `init` also builds are dead code there and never computed."""
    return nn.unbox(_init_variables(config, lora, rng)["lora"])


def merge(params, adapters, lora: LoraConfig):
    """Stacked base params with every adapter folded in: W + (alpha / r) A B, per layer.

    Works under `jax.jit`; the result has the base's structure, dtypes and shardings.
    """
    layers = dict(params["layers"])
    for module, projections in adapters["layers"].items():
        layers[module] = dict(layers[module])
        for name, ab in projections.items():
            kernel = layers[module][name]["kernel"]  # [L, *in, *out]
            a, b = ab["a"], ab["b"]  # [L, *in, R], [L, R, *out]
            num_layers, rank = a.shape[0], a.shape[-1]
            delta = jnp.einsum(
                "lir,lro->lio",
                a.reshape(num_layers, -1, rank).astype(jnp.float32),
                b.reshape(num_layers, rank, -1).astype(jnp.float32),
            )  # [L, in, out]
            merged = kernel.astype(jnp.float32) + lora.scale * delta.reshape(kernel.shape)
            layers[module][name] = {**layers[module][name], "kernel": merged.astype(kernel.dtype)}
    return {**params, "layers": layers}
