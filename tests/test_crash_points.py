"""Crash at random points (docs/RELIABILITY.md): a tiny `jaxgen train` in a subprocess is
SIGKILLed at seeded random moments (after a step, after its hooks, during an asynchronous
checkpoint write, between a committed checkpoint and the next metrics line, halfway through
a metrics line, at a random time) and restarted; every run that reaches the end has
params, optimizer state and logged losses bit-identical to an uninterrupted run, and
metrics.jsonl logs every step exactly once.

10 kill points by default; JAXGEN_CRASH_POINTS=N for more, JAXGEN_CRASH_SEED to draw
others. Processes share a persistent compilation cache, so each start costs its imports,
not a compile.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).parent.parent
HARNESS = pathlib.Path(__file__).parent / "crash_harness.py"
STEPS, EVERY = 12, 3
KILL_POINTS = int(os.environ.get("JAXGEN_CRASH_POINTS", "10"))
SEED = int(os.environ.get("JAXGEN_CRASH_SEED", "0"))
# Values that measure this process's speed, not the training (they differ between runs).
_TIMING = {"tokens_per_second", "step_ms", "mfu", "nonfinite_total"}


def _overrides(root: pathlib.Path) -> list[str]:
    return [
        "model.dtype=float32", "model.max_len=16", "tokenizer.vocab_size=160",
        f"data.train_files=[{root / 'text.txt'}]", f"data.data_dir={root / 'prepared'}",
        f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=16", "train.log_every=1",
        "train.eval_batches=1", f"checkpoint.every={EVERY}", "checkpoint.async_save=true",
    ]  # fmt: skip


def _train(root: pathlib.Path, run: pathlib.Path, kind: str, arg) -> subprocess.CompletedProcess:
    args = ["train", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run), *_overrides(root)]
    return run_harness(root, kind, arg, args)


def run_harness(root: pathlib.Path, kind: str, arg, jaxgen_args: list[str]) -> subprocess.CompletedProcess:
    """`jaxgen JAXGEN_ARGS` under the crash harness (killed at kill point `kind`/`arg`), on CPU,
    sharing one persistent compilation cache so that a restart does not compile again."""
    cmd = [sys.executable, str(HARNESS), kind, str(arg), "--", *jaxgen_args]
    env = {
        **os.environ,
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)


def _draw(rng: random.Random, fresh: bool) -> tuple[str, object]:
    """A kill point. A fresh run is first killed just after its first committed checkpoint:
    killed before any, it has nothing to resume and would need --overwrite (by design)."""
    if fresh:
        return "saved", 1
    kind = rng.choice(["step", "hooks", "async_save", "saved", "torn_metrics", "time"])
    arg = {
        "step": lambda: rng.randint(1, 3),
        "hooks": lambda: rng.randint(1, 3),
        "async_save": lambda: round(rng.uniform(0.0, 0.2), 3),
        "saved": lambda: 1,
        "torn_metrics": lambda: rng.randint(1, 4),
        "time": lambda: round(rng.uniform(0.0, 1.0), 3),
    }[kind]()
    return kind, arg


def _logged(run: pathlib.Path) -> list[tuple]:
    """(step, kind, values) of every train and eval record, timing left out."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["step"], r["kind"], {k: v for k, v in r.items() if k not in _TIMING | {"step", "kind"}})
        for r in records
        if r["kind"] in ("train", "eval")
    ]


def _state(run: pathlib.Path) -> dict:
    """Params and optimizer state (with step and rng) of the final checkpoint, as stored."""
    with ocp.CheckpointManager((run / "checkpoints").absolute()) as mngr:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(), opt=ocp.args.StandardRestore())
        restored = mngr.restore(STEPS, args=args)
    return jax.device_get({"params": restored["params"], "opt": restored["opt"]})


def _assert_same_training(run: pathlib.Path, reference: pathlib.Path, history: list) -> None:
    logged, want = _logged(run), _logged(reference)
    assert logged == want, history
    steps = [step for step, kind, _ in logged if kind == "train"]
    assert steps == list(range(1, STEPS + 1)), history  # every step once: none missing, none twice
    got, expected = _state(run), _state(reference)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), got, expected)


def _bits(x):
    """An array's stored values (a PRNG key's as its key data), for a bitwise comparison."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def test_training_killed_at_random_points_resumes_to_the_same_training(tmp_path, reliability):
    (tmp_path / "text.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    reference = tmp_path / "reference"
    done = _train(tmp_path, reference, "none", "-")
    assert done.returncode == 0, done.stdout + done.stderr
    rng = random.Random(SEED)
    kills, runs, history = 0, 0, []
    run, fresh = None, True
    while kills < KILL_POINTS:
        if fresh:
            runs += 1
            run, history = tmp_path / f"run{runs}", []
        kind, arg = _draw(rng, fresh)
        result = _train(tmp_path, run, kind, arg)
        history.append((kind, arg, result.returncode))
        if result.returncode == -signal.SIGKILL:
            kills += 1
            fresh = False
            continue
        assert result.returncode == 0, f"{history}\n{result.stdout}\n{result.stderr}"
        _assert_same_training(run, reference, history)  # the kill came after the end, or never
        fresh = True
    result = _train(tmp_path, run, "none", "-")  # the last run resumes to the end
    assert result.returncode == 0, f"{history}\n{result.stdout}\n{result.stderr}"
    _assert_same_training(run, reference, history)
    reliability["kill points survived"] += kills
    print(f"crash points: {kills} SIGKILLs over {runs} runs, each resumed to the uninterrupted result")
