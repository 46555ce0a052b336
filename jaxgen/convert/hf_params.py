"""Which Hugging Face tensor feeds which jaxgen parameter, and how it is reshaped.

Every mapping is "optionally transpose, then reshape" (and its inverse), so one
`Rule` per jaxgen leaf describes both directions:

- GPT-2 stores Conv1D weights as [in, out] (no transpose) and fuses q, k, v into
  `c_attn` [D, 3D]: each of query/key/value reads one third of its last axis.
- Llama stores nn.Linear weights as [out, in] (transpose). Its RoPE uses the
  half-split layout that jaxgen's `rope` implements, so q/k need no permutation.

Per-layer tensors (`{i}` in the name) map onto the stacked `[L, ...]` jaxgen leaf.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.errors import JaxgenError
from jaxgen.model.transformer import abstract_params

Path = tuple[str, ...]

# Tensors some HF files carry that are buffers, not parameters: GPT-2's causal-mask
# buffers and old Llama files' RoPE frequencies (jaxgen recomputes both).
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$|\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One jaxgen leaf <- one HF tensor (or one of `parts` blocks of its last axis).

    Attributes:
        path: the leaf's path in the params tree, e.g. ("layers", "attn", "query", "kernel").
        name: the HF tensor name; "{i}" stands for the layer index of a stacked leaf.
        hf_shape: the shape of the HF block this leaf reads (per layer).
        transpose: whether the HF block is stored transposed ([out, in]).
        part, parts: which block of the HF tensor's last axis (fused q/k/v).
    """

    path: Path
    name: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    part: int = 0
    parts: int = 1

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The shape of the whole HF tensor (all parts)."""
        return (*self.hf_shape[:-1], self.hf_shape[-1] * self.parts)

    def names(self, num_layers: int) -> list[str]:
        return [self.name.format(i=i) for i in range(num_layers)] if self.stacked else [self.name]

    def to_jax(self, block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF block -> jaxgen leaf (one layer's slice for stacked leaves)."""
        return (block.T if self.transpose else block).reshape(shape)

    def to_hf(self, leaf: np.ndarray) -> np.ndarray:
        """jaxgen leaf (one layer's slice) -> HF block; exact inverse of `to_jax`."""
        if self.transpose:
            return np.ascontiguousarray(leaf.reshape(self.hf_shape[::-1]).T)
        return leaf.reshape(self.hf_shape)


def _gpt2_rule(path: Path, m: ModelConfig, prefix: str) -> Rule:
    d, f, v = m.d_model, m.hidden_dim, m.vocab_size
    top = {
        ("embed", "embedding"): Rule(path, f"{prefix}wte.weight", (v, d)),
        ("pos_embed", "embedding"): Rule(path, f"{prefix}wpe.weight", (m.max_len, d)),
        ("final_norm", "scale"): Rule(path, f"{prefix}ln_f.weight", (d,)),
        ("final_norm", "bias"): Rule(path, f"{prefix}ln_f.bias", (d,)),
        ("lm_head",): Rule(path, "lm_head.weight", (v, d), transpose=True),
    }
    if path[0] != "layers":
        return top[path]
    h = f"{prefix}h.{{i}}."
    module, leaf = ".".join(path[1:-1]), path[-1]
    hf_leaf = "weight" if leaf in ("kernel", "scale") else "bias"
    if module in ("attn.query", "attn.key", "attn.value"):
        part = ("attn.query", "attn.key", "attn.value").index(module)
        shape = (d, d) if leaf == "kernel" else (d,)
        return Rule(path, f"{h}attn.c_attn.{hf_leaf}", shape, part=part, parts=3)
    names = {
        "attn_norm": "ln_1",
        "mlp_norm": "ln_2",
        "attn.out": "attn.c_proj",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
    }
    kernels = {"attn.out": (d, d), "mlp.up": (d, f), "mlp.down": (f, d)}
    if module in kernels:
        shape = kernels[module] if leaf == "kernel" else kernels[module][-1:]
    else:
        shape = (d,)  # LayerNorm scale and bias
    return Rule(path, f"{h}{names[module]}.{hf_leaf}", shape)


