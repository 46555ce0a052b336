"""Training: loss goes down, exact resume (same and other mesh), preemption, accumulation,
schedules, NaN policies. Tiny GPT on a small slice of the shipped Shakespeare text."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import checkpoint
from jaxgen.config import ScheduleConfig, load_config
from jaxgen.errors import JaxgenError
from jaxgen.runtime.mesh import activate, make_mesh
from jaxgen.train.loop import train
from jaxgen.train.optim import make_schedule
from jaxgen.train.step import TrainStep

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:60_000]
    (root / "shakespeare.txt").write_text(text)
    return root


def _overrides(corpus: pathlib.Path, **extra) -> list[str]:
    base = {
        "model.preset": "tiny",
        "model.dtype": "float32",
        "model.max_len": 32,
        "tokenizer.vocab_size": 200,
        "data.train_files": f"[{corpus / 'shakespeare.txt'}]",
        "data.data_dir": str(corpus / "prepared"),
        "train.steps": 20,
        "train.batch_size": 8,
        "train.seq_len": 32,
        "train.log_every": 5,
        "checkpoint.every": 10,
        "checkpoint.async_save": False,
        "optimizer.learning_rate": 1e-2,
        "schedule.warmup_steps": 3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _config(corpus, **extra):
    return load_config(None, _overrides(corpus, **extra))


def _params(run_dir, step=None):
    _, params = checkpoint.load_params(run_dir, step=step)
    return jax.device_get(params)


def test_loss_goes_down_and_run_dir_is_complete(corpus, tmp_path):
    config = _config(
        corpus,
        **{
            "train.steps": 40,
            "train.sample_every": 20,
            "train.sample_prompt": "'ROMEO:'",
            "train.sample_tokens": 8,
        },
    )
    result = train(config, tmp_path / "run")
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.5
    assert result.final_eval["nats_per_char"] > 0
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    assert any((tmp_path / "run" / "events").iterdir())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval", "sample"}
    samples = [r for r in records if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [20, 40] and all(isinstance(r["text"], str) for r in samples)
    # checkpoint.keep=3: the oldest of 10, 20, 30, 40 is gone
    assert checkpoint.manager(tmp_path / "run", read_only=True).all_steps() == [20, 30, 40]


def test_resume_is_exact_on_the_same_mesh_and_close_on_another(corpus, tmp_path):
    straight = train(_config(corpus), tmp_path / "straight")
    # Interrupted run: the same 20-step schedule, restarted from step 10.
    resumed_dir = tmp_path / "resumed"
    train(_config(corpus), resumed_dir)
    other_dir = tmp_path / "other_mesh"
    import shutil

    shutil.copytree(resumed_dir, other_dir)
    for run in (resumed_dir, other_dir):
        shutil.rmtree(run / "checkpoints" / "20")
    resumed = train(_config(corpus), resumed_dir)
    assert resumed.losses == straight.losses[10:]  # bit-identical
    jax.tree.map(np.testing.assert_array_equal, _params(resumed_dir), _params(tmp_path / "straight"))

    other = train(_config(corpus, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), other_dir)
    np.testing.assert_allclose(other.losses, straight.losses[10:], atol=1e-6, rtol=0)
    # The key bias adds q.b_k to every score of a query, which softmax ignores: its
    # gradient is zero up to rounding, and Adam turns that rounding noise (which depends
    # on the reduction order, i.e. the mesh) into tiny steps. It stays near zero in both
    # runs; every other parameter must agree within 1e-6.
    a, b = _params(other_dir), _params(tmp_path / "straight")
    for run in (a, b):
        assert np.abs(run["layers"]["attn"]["key"].pop("bias")).max() < 1e-3
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), a, b)


def test_sigterm_saves_a_restorable_checkpoint_and_exits_zero(corpus, tmp_path):
    run_dir = tmp_path / "preempted"
    cmd = [
        sys.executable,
        "-m",
        "jaxgen.cli",
        "train",
        str(ROOT / "configs" / "tiny.yaml"),
        "--run-dir",
        str(run_dir),
    ]
    cmd += _overrides(corpus, **{"train.steps": 100000, "checkpoint.every": 100000, "train.log_every": 1})
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") and "loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out
    assert "SIGTERM: saving a checkpoint" in out
    steps = checkpoint.manager(run_dir, read_only=True).all_steps()
    assert len(steps) == 1 and 0 < steps[0] < 100000
    params = _params(run_dir)
    assert params["embed"]["embedding"].shape == (256, 64)  # vocab 200 rounded up to 128s


def _random_batch(batch, seq, vocab, seed):
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, vocab)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
        "loss_mask": (jax.random.uniform(jax.random.key(seed + 1), (batch, seq)) > 0.2).astype(jnp.float32),
    }


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    batch = _random_batch(32, 16, 512, 0)
    results = []
    for accum in (1, 4):
        config = tiny_config.model_copy(
            update={
                "train": tiny_config.train.model_copy(
                    update={"batch_size": 32, "seq_len": 16, "grad_accum": accum}
                )
            }
        )
        mesh = make_mesh(config.mesh)
        with activate(mesh):
            trainer = TrainStep.from_config(config, mesh)
            state = trainer.init(jax.random.key(0))
            state, metrics = trainer.step(state, jax.device_put(batch, trainer.batch_sharding))
            results.append((jax.device_get(state.params), float(metrics.loss), float(metrics.grad_norm)))
    (p1, l1, g1), (p4, l4, g4) = results
    assert abs(l1 - l4) < 1e-5 and abs(g1 - g4) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), p1, p4)


def test_non_finite_step_is_not_applied(tiny_config):
    mesh = make_mesh(tiny_config.mesh)
    with activate(mesh):
        trainer = TrainStep.from_config(tiny_config, mesh)
        state = trainer.init(jax.random.key(0))
        before = jax.device_get(state)
        poisoned = state.replace(
            params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params)
        )
        poisoned_host = jax.device_get(poisoned)
        batch = jax.device_put(_random_batch(8, 16, 512, 3), trainer.batch_sharding)
        after, metrics = trainer.step(poisoned, batch)
        assert not bool(metrics.finite)
        assert int(after.step) == int(before.step) == 0
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.opt_state), poisoned_host.opt_state)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_policy(corpus, tmp_path, policy):
    # SGD at lr 1e30: the first update is finite but blows the weights up, so every
    # later loss is Inf/NaN.
    config = _config(
        corpus,
        **{
            "optimizer.name": "sgd",
            "optimizer.learning_rate": 1e30,
            "schedule.name": "constant",
            "schedule.warmup_steps": 0,
            "train.nan_policy": policy,
            "train.steps": 10,
            "checkpoint.every": 1,
        },
    )
    if policy == "skip":
        result = train(config, tmp_path / "skip")
        assert result.skipped_steps == 9 and result.step == 10
    else:
        with pytest.raises(JaxgenError, match="step 5: loss or gradient is NaN/Inf; stopped"):
            train(config, tmp_path / "stop")
        steps = checkpoint.manager(tmp_path / "stop", read_only=True).all_steps()
        assert steps and max(steps) <= 5


@pytest.mark.parametrize(
    "name, expected",
    [
        # (step, lr) with peak 1.0, warmup 10, 100 steps, min ratio 0.1
        ("cosine", [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.55), (100, 0.1)]),
        ("linear", [(0, 0.0), (10, 1.0), (55, 0.55), (100, 0.1)]),
        ("constant", [(5, 0.5), (10, 1.0), (99, 1.0)]),
        ("wsd", [(5, 0.5), (10, 1.0), (80, 1.0), (90, 0.55), (100, 0.1)]),
        ("rsqrt", [(5, 0.5), (10, 1.0), (40, 0.5), (160, 0.25)]),
    ],
)
def test_schedules(name, expected):
    schedule = make_schedule(
        ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2), 1.0, 100
    )
    for step, lr in expected:
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-6), (name, step)


def test_bad_shapes_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(
        JaxgenError, match="train.batch_size: 12 is not divisible by data\\*fsdp\\*grad_accum = 8"
    ):
        train(_config(corpus, **{"train.batch_size": 12}), tmp_path / "a")
    with pytest.raises(JaxgenError, match="train.seq_len: 64 exceeds model.max_len=32"):
        train(_config(corpus, **{"train.seq_len": 64}), tmp_path / "b")


def test_out_of_memory_names_the_knobs(tiny_config):
    from jaxgen.train.loop import _memory_hint

    with pytest.raises(JaxgenError, match=r"out of memory in the train step: lower train.batch_size \(8\)"):
        with _memory_hint(tiny_config):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes")
    with pytest.raises(ValueError, match="unrelated"):  # other failures pass through untouched
        with _memory_hint(tiny_config):
            raise ValueError("unrelated")


def test_token_nll_in_chunks_equals_one_chunk():
    from jaxgen.model.loss import token_nll

    hidden = jax.random.normal(jax.random.key(0), (2, 12, 8))
    kernel = jax.random.normal(jax.random.key(1), (8, 32))
    targets = jax.random.randint(jax.random.key(2), (2, 12), 0, 32)
    mask = (jax.random.uniform(jax.random.key(3), (2, 12)) > 0.3).astype(jnp.float32)
    project = lambda h, k: jnp.einsum("BTD,DV->BTV", h, k)  # noqa: E731

    def loss(h, k, chunk):
        nll, z = token_nll(lambda x: project(x, k), h, targets, mask, chunk)
        return nll + 1e-2 * z

    whole = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, 12)
    for chunk in (4, 5):  # 5 does not divide 12: its largest divisor below 5 (4) is used
        chunked = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, chunk)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-6), chunked, whole)
    logp = jax.nn.log_softmax(project(hidden, kernel))
    reference = -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum()
    np.testing.assert_allclose(
        token_nll(lambda x: project(x, kernel), hidden, targets, mask, 4)[0],
        reference,
        atol=1e-5,
        rtol=1e-6,
    )


def test_bench_train_times_the_model_train_would_build(corpus, tmp_path, capsys):
    from jaxgen import cli
    from jaxgen.bench.train import as_trained
    from jaxgen.data.tokenizer_training import train_tokenizer
    from jaxgen.model.transformer import param_count
    from jaxgen.tokenizer import load_tokenizer, model_vocab_size

    # No tokenizer yet: the vocab it will be trained to, rounded up (not model.vocab_size's 512).
    config = _config(corpus, **{"data.data_dir": str(tmp_path / "prepared"), "tokenizer.vocab_size": 300})
    assert as_trained(config)[0].model.vocab_size == 384
    path = train_tokenizer(config)
    want = model_vocab_size(load_tokenizer(path), config.tokenizer.vocab_multiple)
    resolved, source = as_trained(config)
    assert (resolved.model.vocab_size, source) == (want, str(path))
    args = ["bench", "train", "--steps", "2", "--warmup", "1", str(ROOT / "configs" / "tiny.yaml")]
    args += _overrides(corpus)
    args += [f"data.data_dir={tmp_path / 'prepared'}", "tokenizer.vocab_size=300"]
    assert cli.main([*args, "--profile", str(tmp_path / "profile")]) == 0
    line = json.loads(capsys.readouterr().out)  # stdout stays the one JSON line
    assert line["vocab_size"] == want and line["params"] == param_count(resolved.model)
    # The trace TensorBoard's profile plugin reads: plugins/profile/<run>/<host>.xplane.pb.
    (trace,) = (tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb")
    assert trace.stat().st_size > 0
    missing = [*args, f"tokenizer.path={tmp_path / 'nope.model'}"]
    assert cli.main(missing) == 1
    assert "tokenizer.path:" in capsys.readouterr().err
