"""Hugging Face import/export: logit and decoding parity, round trips, file layout.

The references in tests/fixtures/hf were computed by transformers itself (see the
README there); tolerances are the fixed 1e-4 used against external references.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from param_trees import assert_bit_identical, leaves

import jaxgen
from jaxgen.config import MeshConfig
from jaxgen.convert import hf
from jaxgen.runtime.mesh import make_mesh

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
NAMES = ("gpt2-tiny", "llama-tiny")


def cases(name: str) -> dict:
    return json.loads((FIXTURES / name / "cases.json").read_text())


@pytest.fixture(scope="module", params=NAMES)
def imported(request):
    """(fixture name, LanguageModel) converted in memory in float32 by `jaxgen.load`."""
    lm = jaxgen.load(FIXTURES / request.param, dtype="float32")
    assert lm.tokenizer is None  # the fixtures ship no tokenizer files
    return request.param, lm


def test_config_mapping(imported):
    name, lm = imported
    m = lm.config.model
    assert (m.vocab_size, m.num_layers, m.d_model, m.num_heads, m.norm_eps) == (512, 2, 64, 4, 1e-5)
    assert (m.dtype, m.param_dtype) == ("float32", "float32")
    assert lm.config.generate.temperature == 0.0  # no do_sample: transformers decodes greedily
    if name == "gpt2-tiny":
        assert (m.family, m.tie_embeddings, m.max_len, m.hidden_dim) == ("gpt2", True, 64, 256)
    else:
        assert (m.family, m.tie_embeddings, m.kv_heads, m.dim_per_head) == ("llama", False, 2, 16)
        assert (m.hidden_dim, m.rope_theta, m.max_len) == (176, 10000.0, 128)


def test_logits_match_transformers(imported):
    name, lm = imported
    reference = np.load(FIXTURES / name / "logits.npy")  # [2, 16, 512]
    np.testing.assert_allclose(lm.logits(cases(name)["input_ids"]), reference, rtol=0, atol=1e-4)


def test_greedy_ids_match_transformers(imported):
    name, lm = imported
    greedy = cases(name)["greedy"]
    (result,) = lm.generate([greedy["prompt"]], max_new_tokens=greedy["max_new_tokens"])
    assert greedy["prompt"] + result.tokens == greedy["output_ids"]


def test_beam_search_matches_transformers(imported):
    name, lm = imported
    case = cases(name)["beam"]
    (result,) = lm.generate(
        [case["prompt"]],
        max_new_tokens=case["max_new_tokens"],
        num_beams=case["num_beams"],
        num_return_sequences=case["num_return_sequences"],
        length_penalty=case["length_penalty"],
        early_stopping=case["early_stopping"],
    )
    assert [case["prompt"] + c for c in result.completions] == case["output_ids"]
    np.testing.assert_allclose(result.scores, case["sequences_scores"], rtol=0, atol=1e-4)


def test_write_then_load_is_bit_identical_and_matches_transformers_layout(imported, tmp_path):
    name, lm = imported
    config, params = lm.config, lm.params
    files = hf.write_hf(tmp_path / "out", config.model, params, bos_id=511, eos_id=511)
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    with (
        safetensors.safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as ours,
        safetensors.safe_open(FIXTURES / name / "model.safetensors", framework="numpy") as theirs,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys())
        assert ours.metadata() == {"format": "pt"}
        for key in theirs.keys():
            a, b = ours.get_tensor(key), theirs.get_tensor(key)
            assert (a.shape, a.dtype) == (b.shape, b.dtype), key
            # Only transposes/reshapes happen, so the values come back exactly.
            np.testing.assert_array_equal(a, b, err_msg=key)
    again, params2, _ = hf.load_hf(tmp_path / "out", dtype="float32")
    assert again.model == config.model
    assert_bit_identical(params, params2)


def test_exported_config_reads_back_as_the_fixture_config(imported, tmp_path):
    name, lm = imported
    hf.write_hf(tmp_path / "out", lm.config.model, lm.params, bos_id=511, eos_id=511)
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    theirs = json.loads((FIXTURES / name / "config.json").read_text())
    shared = """architectures model_type vocab_size tie_word_embeddings bos_token_id eos_token_id
        n_layer n_embd n_head n_positions layer_norm_epsilon activation_function
        num_hidden_layers hidden_size num_attention_heads num_key_value_heads head_dim
        intermediate_size rms_norm_eps rope_parameters attention_bias mlp_bias hidden_act""".split()
    for key in shared:
        if key in theirs:
            assert ours[key] == theirs[key], key


def test_sharded_export_round_trips(tmp_path):
    config, params, _ = hf.load_hf(FIXTURES / "llama-tiny", dtype="float32")
    files = hf.write_hf(tmp_path / "out", config.model, params, max_shard_bytes=60_000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    sizes = [(tmp_path / "out" / f).stat().st_size for f in shards]
    assert max(sizes) < 60_000 + 131_072 + 4096  # one oversized tensor (embed, 128 KiB) may stand alone
    _, again, _ = hf.load_hf(tmp_path / "out", dtype="float32")
    assert_bit_identical(params, again)


def test_import_places_params_on_the_mesh_sharding():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    config, params, _ = hf.load_hf(FIXTURES / "llama-tiny", dtype="float32", mesh=mesh)
    _, single, _ = hf.load_hf(FIXTURES / "llama-tiny", dtype="float32")
    kernel = params["layers"]["mlp"]["gate"]["kernel"]  # [L, D, F]: embed -> fsdp, mlp -> tensor
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 32, 88)
    assert_bit_identical(params, single)


def test_serving_import_equals_the_stacked_import_unstacked():
    from jaxgen.model.serving import unstack_layers

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    config, stacked, _ = hf.load_hf(FIXTURES / "llama-tiny", dtype="float32", mesh=mesh)
    _, serving, _ = hf.load_hf(FIXTURES / "llama-tiny", dtype="float32", mesh=mesh, serving=True)
    want = unstack_layers(stacked, config.model)
    assert isinstance(serving["layers"], tuple) and len(serving["layers"]) == config.model.num_layers
    assert_bit_identical(serving, want)
    for a, b in zip(jax.tree.leaves(serving), jax.tree.leaves(want), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def test_bfloat16_import_rounds_each_tensor_once():
    config, params, _ = hf.load_hf(FIXTURES / "gpt2-tiny", dtype="bfloat16")
    _, params32, _ = hf.load_hf(FIXTURES / "gpt2-tiny", dtype="float32")
    assert (config.model.dtype, config.model.param_dtype) == ("auto", "bfloat16")
    for key, leaf in leaves(params).items():
        assert leaf.dtype == jnp.bfloat16, key
        np.testing.assert_array_equal(leaf, leaves(params32)[key].astype(jnp.bfloat16), err_msg=key)


def test_dtype_defaults_to_the_checkpoint_dtype():
    config = hf.read_config(FIXTURES / "llama-tiny")
    assert config.model.param_dtype == "float32"  # config.json says "dtype": "float32"


def test_generation_config_maps_to_hf_default_decoding():
    from jaxgen.convert.hf_config import generate_fields

    assert generate_fields({}) == {"temperature": 0.0}  # transformers: greedy unless do_sample
    llama = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 64}
    assert generate_fields(llama) == {"temperature": 0.6, "top_k": 50, "top_p": 0.9, "max_new_tokens": 64}
    beams = {"num_beams": 5, "early_stopping": True, "length_penalty": 0.8, "no_repeat_ngram_size": 3}
    assert generate_fields(beams) == {"temperature": 0.0, **beams}
