"""Hugging Face `config.json` <-> jaxgen `ModelConfig`.

Only configs whose math jaxgen reproduces exactly are accepted: any field that
would change the forward pass and that jaxgen does not implement (RoPE scaling,
sliding windows, another activation, ...) is a one-line `JaxgenError` naming the
field, never a silently different model.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jaxgen.config import ModelConfig
from jaxgen.errors import JaxgenError

GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"
SUPPORTED = (GPT2, LLAMA)

# GPT-2's "gelu_new" and PyTorch's tanh approximation are the same function as
# jaxgen's `nn.gelu(approximate=True)`.
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


# config.json, generation_config.json and shard indexes are kilobytes to a few megabytes;
# a larger one is refused before it is read into memory.
MAX_JSON_BYTES = 64 << 20


def read_json(path: pathlib.Path) -> dict:
    """Reads a JSON object, or raises a one-line error naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise JaxgenError(
                f"{path}: {size:,} bytes is too large for a settings file (limit {MAX_JSON_BYTES:,})"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JaxgenError(f"{path}: not found") from None
    except OSError as e:
        raise JaxgenError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise JaxgenError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise JaxgenError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except (ValueError, RecursionError) as e:  # a number of > 4,300 digits; nesting past the stack
        raise JaxgenError(f"{path}: invalid JSON ({str(e).split(';')[0] or 'nested too deeply'})") from None
    if not isinstance(data, dict):
        raise JaxgenError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def architecture(hf: dict, where: str) -> str:
    """The single supported architecture a config names, or a one-line error."""
    archs = hf.get("architectures") or []
    if not archs:
        guess = {"gpt2": GPT2, "llama": LLAMA}.get(hf.get("model_type", ""))
        if guess:
            return guess
        raise JaxgenError(f"{where}: architectures: missing (supported: {', '.join(SUPPORTED)})")
    if len(archs) != 1 or archs[0] not in SUPPORTED:
        raise JaxgenError(
            f"{where}: architectures: {', '.join(map(str, archs))} is not implemented in jaxgen"
            f" (supported: {', '.join(SUPPORTED)})"
        )
    return archs[0]


def _require(hf: dict, key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise JaxgenError(f"{where}: {key}: missing")
    return hf[key]


def _reject(where: str, key: str, value: Any, why: str) -> None:
    raise JaxgenError(f"{where}: {key}: {value!r} is not supported ({why})")


def _gpt2_model(hf: dict, where: str) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        _reject(where, "activation_function", act, f"jaxgen's GPT-2 uses {' / '.join(_GPT2_ACTIVATIONS)}")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        _reject(
            where,
            "scale_attn_by_inverse_layer_idx",
            True,
            "attention scores are scaled by 1/sqrt(head_dim) only",
        )
    if hf.get("scale_attn_weights", True) is not True:
        _reject(where, "scale_attn_weights", hf["scale_attn_weights"], "attention scores are always scaled")
    if hf.get("add_cross_attention"):
        _reject(where, "add_cross_attention", True, "jaxgen is decoder-only")
    return dict(
        family="gpt2",
        vocab_size=_require(hf, "vocab_size", where),
        num_layers=_require(hf, "n_layer", where),
        d_model=_require(hf, "n_embd", where),
        num_heads=_require(hf, "n_head", where),
        mlp_dim=hf.get("n_inner"),
        max_len=_require(hf, "n_positions", where),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        attention_bias=True,
        mlp_bias=True,
    )


def rope_theta(hf: dict, where: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5.x) or `rope_theta` (4.x).

    Any scaling (linear, dynamic, yarn, llama3, ...) changes the rotation angles,
    so it is rejected rather than ignored.
    """
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and "rope_type" not in params:
        params = params["full_attention"]  # 5.x files may key parameters by layer type
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            _reject(where, key, value, "expected a mapping")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            _reject(where, f"{key}.rope_type", kind, "only the default RoPE is implemented")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def _llama_model(hf: dict, where: str) -> dict:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _reject(where, "hidden_act", act, "jaxgen's Llama MLP is SwiGLU (silu)")
    for key in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            _reject(where, key, hf[key], "jaxgen attends to the whole causal context without capping")
    if hf.get("use_sliding_window"):
        _reject(where, "use_sliding_window", True, "jaxgen attends to the whole causal context")
    d_model = _require(hf, "hidden_size", where)
    num_heads = _require(hf, "num_attention_heads", where)
    return dict(
        family="llama",
        vocab_size=_require(hf, "vocab_size", where),
        num_layers=_require(hf, "num_hidden_layers", where),
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or d_model // num_heads,
        mlp_dim=_require(hf, "intermediate_size", where),
        max_len=hf.get("max_position_embeddings", 2048),
        rope_theta=rope_theta(hf, where),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def model_fields(hf: dict, where: str) -> dict:
    """The `model:` section (a dict for `ModelConfig`) equivalent to an HF config.

    Args:
        hf: the parsed config.json; where: its path, for error messages.
    """
    if hf.get("auto_map") is not None:
        # transformers would import Python files from the model directory for these
        # classes (trust_remote_code); the math they define is unknown to jaxgen.
        named = hf["auto_map"]
        first = next(iter(named.values()), "") if isinstance(named, dict) and named else named
        raise JaxgenError(
            f"{where}: auto_map: {first!r} is custom model code; jaxgen never runs model code"
            " from a model directory (convert it to a supported architecture with transformers)"
        )
    arch = architecture(hf, where)
    return _gpt2_model(hf, where) if arch == GPT2 else _llama_model(hf, where)


def generate_fields(gen: dict) -> dict:
    """The `generate:` section that decodes as transformers' `generate` does by default.

    transformers decodes greedily unless generation_config.json sets `do_sample`, and
    then with top_k 50 unless it says otherwise; jaxgen's own defaults (sampling at
    temperature 1) differ, so an imported model carries HF's settings over.
    """
    out: dict = {"temperature": 0.0}
    if gen.get("do_sample"):
        out = {"temperature": gen.get("temperature", 1.0), "top_k": gen.get("top_k", 50) or 0}
        out["top_p"] = gen.get("top_p", 1.0)
    mapping = {
        "num_beams": "num_beams",
        "length_penalty": "length_penalty",
        "early_stopping": "early_stopping",
        "repetition_penalty": "repetition_penalty",
        "no_repeat_ngram_size": "no_repeat_ngram_size",
        "max_new_tokens": "max_new_tokens",
    }
    for hf_key, key in mapping.items():
        if gen.get(hf_key) is not None:
            out[key] = gen[hf_key]
    return out


# ----------------------------------------------------------------------------- export


def _no_other_layout(model: ModelConfig, what: str) -> None:
    if model.kv_heads != model.num_heads or model.dim_per_head * model.num_heads != model.d_model:
        raise JaxgenError(
            f"model: {what} has no grouped-query attention or explicit head_dim"
            f" (num_kv_heads={model.kv_heads}, head_dim={model.dim_per_head}); export a llama-family model"
        )


def hf_config(model: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """The config.json dict of the HF model that computes what `model` computes."""
    dtype = model.param_dtype
    common = dict(
        vocab_size=model.vocab_size,
        tie_word_embeddings=model.tie_embeddings,
        dtype=dtype,
        torch_dtype=dtype,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    if model.family == "gpt2":
        _no_other_layout(model, "GPT2LMHeadModel")
        return dict(
            architectures=[GPT2],
            model_type="gpt2",
            n_layer=model.num_layers,
            n_embd=model.d_model,
            n_head=model.num_heads,
            n_inner=model.mlp_dim,
            n_positions=model.max_len,
            n_ctx=model.max_len,
            activation_function="gelu_new",
            layer_norm_epsilon=model.norm_eps,
            attn_pdrop=0.0,
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            scale_attn_weights=True,
            use_cache=True,
            **common,
        )
    return dict(
        architectures=[LLAMA],
        model_type="llama",
        num_hidden_layers=model.num_layers,
        hidden_size=model.d_model,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.kv_heads,
        head_dim=model.dim_per_head,
        intermediate_size=model.hidden_dim,
        max_position_embeddings=model.max_len,
        rms_norm_eps=model.norm_eps,
        hidden_act="silu",
        attention_bias=model.use_attention_bias,
        mlp_bias=model.use_mlp_bias,
        # Both spellings, so transformers 4.x (rope_theta) and 5.x (rope_parameters) read the same base.
        rope_theta=model.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        attention_dropout=0.0,
        use_cache=True,
        **common,
    )
