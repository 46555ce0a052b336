"""Fine-tuning: loss masks, what each method trains, LoRA merge, vocab growth, resume, bad input.

One tiny base run (character tokenizer, 2 layers) is pretrained once per module on
Shakespeare lines written either all upper- or all lower-case, as `{"text": ...}`
records: the base then starts a line in either case about equally often.
"""

import json
import math
import pathlib
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import checkpoint
from jaxgen.config import LoraConfig, load_config
from jaxgen.errors import JaxgenError
from jaxgen.model import lora as lora_lib
from jaxgen.model import vocab
from jaxgen.model.transformer import Transformer, init_params
from jaxgen.runtime.mesh import activate, make_mesh
from jaxgen.train.finetune import finetune, load_adapters, load_run_params
from jaxgen.train.loop import train
from jaxgen.train.step import TrainStep
from jaxgen.train.tuning import Tuning

ROOT = pathlib.Path(__file__).parent.parent
CASES = ("lower", "upper")


def _lines(n: int, seed: int) -> list[dict]:
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    lines = [line for line in text.splitlines() if len(line) > 20]
    rng = random.Random(seed)
    out = []
    for line in rng.sample(lines, n):
        case = rng.choice(CASES)
        out.append({"text": line.upper() if case == "upper" else line.lower(), "attributes": {"case": case}})
    return out


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _common(root: pathlib.Path, **extra) -> list[str]:
    base = {
        "model.preset": "tiny",
        "model.dtype": "float32",
        "model.max_len": 48,
        "tokenizer.kind": "char",
        "tokenizer.vocab_size": 100,
        "tokenizer.vocab_multiple": 8,
        "data.format": "sft",
        "data.data_dir": str(root / "prepared"),
        "train.batch_size": 16,
        "train.seq_len": 48,
        "train.log_every": 10,
        "checkpoint.async_save": False,
        "optimizer.learning_rate": 3e-3,
        "optimizer.weight_decay": 0.0,
        "schedule.warmup_steps": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> pathlib.Path:
    """A pretrained base: both cases, no attributes (the field is absent from its records)."""
    root = tmp_path_factory.mktemp("finetune")
    records = [{"text": r["text"]} for r in _lines(1500, seed=0)]
    corpus = _write_jsonl(root / "pretrain.jsonl", records)
    overrides = _common(
        root,
        **{
            "data.name": "pretrain",
            "data.train_files": f"[{corpus}]",
            "train.steps": 300,
            "checkpoint.every": 300,
        },
    )
    train(load_config(None, overrides), root / "base")
    _write_jsonl(root / "styled.jsonl", _lines(1500, seed=1))
    return root / "base"


def _ft_config(base_run: pathlib.Path, **extra):
    root = base_run.parent
    values = {
        "finetune.init_from": str(base_run),
        "data.name": "styled",
        "data.train_files": f"[{root / 'styled.jsonl'}]",
        "train.steps": 20,
        "checkpoint.every": 10,
    }
    values.update(extra)
    return load_config(None, _common(root, **values))


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- the step


def test_prompt_targets_do_not_touch_loss_or_gradients(tiny_config):
    """Loss-masked positions (prompt tokens) may hold any target: loss and gradients are equal bit for bit."""
    mesh = make_mesh(tiny_config.mesh)
    with activate(mesh):
        step = TrainStep.from_config(tiny_config, mesh)
        state = step.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 512, (8, 32), dtype=np.int32)
        mask = np.zeros((8, 32), np.int32)
        mask[:, 20:] = 1  # the "response"
        batch = {
            "tokens": tokens,
            "targets": rng.integers(0, 512, (8, 32), dtype=np.int32),
            "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy(),
            "segment_ids": np.ones((8, 32), np.int32),
            "loss_mask": mask,
        }
        other = dict(batch, targets=np.where(mask == 1, batch["targets"], (batch["targets"] + 7) % 512))
        grad = jax.jit(jax.grad(lambda p, b: step.loss_sums(p, b, jax.random.key(1), frozen={})[0]))
        loss = jax.jit(lambda p, b: step.loss_sums(p, b, jax.random.key(1), frozen={})[0])
        assert float(loss(state.params, batch)) == float(loss(state.params, other))
        jax.tree.map(np.testing.assert_array_equal, grad(state.params, batch), grad(state.params, other))
        # ... and the test can fail: a changed trained target moves the loss.
        moved = dict(batch, targets=(batch["targets"] + 7) % 512)
        assert float(loss(state.params, batch)) != float(loss(state.params, moved))