def _llama_rule(path: Path, m: ModelConfig, prefix: str) -> Rule:
    d, f, v = m.d_model, m.hidden_dim, m.vocab_size
    q, kv = m.num_heads * m.dim_per_head, m.kv_heads * m.dim_per_head
    top = {
        ("embed", "embedding"): Rule(path, f"{prefix}embed_tokens.weight", (v, d)),
        ("final_norm", "scale"): Rule(path, f"{prefix}norm.weight", (d,)),
        ("lm_head",): Rule(path, "lm_head.weight", (v, d), transpose=True),
    }
    if path[0] != "layers":
        return top[path]
    layer = f"{prefix}layers.{{i}}."
    module, leaf = ".".join(path[1:-1]), path[-1]
    if module in ("attn_norm", "mlp_norm"):
        norm = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}[module]
        return Rule(path, f"{layer}{norm}.weight", (d,))
    # module -> (HF name, nn.Linear weight shape [out, in])
    linear = {
        "attn.query": ("self_attn.q_proj", (q, d)),
        "attn.key": ("self_attn.k_proj", (kv, d)),
        "attn.value": ("self_attn.v_proj", (kv, d)),
        "attn.out": ("self_attn.o_proj", (d, q)),
        "mlp.gate": ("mlp.gate_proj", (f, d)),
        "mlp.up": ("mlp.up_proj", (f, d)),
        "mlp.down": ("mlp.down_proj", (d, f)),
    }
    name, shape = linear[module]
    if leaf == "kernel":
        return Rule(path, f"{layer}{name}.weight", shape, transpose=True)
    return Rule(path, f"{layer}{name}.bias", shape[:1])


def leaf_shapes(model: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
    """The jaxgen params tree as {path: abstract leaf}, in tree order."""

    # abstract_params, not nn.unbox: under an active mesh (fine-tuning reads an HF base
    # inside the training loop's) nn.unbox would apply sharding constraints to shapes.
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]
    return {tuple(k.key for k in keys): leaf for keys, leaf in flat}


def rules(model: ModelConfig, prefix: str | None = None) -> list[Rule]:
    """One rule per jaxgen leaf of `model`, in tree order.

    Args:
        prefix: the HF module prefix ("transformer." / "model."); GPT-2 files saved by
            the original release have none, so the reader passes "" for those.
    """
    if model.family == "gpt2":
        return [
            _gpt2_rule(p, model, "transformer." if prefix is None else prefix) for p in leaf_shapes(model)
        ]
    return [_llama_rule(p, model, "model." if prefix is None else prefix) for p in leaf_shapes(model)]


def hf_prefix(model: ModelConfig, names: list[str]) -> str:
    """The module prefix used by a file's tensor names (GPT-2 files exist with and without one)."""
    if model.family == "gpt2" and not any(n.startswith("transformer.") for n in names):
        return ""
    return "transformer." if model.family == "gpt2" else "model."


def expected_tensors(model: ModelConfig, rule_list: list[Rule]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> full shape, for every tensor the mapping reads or writes."""
    out: dict[str, tuple[int, ...]] = {}
    for rule in rule_list:
        for name in rule.names(model.num_layers):
            out[name] = rule.full_shape
    return out


def check_tensors(model: ModelConfig, rule_list: list[Rule], found: dict[str, tuple[int, ...]], where: str):
    """Raises a one-line error for missing, unexpected or misshapen tensors.

    Args:
        found: tensor name -> stored shape, for every tensor in the checkpoint.
    """
    expected = expected_tensors(model, rule_list)
    ignored = {n for n in found if _IGNORED.search(n)}
    if model.tie_embeddings and "lm_head.weight" in found:
        ignored.add("lm_head.weight")  # transformers ties it to the embedding on load too
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignored)
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise JaxgenError(f"{where}: {what} tensors for this config: {', '.join(names[:5])}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise JaxgenError(f"{where}: {name}: expected shape {list(shape)}, found {list(found[name])}")


def nbytes(shape: tuple[int, ...], dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
