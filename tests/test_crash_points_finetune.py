"""Crash at random points, fine-tuning (docs/RELIABILITY.md): tests/test_crash_points.py's
kill-and-resume check for `jaxgen finetune`, a full fine-tuning run and a LoRA run. Each
run that reaches the end has params (for LoRA: adapters), optimizer state and logged
losses bit-identical to an uninterrupted run, every step logged once.

1 kill point per method by default (a process costs ~5 CPU-seconds of imports and cache
loads, and a fine-tuning run has nothing new before its first checkpoint): a fresh run is
killed just after its first, second or third committed checkpoint (drawn), before the next
metrics line; later kills are drawn as tests/test_crash_points.py draws them (after a step,
after its hooks, during an asynchronous write, a torn metrics line, a random time).
JAXGEN_CRASH_POINTS=N for N each.
"""

import json
import os
import pathlib
import random
import signal
import subprocess

import jax
import pytest
from test_crash_points import EVERY, ROOT, SEED, STEPS, _assert_same_training, _draw, run_harness

from jaxgen.checkpoint import save_params
from jaxgen.config import load_config
from jaxgen.data.tokenizer_training import train_tokenizer
from jaxgen.model.transformer import init_params

KILL_POINTS = int(os.environ.get("JAXGEN_CRASH_POINTS", "1"))
METHODS = {
    "full": [],
    "lora": ["finetune.method=lora", "finetune.lora.targets=[q, v, mlp_in]", "finetune.lora.rank=4"],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    """A random-weight base run with a char tokenizer, and SFT records to tune it on."""
    root = tmp_path_factory.mktemp("ft_crash")
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000]
    (root / "text.txt").write_text(text)
    lines = [line for line in text.splitlines() if len(line) > 20]
    records = [{"prompt": a, "response": b} for a, b in zip(lines, lines[1:], strict=False)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_config(
        None,
        [
            "model.preset=tiny", "model.dtype=float32", "model.max_len=64", "model.vocab_size=96",
            "tokenizer.kind=char", "tokenizer.vocab_size=90", f"data.train_files=[{root / 'text.txt'}]",
            f"data.data_dir={root / 'base_data'}",
        ],
    )  # fmt: skip
    params = jax.jit(init_params, static_argnums=0)(config.model, jax.random.key(0))
    save_params(root / "base", config, params, tokenizer_path=train_tokenizer(config))
    return root / "base"


def _overrides(root: pathlib.Path, base: pathlib.Path) -> list[str]:
    return [
        f"finetune.init_from={base}", "model.dtype=float32", "tokenizer.vocab_multiple=8",
        "data.format=sft", f"data.train_files=[{root / 'sft.jsonl'}]", f"data.data_dir={root / 'prepared'}",
        f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
        "train.eval_batches=1", f"checkpoint.every={EVERY}", "checkpoint.async_save=true",
        "optimizer.learning_rate=3e-3",
    ]  # fmt: skip


def _finetune(root, base, run, method: str, kind: str, arg) -> subprocess.CompletedProcess:
    config = ROOT / "configs" / "tiny.yaml"
    args = ["finetune", str(config), "--run-dir", str(run), *_overrides(root, base), *METHODS[method]]
    return run_harness(root, kind, arg, args)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_finetuning_killed_at_random_points_resumes_to_the_same_training(base, method, reliability):
    root = base.parent
    reference = root / f"{method}-reference"
    done = _finetune(root, base, reference, method, "none", "-")
    assert done.returncode == 0, done.stdout + done.stderr
    rng = random.Random(SEED)
    run, history, kills, fresh = root / f"{method}-run", [], 0, True
    while kills < KILL_POINTS:
        # Saves come at steps 3, 6, 9, 12: a fresh run is killed after one of the first three.
        kind, arg = ("saved", rng.randint(1, 3)) if fresh else _draw(rng, fresh)
        result = _finetune(root, base, run, method, kind, arg)
        history.append((kind, arg, result.returncode))
        if result.returncode == -signal.SIGKILL:
            kills, fresh = kills + 1, False
            continue
        assert result.returncode == 0, f"{history}\n{result.stdout}\n{result.stderr}"
        _assert_same_training(run, reference, history)  # the kill came after the end, or never
        run, fresh = root / f"{method}-run{len(history)}", True
    result = _finetune(root, base, run, method, "none", "-")  # the last run resumes to the end
    assert result.returncode == 0, f"{history}\n{result.stdout}\n{result.stderr}"
    _assert_same_training(run, reference, history)
    reliability["kill points survived"] += kills
    print(f"crash points ({method} fine-tuning): {kills} SIGKILLs, each resumed to the uninterrupted result")