def test_grown_vocab_keeps_old_rows_and_old_token_logits(tiny_config):
    m = tiny_config.model.model_copy(update={"vocab_size": 96, "tie_embeddings": False})
    params = init_params(m, jax.random.key(0))
    grown = vocab.grow(params, m, 128, first_new=90, count=3)
    g = m.model_copy(update={"vocab_size": 128})
    old, new = params["embed"]["embedding"], grown["embed"]["embedding"]
    np.testing.assert_array_equal(new[:90], old[:90])
    np.testing.assert_array_equal(new[93:96], old[93:96])  # old padding rows stay
    mean = np.asarray(old[:90]).mean(0)
    np.testing.assert_allclose(new[90:93], np.broadcast_to(mean, (3, 64)), atol=1e-7)
    np.testing.assert_allclose(new[96:], np.broadcast_to(mean, (32, 64)), atol=1e-7)
    np.testing.assert_array_equal(grown["lm_head"][:, :90], params["lm_head"][:, :90])
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 90)  # old tokens only
    pos = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    before = Transformer(m).apply({"params": params}, tokens, pos)[0]
    after = Transformer(g).apply({"params": grown}, tokens, pos)[0]
    np.testing.assert_array_equal(after[..., :90], before[..., :90])  # old tokens' logits
    np.testing.assert_array_equal(after[..., 93:96], before[..., 93:96])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_lora_logits_equal_unmerged(tiny_config, tiny_llama_config, family):
    m = (tiny_config if family == "gpt2" else tiny_llama_config).model
    lora = LoraConfig(rank=4, alpha=8, targets=lora_lib.valid_targets(m))
    params = init_params(m, jax.random.key(0))
    adapters = lora_lib.init_adapters(m, lora, jax.random.key(1))
    # B starts at zero; random B makes the adapters do something.
    keys = iter(jax.random.split(jax.random.key(2), 100))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, m.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(24), tokens.shape)
    unmerged = Transformer(m, lora=lora).apply({"params": params, "lora": adapters}, tokens, pos)[0]
    merged = Transformer(m).apply({"params": lora_lib.merge(params, adapters, lora)}, tokens, pos)[0]
    base = Transformer(m).apply({"params": params}, tokens, pos)[0]
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapters matter


def test_lr_multipliers_and_partial_freeze_groups(tiny_config):
    m = tiny_config.model
    ft = load_config(
        None,
        [
            "finetune.method=freeze",
            "finetune.freeze=[layers/0, embed]",
            "finetune.lr_multipliers={lm_head: 2}",
        ],
    ).finetune
    with pytest.raises(JaxgenError, match="lr_multipliers: 'lm_head' matches no trainable parameter"):
        Tuning.from_config(ft).labels(m)  # tied embeddings: there is no lm_head
    with pytest.raises(JaxgenError, match="layer ranges are for finetune.freeze only"):
        Tuning.from_config(ft.model_copy(update={"lr_multipliers": {"layers/0-1": 0.5}}))
    ft = ft.model_copy(update={"lr_multipliers": {"*/mlp/*": 0.5}})
    tuning = Tuning.from_config(ft, new_rows=(500, 4))
    labels = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tuning.labels(m))}
    masks = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tuning.trainable_masks(m))
    }
    assert labels["['layers']['mlp']['up']['kernel']"] == "x0.5"
    assert labels["['final_norm']['scale']"] == "x1.0"
    np.testing.assert_array_equal(masks["['layers']['attn']['query']['kernel']"].ravel(), [0, 1])
    rows = masks["['embed']['embedding']"].ravel()  # frozen, but this run's 4 rows train
    assert rows.sum() == 4 and rows[500:504].all()


# ----------------------------------------------------------------------------- whole runs


