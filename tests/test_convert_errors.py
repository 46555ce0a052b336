"""Unsupported or broken Hugging Face input: one clear JaxgenError line each.

Also the inputs that look odd but are valid (GPT-2's original unprefixed names with
mask buffers, transformers 4.x `rope_theta`), which must load and not be rejected.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from jaxgen.config import load_config
from jaxgen.convert import hf, hf_config
from jaxgen.errors import JaxgenError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def variant(tmp_path, name, edit_config=None, edit_tensors=None) -> pathlib.Path:
    """A copy of a fixture with its config.json and/or tensors edited in place."""
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        with safetensors.safe_open(out / "model.safetensors", framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        edit_tensors(tensors)
        safetensors.numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def load_error(path) -> str:
    with pytest.raises(JaxgenError) as e:
        hf.load_hf(path, dtype="float32")
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_architecture_is_named_with_the_supported_ones(tmp_path):
    path = variant(tmp_path, "llama-tiny", lambda c: c.update(architectures=["MistralForCausalLM"]))
    message = load_error(path)
    assert "MistralForCausalLM is not implemented" in message
    assert "GPT2LMHeadModel, LlamaForCausalLM" in message
    assert "config.json" in message


@pytest.mark.parametrize(
    "edit, key",
    [
        (
            lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
            "rope_parameters.rope_type",
        ),
        (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type"),
        (lambda c: c.update(sliding_window=4096), "sliding_window"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_llama_fields_that_change_the_math_are_rejected(tmp_path, edit, key):
    assert f": {key}: " in load_error(variant(tmp_path, "llama-tiny", edit))


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c.update(activation_function="relu"), "activation_function"),
        (lambda c: c.update(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (lambda c: c.update(add_cross_attention=True), "add_cross_attention"),
    ],
)
def test_gpt2_fields_that_change_the_math_are_rejected(tmp_path, edit, key):
    assert f": {key}: " in load_error(variant(tmp_path, "gpt2-tiny", edit))


def test_missing_config_key_is_named(tmp_path):
    assert load_error(variant(tmp_path, "gpt2-tiny", lambda c: c.pop("n_layer"))).endswith("n_layer: missing")


def test_invalid_config_json_names_the_line(tmp_path):
    path = variant(tmp_path, "gpt2-tiny")
    (path / "config.json").write_text('{\n  "n_layer": 2,\n  oops\n}')
    assert "config.json:3: invalid JSON" in load_error(path)


def test_missing_tensor_is_named(tmp_path):
    path = variant(tmp_path, "llama-tiny", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "missing tensors for this config: model.layers.1.mlp.up_proj.weight" in load_error(path)


def test_unexpected_tensor_is_named(tmp_path):
    def add(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)

    path = variant(tmp_path, "llama-tiny", edit_tensors=add)
    assert "unexpected tensors for this config: model.layers.0.self_attn.q_norm.weight" in load_error(path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    path = variant(tmp_path, "llama-tiny", lambda c: c.update(intermediate_size=160))
    message = load_error(path)
    assert "model.layers.0.mlp.down_proj.weight: expected shape [64, 160], found [64, 176]" in message


def test_fused_attention_shape_mismatch(tmp_path):
    def shrink(t):
        t["transformer.h.1.attn.c_attn.weight"] = t["transformer.h.1.attn.c_attn.weight"][:, :128]

    message = load_error(variant(tmp_path, "gpt2-tiny", edit_tensors=shrink))
    assert "transformer.h.1.attn.c_attn.weight: expected shape [64, 192], found [64, 128]" in message


def test_no_safetensors_points_at_the_pickle(tmp_path):
    path = variant(tmp_path, "gpt2-tiny")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    message = load_error(path)
    assert "no model.safetensors or model.safetensors.index.json" in message and "pickle" in message


def test_index_naming_a_missing_shard(tmp_path):
    path = variant(tmp_path, "gpt2-tiny")
    (path / "model.safetensors").unlink()
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "shard model-00001-of-00002.safetensors not found" in load_error(path)


def test_integer_tensor_is_rejected(tmp_path):
    def to_int(t):
        t["transformer.ln_f.bias"] = t["transformer.ln_f.bias"].astype(np.int32)

    assert "transformer.ln_f.bias: unsupported dtype I32" in load_error(
        variant(tmp_path, "gpt2-tiny", edit_tensors=to_int)
    )


def test_bad_dtype_argument():
    with pytest.raises(JaxgenError, match=r"^dtype: 'int8' is not one of float32, bfloat16, float16$"):
        hf.load_hf(FIXTURES / "gpt2-tiny", dtype="int8")


def test_export_rejects_what_the_hf_class_cannot_express():
    gqa = load_config(None, ["model.family=gpt2", "model.num_kv_heads=2"]).model
    with pytest.raises(JaxgenError, match="GPT2LMHeadModel has no grouped-query attention"):
        hf_config.hf_config(gqa)


def test_original_gpt2_names_with_mask_buffers_and_tied_head_load(tmp_path):
    """GPT-2 as first released: no `transformer.` prefix, causal-mask buffers, lm_head copy."""

    def original(t):
        for key in list(t):
            t[key.removeprefix("transformer.")] = t.pop(key)
        for i in range(2):
            t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
            t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        t["lm_head.weight"] = t["wte.weight"].copy()

    _, params, _ = hf.load_hf(variant(tmp_path, "gpt2-tiny", edit_tensors=original), dtype="float32")
    _, reference, _ = hf.load_hf(FIXTURES / "gpt2-tiny", dtype="float32")
    np.testing.assert_array_equal(
        params["layers"]["attn"]["query"]["kernel"], reference["layers"]["attn"]["query"]["kernel"]
    )


def test_transformers_4_rope_theta_and_rotary_buffers(tmp_path):
    def v4(c):
        c.pop("rope_parameters")
        c.update(rope_theta=500000.0, rope_scaling=None)

    def buffers(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    config, _, _ = hf.load_hf(variant(tmp_path, "llama-tiny", v4, buffers), dtype="float32")
    assert config.model.rope_theta == 500000.0


def test_tied_llama_has_no_lm_head(tmp_path):
    """Llama 3.2-style tied embeddings: the file has no lm_head.weight and none is made."""
    path = variant(
        tmp_path,
        "llama-tiny",
        lambda c: c.update(tie_word_embeddings=True),
        lambda t: t.pop("lm_head.weight"),
    )
    config, params, _ = hf.load_hf(path, dtype="float32")
    assert config.model.tie_embeddings and "lm_head" not in params


def test_untied_llama_without_lm_head_is_missing_it(tmp_path):
    path = variant(tmp_path, "llama-tiny", edit_tensors=lambda t: t.pop("lm_head.weight"))
    assert load_error(path).endswith("missing tensors for this config: lm_head.weight")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    path = variant(tmp_path, "gpt2-tiny")
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}
    index["weight_map"]["transformer.h.9.attn.c_attn.weight"] = "model-00001-of-00001.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "transformer.h.9.attn.c_attn.weight is not in model-00001-of-00001.safetensors" in load_error(path)


def test_corrupt_safetensors_file(tmp_path):
    path = variant(tmp_path, "gpt2-tiny")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    assert "model.safetensors: cannot read safetensors" in load_error(path)
