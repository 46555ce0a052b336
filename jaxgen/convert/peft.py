"""Export a LoRA run's adapters as a PEFT LoRA adapter over its Hugging Face base.

PEFT's LoRA layer computes `y = base(x) + (lora_alpha / r) lora_B(lora_A(dropout(x)))`,
with `lora_A.weight` [r, in] and `lora_B.weight` [out, r] whatever the base layer's own
layout. jaxgen's adapter is A [*in, r], B [r, *out] over the same flattening of in/out
that hf_params uses for the kernel, so `lora_A = A^T` and `lora_B = B^T` per layer.

GPT-2 fuses q, k, v into one Conv1D, `c_attn` [D, 3D], and PEFT adapts whole modules.
The n adapted projections among q/k/v become one LoRA of rank n r over `c_attn`: its
lora_A stacks their A^T, and its lora_B puts each B^T in that projection's third of the
output rows and its own r columns, zeros elsewhere, so lora_B lora_A is exactly the sum
of the n deltas, each in its block. lora_alpha for that module is n alpha, keeping
alpha / r (`rank_pattern` / `alpha_pattern`). Conv1D stores [in, out]: `fan_in_fan_out`
tells PEFT to transpose B A when it merges.

The adapter cannot carry embedding rows a run added for new tokens, nor a base that is a
jaxgen run; such runs go out whole through `jaxgen finetune merge` + `export-hf`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import jax
import numpy as np
import safetensors.numpy

from jaxgen.checkpoint import read_run_config
from jaxgen.config import LORA_TARGETS, LoraConfig, ModelConfig
from jaxgen.convert import hf_files, hf_params
from jaxgen.errors import JaxgenError
from jaxgen.model.lora import TARGET_MODULES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM's name for the model it wraps
_WHOLE = "use `jaxgen finetune merge` then `jaxgen convert export-hf` to export the whole model"


def export_peft(
    run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *, load: Callable, step: int | None = None
) -> list[str]:
    """Writes a LoRA run's adapters as a PEFT adapter directory.

    Args:
        load: `(run_dir, step=) -> (Config, fine-tuning record, trainable tree)`; the CLI
            passes `jaxgen.train.finetune.load_adapters` (train/ sits above this package).
    Returns:
        the names of the files written.
    """
    run_dir = pathlib.Path(run_dir)
    method = read_run_config(run_dir).finetune.method
    if method != "lora":
        raise JaxgenError(
            f"{run_dir}: not a LoRA run (finetune.method is {method}); export it with"
            " `jaxgen convert export-hf`"
        )
    config, record, trainable = load(run_dir, step=step)
    if record["kind"] != "hf":
        raise JaxgenError(
            f"{run_dir}: its base {record['init_from']} is a jaxgen run, not a Hugging Face model"
            f" directory, so PEFT has no base to load the adapter onto; {_WHOLE}"
        )
    if record["added_tokens"]:
        added = ", ".join(record["added_tokens"][:3]) + (" ..." if len(record["added_tokens"]) > 3 else "")
        raise JaxgenError(
            f"{run_dir}: the run added {len(record['added_tokens'])} tokens ({added}) whose embedding"
            f" rows a PEFT LoRA adapter cannot carry; {_WHOLE}"
        )
    adapters = jax.device_get(trainable["lora"])  # sharded arrays -> whole host arrays
    return write_peft(out_dir, config.model, adapters, config.finetune.lora, record["init_from"])


def write_peft(
    out_dir: str | pathlib.Path, model: ModelConfig, adapters, lora: LoraConfig, base_model_path: str
) -> list[str]:
    """Writes `adapter_config.json` and `adapter_model.safetensors` (float32).

    Args:
        model: the base's model config (GPT-2 or Llama).
        adapters: the "lora" tree, {"layers": {"attn"|"mlp": {proj: {"a": [L, *in, r],
            "b": [L, r, *out]}}}}, host or device arrays.
        lora: the run's LoraConfig (rank, alpha, dropout, targets).
        base_model_path: written as `base_model_name_or_path`.
    Returns:
        the names of the files written.
    """
    tensors, modules = peft_tensors(model, adapters, lora)
    fan_in_fan_out = {not rules[0].transpose for rules, _ in modules.values()}
    assert len(fan_in_fan_out) == 1, fan_in_fan_out  # one family: all Conv1D or all Linear
    patterns = {suffix: n for _, (rules, suffix) in modules.items() if (n := len(rules)) > 1}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(suffix for _, suffix in modules.values()),
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "bias": "none",
        "use_rslora": False,  # jaxgen scales by alpha / r
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {suffix: lora.rank * n for suffix, n in patterns.items()},
        "alpha_pattern": {suffix: lora.alpha * n for suffix, n in patterns.items()},
    }
    with hf_files.staged_dir(out_dir) as tmp:
        safetensors.numpy.save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])


def adapted_modules(model: ModelConfig, lora: LoraConfig) -> dict[str, tuple[list[hf_params.Rule], str]]:
    """HF module name template ("transformer.h.{i}.attn.c_attn") -> (the kernel rules of
    the adapted projections it holds, in part order; its `target_modules` name).

    The name is the module path's shortest dotted suffix that no other module of the model
    ends with ("q_proj", but "attn.c_proj" beside GPT-2's "mlp.c_proj"): PEFT matches
    `target_modules` and pattern keys as such suffixes.
    """
    rule_list = hf_params.rules(model)
    by_path = {rule.path: rule for rule in rule_list}
    every = {rule.name.rsplit(".", 1)[0] for rule in rule_list}  # all module name templates
    out: dict[str, tuple[list[hf_params.Rule], str]] = {}
    for target in (t for t in LORA_TARGETS if t in lora.targets):
        rule = by_path[("layers", *TARGET_MODULES[target], "kernel")]
        name = rule.name.removesuffix(".weight")
        out.setdefault(name, ([], _unique_suffix(name, every)))[0].append(rule)
    for rules, _ in out.values():
        rules.sort(key=lambda r: r.part)
    return out


def _unique_suffix(name: str, every: set[str]) -> str:
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if not any(o != name and (o == suffix or o.endswith("." + suffix)) for o in every):
            return suffix
    return name


def peft_tensors(model: ModelConfig, adapters, lora: LoraConfig):
    """({PEFT tensor name: float32 array}, `adapted_modules`) for every layer's adapters."""
    modules = adapted_modules(model, lora)
    r = lora.rank
    tensors: dict[str, np.ndarray] = {}
    for name, (rules, _) in modules.items():
        for i in range(model.num_layers):
            a_rows, b_blocks = [], []  # per adapted projection: A^T [r, in], B^T [out_part, r]
            for rule in rules:
                ab = adapters["layers"][rule.path[1]][rule.path[2]]
                a = np.asarray(ab["a"][i], np.float32).reshape(-1, r)  # [in, r]
                b = np.asarray(ab["b"][i], np.float32).reshape(r, -1)  # [r, out_part]
                a_rows.append(a.T)
                b_blocks.append((rule, b.T))
            width = b_blocks[0][1].shape[0]
            lora_b = np.zeros((width * rules[0].parts, r * len(rules)), np.float32)  # [out, n r]
            for j, (rule, block) in enumerate(b_blocks):
                lora_b[rule.part * width : (rule.part + 1) * width, j * r : (j + 1) * r] = block
            module = PREFIX + name.format(i=i)
            # Contiguous: safetensors writes the buffer as laid out, and a concatenation of
            # transposed views keeps their column-major layout.
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(a_rows))  # [n r, in]
            tensors[f"{module}.lora_B.weight"] = lora_b
    return tensors, modules
