"""`jaxgen convert export-peft`: PEFT's tensor names, shapes and config, and B A == merge's delta.

Each family gets a tiny random model exported as a Hugging Face directory with a
character tokenizer, and a real LoRA fine-tuning run on top of it (two steps: B is no
longer zero). No torch here: benchmarks/hf_finetune_check.py loads the adapters with PEFT.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxgen.checkpoint import save_params
from jaxgen.cli import main
from jaxgen.config import load_config
from jaxgen.convert import hf_params
from jaxgen.convert.hf import write_hf
from jaxgen.convert.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapted_modules, export_peft, write_peft
from jaxgen.data.tokenizer_training import train_tokenizer
from jaxgen.errors import JaxgenError
from jaxgen.model import lora as lora_lib
from jaxgen.model.transformer import abstract_params, init_params
from jaxgen.train.finetune import finetune, load_adapters

ROOT = pathlib.Path(__file__).parent.parent
PRESETS = {"gpt2": "tiny", "llama": "tiny-llama"}
# Every projection each family has: GPT-2's q, k, v share the fused c_attn.
TARGETS = {"gpt2": "[q, k, v, o, mlp_in, mlp_out]", "llama": "[q, k, v, o, mlp_in, mlp_gate, mlp_out]"}
RANK, ALPHA = 4, 12.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """family -> a 2-step LoRA run whose base is an HF directory (model + tokenizer.model)."""
    return _make_runs(tmp_path_factory.mktemp("peft"))


def _make_runs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:6_000]
    lines = [line for line in text.splitlines() if line]
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    data = [f"data.train_files=[{sft}]", "data.format=sft", f"data.data_dir={root / 'data'}", "data.name=sft"]
    tokenizer = train_tokenizer(load_config(None, [*data, "tokenizer.kind=char", "tokenizer.vocab_size=100"]))
    out = {}
    for family, preset in PRESETS.items():
        model = load_config(None, [f"model.preset={preset}", "model.vocab_size=128"]).model
        params = _init(model)
        write_hf(root / f"hf-{family}", model, params, extra_from=tokenizer.parent)
        overrides = {
            "finetune.init_from": root / f"hf-{family}",
            "finetune.method": "lora",
            "finetune.lora.targets": TARGETS[family],
            "finetune.lora.rank": RANK,
            "finetune.lora.alpha": ALPHA,
            "model.dtype": "float32",
            "tokenizer.vocab_multiple": 8,
            "train.steps": 2,
            "train.batch_size": 8,
            "train.seq_len": 32,
            "train.log_every": 1,
            "checkpoint.every": 2,
            "checkpoint.async_save": False,
            "optimizer.learning_rate": 1e-2,
            "eval.max_batches": 1,
        }
        config = load_config(None, [*data, *(f"{k}={v}" for k, v in overrides.items())])
        finetune(config, root / f"lora-{family}")
        out[family] = root / f"lora-{family}"
    return out


def _init(model):
    return jax.jit(lambda rng: init_params(model, rng))(jax.random.key(0))  # eager init is slow


def _read(out: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    return config, safetensors.numpy.load_file(out / ADAPTER_WEIGHTS)


# ----------------------------------------------------------------------------- names, shapes, config


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cli_writes_peft_names_shapes_and_config(runs, tmp_path, family, capsys):
    assert main(["convert", "export-peft", str(runs[family]), str(tmp_path / "out"), "--step", "2"]) == 0
    assert "exported PEFT adapter" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config, tensors = _read(tmp_path / "out")
    d, f, r = 64, {"gpt2": 256, "llama": 176}[family], RANK
    base = runs[family].parent / f"hf-{family}"
    common = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": ALPHA, "bias": "none"}
    assert {k: config[k] for k in common} == common
    assert config["base_model_name_or_path"] == str(base)
    assert config["lora_dropout"] == 0.0 and config["use_rslora"] is False
    if family == "gpt2":
        # q, k, v: one rank-3r LoRA over the fused [D, 3D] Conv1D, alpha scaled to keep alpha / r.
        modules = {
            "c_attn": (3 * r, d, 3 * d),
            "attn.c_proj": (r, d, d),
            "c_fc": (r, d, f),
            "mlp.c_proj": (r, f, d),
        }
        assert config["fan_in_fan_out"] is True
        assert config["rank_pattern"] == {"c_attn": 3 * r}
        assert config["alpha_pattern"] == {"c_attn": 3 * ALPHA}
        prefix = "base_model.model.transformer.h.{i}."
    else:
        kv = 2 * 16  # 2 KV heads of 16
        modules = {
            "q_proj": (r, d, d), "k_proj": (r, d, kv), "v_proj": (r, d, kv), "o_proj": (r, d, d),
            "gate_proj": (r, d, f), "up_proj": (r, d, f), "down_proj": (r, f, d),
        }  # fmt: skip
        assert config["fan_in_fan_out"] is False
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        prefix = "base_model.model.model.layers.{i}."
    assert config["target_modules"] == sorted(modules)
    paths = {
        "c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj",
        "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    }  # fmt: skip
    expected = {}
    for i in range(2):
        for module, (rank, n_in, n_out) in modules.items():
            name = prefix.format(i=i) + paths[module]
            expected[f"{name}.lora_A.weight"] = (rank, n_in)
            expected[f"{name}.lora_B.weight"] = (n_out, rank)
    assert {n: t.shape for n, t in tensors.items()} == expected
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    b = tensors[prefix.format(i=1) + paths[sorted(modules)[0]] + ".lora_B.weight"]
    assert np.abs(b).max() > 0  # fine-tuning moved B off its zero init


# ----------------------------------------------------------------------------- the delta


def _hf_delta(model, delta, name: str, layer: int) -> np.ndarray:
    """The delta tree's blocks for HF module `name` (a template) at `layer`, in HF's layout."""
    blocks = [rule for rule in hf_params.rules(model) if rule.name == f"{name}.weight"]
    leaves = []
    for rule in sorted(blocks, key=lambda r: r.part):
        leaf = delta
        for key in rule.path:
            leaf = leaf[key]
        leaves.append(rule.to_hf(np.asarray(leaf[layer])))
    return np.concatenate(leaves, axis=-1)


def _peft_delta(config: dict, tensors: dict, suffix: str, module: str) -> np.ndarray:
    """What PEFT adds to the base weight: scaling B A, transposed for Conv1D (fan_in_fan_out)."""
    rank = config["rank_pattern"].get(suffix, config["r"])
    alpha = config["alpha_pattern"].get(suffix, config["lora_alpha"])
    delta = (
        alpha
        / rank
        * tensors[f"base_model.model.{module}.lora_B.weight"]
        @ tensors[f"base_model.model.{module}.lora_A.weight"]
    )  # [out, in]
    return delta.T if config["fan_in_fan_out"] else delta


@pytest.mark.parametrize(
    "family,targets",
    [("gpt2", None), ("gpt2", ("v", "o")), ("gpt2", ("q", "v", "mlp_out")), ("llama", None)],
)
def test_peft_delta_equals_merge(runs, tmp_path, family, targets):
    """B A (x alpha / r, in HF layout) reassembled from the written tensors == merge()'s delta,
    per layer and module: checks the fused c_attn blocks (and subsets of q/k/v)."""
    config, _, trainable = load_adapters(runs[family])
    adapters, lora = jax.device_get(trainable["lora"]), config.finetune.lora
    if targets is not None:  # the same trained adapters, fewer of them
        lora = lora.model_copy(update={"targets": targets})
        keep = {lora_lib.TARGET_MODULES[t] for t in targets}
        layers = adapters["layers"]
        adapters = {"layers": {m: {p: ab for p, ab in layers[m].items() if (m, p) in keep} for m in layers}}
    write_peft(tmp_path / "out", config.model, adapters, lora, "base")
    peft_config, tensors = _read(tmp_path / "out")
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_params(config.model))
    delta = lora_lib.merge(zeros, adapters, lora)  # base 0: the merged kernels are the deltas
    for name, (_, suffix) in adapted_modules(config.model, lora).items():
        for i in range(config.model.num_layers):
            mine = _peft_delta(peft_config, tensors, suffix, name.format(i=i))
            want = _hf_delta(config.model, delta, name, i)
            assert np.abs(want).max() > 1e-4, (name, i)  # a real, non-zero delta
            np.testing.assert_allclose(mine, want, atol=1e-6, rtol=0, err_msg=f"{name} layer {i}")


# ----------------------------------------------------------------------------- errors


def test_errors_are_one_line(runs, tmp_path, capsys):
    tiny = load_config(None, ["model.preset=tiny"])
    plain = save_params(tmp_path / "plain", tiny, _init(tiny.model))
    assert main(["convert", "export-peft", str(plain), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {plain}: not a LoRA run (finetune.method is full); export it with")

    def with_record(**changes):
        def load(run_dir, step=None):
            config, record, trainable = load_adapters(run_dir, step=step)
            return config, {**record, **changes}, trainable

        return load

    run = runs["gpt2"]
    with pytest.raises(JaxgenError, match=r"its base /x/base is a jaxgen run, not a Hugging Face model dir.*"
                       r"use `jaxgen finetune merge` then `jaxgen convert export-hf`"):  # fmt: skip
        export_peft(run, tmp_path / "a", load=with_record(kind="run", init_from="/x/base"))
    with pytest.raises(JaxgenError, match=r"the run added 4 tokens \(<a>, <b>, <c> ...\) whose embedding rows"
                       r" a PEFT LoRA adapter cannot carry; use `jaxgen finetune merge`"):  # fmt: skip
        export_peft(run, tmp_path / "b", load=with_record(added_tokens=["<a>", "<b>", "<c>", "<d>"]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(JaxgenError, match="already exists and is not empty"):
        export_peft(run, tmp_path / "full", load=load_adapters)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