def _trainable_count(tree) -> int:
    """Elements of the tree's arrays (scalars such as Adam's step count left out)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if len(x.shape))


def test_full_finetune_resumes_exactly_and_meshes_agree(base_run, tmp_path):
    straight = finetune(_ft_config(base_run), tmp_path / "straight")
    assert straight.losses[-1] < straight.losses[0]
    record = json.loads((tmp_path / "straight" / "finetune.json").read_text())
    assert record["added_tokens"] == ["<case=lower>", "<case=upper>"]
    resumed_dir = tmp_path / "resumed"
    finetune(_ft_config(base_run), resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "20")
    # init_from is read only for a fresh run: a broken one does not matter when resuming.
    resumed = finetune(_ft_config(base_run, **{"finetune.init_from": "/nonexistent"}), resumed_dir)
    assert resumed.losses == straight.losses[10:]
    _, a = load_run_params(resumed_dir)
    _, b = load_run_params(tmp_path / "straight")
    jax.tree.map(np.testing.assert_array_equal, a, b)

    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    other = finetune(_ft_config(base_run, **mesh), tmp_path / "mesh")
    np.testing.assert_allclose(other.losses, straight.losses, atol=1e-6, rtol=0)


def test_freeze_keeps_frozen_params_bit_identical(base_run, tmp_path):
    cfg = _ft_config(
        base_run,
        **{"finetune.method": "freeze", "finetune.freeze": "[embed, layers/0, final_norm, '*/attn/*']"},
    )
    finetune(cfg, tmp_path / "run")
    _, base = checkpoint.load_params(base_run)
    _, tuned = checkpoint.load_params(tmp_path / "run")
    base, tuned = jax.device_get(base), jax.device_get(tuned)
    first = json.loads((tmp_path / "run" / "finetune.json").read_text())["first_new_id"]
    np.testing.assert_array_equal(tuned["embed"]["embedding"][:first], base["embed"]["embedding"][:first])
    assert not np.array_equal(
        tuned["embed"]["embedding"][first : first + 2], base["embed"]["embedding"][first:][:2]
    )
    np.testing.assert_array_equal(tuned["final_norm"]["scale"], base["final_norm"]["scale"])
    layers_b, layers_t = _leaves(base["layers"]), _leaves(tuned["layers"])
    for name, value in layers_b.items():
        np.testing.assert_array_equal(layers_t[name][0], value[0], err_msg=name)  # layer 0 frozen
    assert any(not np.array_equal(layers_t[n][1], v[1]) for n, v in layers_b.items())  # layer 1 trained
    # Optimizer state: only trainable leaves carry Adam moments.
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        tuning = Tuning.from_config(cfg.finetune, new_rows=(first, 2))
        resolved = checkpoint.read_run_config(tmp_path / "run")
        step = TrainStep.from_config(resolved, mesh, tuning)
        opt_bytes = _trainable_count(step.abstract_state().opt_state)
        full = TrainStep.from_config(resolved, mesh)
        full_opt = _trainable_count(full.abstract_state().opt_state)
    # Wholly frozen leaves (final norm, attention) hold no moments; leaves frozen in part
    # (layer 0 of the MLP, the embedding but for its added rows) keep whole-size moments.
    frozen_size = _trainable_count(base["final_norm"]) + _trainable_count(base["layers"]["attn"])
    assert opt_bytes == full_opt - 2 * frozen_size
    np.testing.assert_array_equal(
        tuned["layers"]["attn"]["query"]["kernel"], base["layers"]["attn"]["query"]["kernel"]
    )


def test_lora_base_frozen_adapters_trained_and_resume_exact(base_run, tmp_path):
    lora = {"finetune.method": "lora", "finetune.lora.targets": "[q, v, mlp_in]", "finetune.lora.rank": 4}
    straight = finetune(_ft_config(base_run, **lora), tmp_path / "straight")
    config, record, trainable = load_adapters(tmp_path / "straight")
    assert set(trainable) == {"lora", "rows"}
    assert trainable["rows"]["embed"].shape == (2, config.model.d_model)
    b = trainable["lora"]["layers"]["attn"]["query"]["b"]
    assert float(jnp.abs(b).max()) > 0  # B started at zero
    # Checkpoints hold the adapters and rows only.
    ckpt = checkpoint.checkpoint_dir(tmp_path / "straight") / "20" / "params"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    _, base = checkpoint.load_params(base_run)
    assert size < 4 * _trainable_count(base) / 4, size  # far below the base's float32 bytes
    # The optimizer state counts adapter leaves only.
    mesh = make_mesh(config.mesh)
    with activate(mesh):
        new_rows = (record["first_new_id"], len(record["added_tokens"]))
        step = TrainStep.from_config(config, mesh, Tuning.from_config(config.finetune, new_rows))
        moments = _trainable_count(step.abstract_state().opt_state)
    assert moments == 2 * _trainable_count(trainable)

    resumed_dir = tmp_path / "resumed"
    finetune(_ft_config(base_run, **lora), resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "20")
    resumed = finetune(_ft_config(base_run, **lora), resumed_dir)
    assert resumed.losses == straight.losses[10:]
    jax.tree.map(np.testing.assert_array_equal, load_adapters(resumed_dir)[2], trainable)
    # The base is untouched on disk, and merging (finetune merge) writes a plain run.
    from jaxgen.train.finetune import merge_run

    merged = merge_run(tmp_path / "straight", tmp_path / "merged")
    _, merged_params = checkpoint.load_params(merged)
    _, on_the_fly = load_run_params(tmp_path / "straight")
    jax.tree.map(np.testing.assert_array_equal, merged_params, on_the_fly)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(base_run, tmp_path):
    def fails(match, **extra):
        with pytest.raises(JaxgenError, match=match):
            finetune(_ft_config(base_run, **extra), tmp_path / f"run{len(list(tmp_path.iterdir()))}")

    fails(
        r"finetune.init_from: .*/missing does not exist", **{"finetune.init_from": str(tmp_path / "missing")}
    )
    (tmp_path / "empty").mkdir()
    fails(r"finetune.init_from: .*/empty is not a model", **{"finetune.init_from": str(tmp_path / "empty")})
    fails(r"model.d_model: 128 differs from the fine-tuned model's 64 and would change parameter shapes",
          **{"model.d_model": 128})  # fmt: skip
    fails(r"finetune.lora.targets: 'mlp_gate' matches no projection of a gpt2 model \(valid: q, k, v, o,",
          **{"finetune.method": "lora", "finetune.lora.targets": "[q, mlp_gate]"})  # fmt: skip
    fails(r"finetune.lora.rank: 100 exceeds the 64 x 64 matrix of target 'q'",
          **{"finetune.method": "lora", "finetune.lora.rank": 100})  # fmt: skip
    fails(r"finetune.freeze: 'decoder/\*' matches no parameter",
          **{"finetune.method": "freeze", "finetune.freeze": "[embed, decoder/*]"})  # fmt: skip
    fails(r"finetune.freeze: 'layers/1-5' names layers 1-5 but the model has 0-1",
          **{"finetune.method": "freeze", "finetune.freeze": "[layers/1-5]"})  # fmt: skip
    bad = tmp_path / "bad_attrs.jsonl"
    bad.write_text(
        '{"text": "fine", "attributes": {"case": "lower"}}\n{"text": "x", "attributes": {"case": 3}}\n'
    )
    strict = {"data.train_files": f"[{bad}]", "data.bad_lines": "strict"}  # skipped by default
    fails(rf"{bad}:2: field 'attributes' must map strings to strings", **strict)
    dropout_ok = _ft_config(base_run, **{"model.dropout": 0.1, "train.steps": 2, "checkpoint.every": 2})
    assert finetune(dropout_ok, tmp_path / "dropout").step == 2  # a shape-free field may change


# ----------------------------------------------------------------------------- attribute control


def test_context_length_changes_only_for_rotary_positions(tiny_config, tiny_llama_config):
    """A llama run may fine-tune at a longer context (no parameter depends on it); GPT-2's
    position table would change shape, so the same change is one clear line."""
    from jaxgen.train.finetune import finetuned_model

    longer = lambda base: load_config(None, [f"model.preset={base}", "model.max_len=512"])  # noqa: E731
    grown = finetuned_model(tiny_llama_config.model, longer("tiny-llama"), tiny_llama_config.model.vocab_size)
    assert grown.max_len == 512 and grown.d_model == tiny_llama_config.model.d_model
    with pytest.raises(
        JaxgenError, match=r"model.max_len: 512 differs from .* would change parameter shapes"
    ):
        finetuned_model(tiny_config.model, longer("tiny"), tiny_config.model.vocab_size)


def _case_rates(lm, samples: int) -> dict[str, float]:
    """Per attribute value: the share of sampled lines written in that case."""
    rates = {}
    for case in CASES:
        results = lm.generate(
            [""] * samples, control={"case": case}, max_new_tokens=24, temperature=1.0, seed=3
        )
        hits = 0
        for r in results:
            upper = sum(c.isupper() for c in r.text)
            lower = sum(c.islower() for c in r.text)
            hits += (upper > lower) if case == "upper" else (lower > upper)
        rates[case] = hits / samples
    return rates


def test_attribute_control_end_to_end(base_run, tmp_path):
    import jaxgen

    # Before: the base with the control tokens added (their rows at the mean, untrained).
    untrained = finetune(
        _ft_config(base_run, **{"train.steps": 1, "optimizer.learning_rate": 1e-9}), tmp_path / "t0"
    )
    assert untrained.step == 1
    before = _case_rates(jaxgen.load(tmp_path / "t0"), 50)
    finetune(_ft_config(base_run, **{"train.steps": 150, "checkpoint.every": 150}), tmp_path / "tuned")
    lm = jaxgen.load(tmp_path / "tuned")
    after = _case_rates(lm, 50)
    print("case rates before", before, "after", after)
    assert min(after.values()) >= 0.9, after
    # About chance before: the control token does not steer the base (either case ~half the time).
    assert all(0.2 <= rate <= 0.8 for rate in before.values()), before
    with pytest.raises(
        JaxgenError, match=r"control: case=title was never seen in fine-tuning \(known: case=lower"
    ):
        lm.generate([""], control={"case": "title"})


# ----------------------------------------------------------------------------- preference tuning


def _pairs(n: int, seed: int) -> list[dict]:
    """Chosen: (the start of) a line in small letters; rejected: the same in capitals.
    20 characters each, so both sequences of a pair fit one row of 48."""
    texts = [r["text"][:20] for r in _lines(n, seed)]
    return [{"prompt": "", "chosen": t.lower(), "rejected": t.upper()} for t in texts]


def _lower_rate(lm, samples: int) -> float:
    results = lm.generate([""] * samples, max_new_tokens=24, temperature=1.0, seed=5)
    return sum(sum(c.islower() for c in r.text) > sum(c.isupper() for c in r.text) for r in results) / samples


def _dpo_config(base_run, **extra):
    root = base_run.parent
    if not (root / "pairs.jsonl").exists():
        _write_jsonl(root / "pairs.jsonl", _pairs(800, seed=2))
    values = {
        "data.format": "preference",
        "data.name": "pairs",
        "data.train_files": f"[{root / 'pairs.jsonl'}]",
        "finetune.objective": "dpo",
        "finetune.method": "lora",
        "finetune.lora.targets": "[q, k, v, o, mlp_in, mlp_out]",
        "finetune.dpo.beta": 0.1,
        "train.batch_size": 8,
        "optimizer.learning_rate": 5e-3,
    }
    values.update(extra)
    return _ft_config(base_run, **values)


def test_dpo_raises_reward_accuracy_and_the_chosen_property(base_run, tmp_path):
    import jaxgen

    start = finetune(
        _dpo_config(base_run, **{"train.steps": 1, "optimizer.learning_rate": 1e-12}), tmp_path / "t0"
    )
    before_rate = _lower_rate(jaxgen.load(tmp_path / "t0"), 50)
    tuned = finetune(_dpo_config(base_run, **{"train.steps": 100, "checkpoint.every": 100}), tmp_path / "dpo")
    after_rate = _lower_rate(jaxgen.load(tmp_path / "dpo"), 50)
    print("held-out reward accuracy", start.final_eval["accuracy"], "->", tuned.final_eval["accuracy"])
    print("lower-case generations", before_rate, "->", after_rate)
    assert abs(start.final_eval["accuracy"] - 0.5) < 0.1
    assert tuned.final_eval["accuracy"] >= 0.9
    assert after_rate > before_rate + 0.2
    lines = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if line.get("kind") == "train"]
    assert {"accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logps"} <= set(logged[-1])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_resume_is_exact(base_run, tmp_path, method):
    """Full DPO keeps a copy of the starting weights as its reference; resuming re-reads it."""
    extra = {"train.steps": 8, "checkpoint.every": 4, "finetune.method": method}
    straight = finetune(_dpo_config(base_run, **extra), tmp_path / "straight")
    assert straight.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    finetune(_dpo_config(base_run, **extra), tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
    resumed = finetune(_dpo_config(base_run, **extra), tmp_path / "resumed")
    assert resumed.losses == straight.losses[4:]
    _, a = load_run_params(tmp_path / "resumed")
    _, b = load_run_params(tmp_path / "straight")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_int8_and_bfloat16_weights_agree_with_float32_on_a_trained_model(base_run):
    """Issue 20's quality bounds, on the one trained fixture: decoding weights in fewer bytes
    keep top-1 agreement >= 99% on held-out text (model/quant.py)."""
    import jaxgen

    text = " ".join(r["text"] for r in _lines(40, seed=7))
    want_lm = jaxgen.load(base_run)
    ids = want_lm.tokenizer.encode(text)[: 8 * 48]
    tokens = np.asarray(ids, np.int32).reshape(8, 48)
    want = want_lm.logits(tokens)
    for weights in ("bfloat16", "int8"):
        got = jaxgen.load(base_run, weights=weights).logits(tokens)
        # Measured: relative error 0.10% (bfloat16) and 0.13% (int8); top-1 agreement 99.7% and 100%.
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02, weights
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99, weights
