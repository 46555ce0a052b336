"""Quickstart benchmark: `jaxgen train configs/shakespeare.yaml` vs nanoGPT's README CPU recipe.

    .venv/bin/python benchmarks/shakespeare_vs_nanogpt.py --nanogpt /tmp/nanogpt \
        [--order peer-first|jaxgen-first|alternate] [--repeat N]

Issue 5 asks the quickstart to reach <= 1.65 nats/char on the last 10% of
data/tinyshakespeare.txt in no more wall-clock time than nanoGPT's CPU recipe takes on
the same machine, both measured in one run (the machines are shared and noisy). So
this script runs, one after the other, as child processes:

* the peer: nanoGPT's `data/shakespeare_char/prepare.py` then `train.py` with the
  README's CPU recipe, in its own virtualenv (`torch==2.13.0 numpy requests`, created
  on first use; 2.13.0 is the local CPU wheel, any other version pulls a CUDA build);
* jaxgen: `jaxgen train configs/shakespeare.yaml` into a fresh run directory and a fresh
  data directory, so tokenizer training and data preparation are timed too.

Each side's wall clock is the whole child process (interpreter start, imports, data
preparation, compilation, training, evaluation). nanoGPT's shakespeare_char is
char-level and splits at `int(n * 0.9)` like jaxgen, so its val loss is nats/char on
the same text; its own figure is an estimate over `eval_iters` random batches, so its
final checkpoint is also evaluated here on the WHOLE validation split (every
non-overlapping 64-character window, each character predicted once; untimed).

nanoGPT's code is never copied into this repository: point `--nanogpt` (or env
NANOGPT_DIR) at a checkout. Its prepare.py downloads input.txt unless the file
exists, so this repository's data/tinyshakespeare.txt is copied there first (there is
no internet on these machines, and both sides must read the same text).

Prints one JSON line per side and run, then one summary line per run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
TEXT = REPO / "data" / "tinyshakespeare.txt"
CONFIG = "configs/shakespeare.yaml"
VENV = pathlib.Path("/tmp/nanogpt-venv")
TARGET_NATS_PER_CHAR = 1.65

# nanoGPT README, "I only have a macbook" recipe, verbatim. Appended here:
# out_dir (fresh per run) and always_save_checkpoint=True (the shakespeare_char config
# saves only when the estimated val loss improved, so the checkpoint could otherwise be
# an earlier step than the final figure; the saves are 3 MB and happen at the 8 evals).
PEER_RECIPE = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
WINDOW = 64  # the recipe's block_size: the full-split evaluation's window

JAXGEN_FINAL = re.compile(r"final: step (\d+) val loss ([\d.]+) ([\d.]+) nats/char in ([\d.]+) s wall")
PEER_EVAL = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
# Step-count lines, timed on arrival for ms/step (see `steady_ms_per_step`).
PEER_STEP = re.compile(r"iter (\d+): loss")
JAXGEN_STEP = re.compile(r"step\s+(\d+)\s+loss|compiled and ran the (first) step")


# ----------------------------------------------------------------------------- helpers


def ensure_venv(venv: pathlib.Path) -> pathlib.Path:
    """The peer's python, creating its virtualenv once (cached across runs)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import torch, numpy, requests"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # requests: prepare.py imports it at the top even when input.txt exists.
    pip = [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "numpy", "requests"]
    subprocess.run(pip, check=True)
    return python


def run_logged(cmd: list[str], log: pathlib.Path, cwd: pathlib.Path) -> tuple[float, list[tuple[float, str]]]:
    """Runs `cmd`; returns its wall seconds and its output lines with their arrival times.

    Each line also goes to `log`, prefixed by its arrival time. Raises on failure.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines must arrive when printed
    lines = []
    start = time.perf_counter()
    with (
        open(log, "a", encoding="utf-8") as out,
        subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        for line in proc.stdout:
            t = time.perf_counter() - start
            out.write(f"[{t:8.2f}] {line}")
            lines.append((t, line.rstrip("\n")))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} ... exited {proc.returncode}; see {log}")
    return seconds, lines


def steady_ms_per_step(lines: list[tuple[float, str]], pattern: re.Pattern) -> float | None:
    """Median ms/step between consecutive step-count lines, timed by their arrival.

    Timed from outside because the two sides time steps differently: nanoGPT's CPU steps
    are synchronous, while jaxgen's logged step_ms is taken before it waits for the
    window's asynchronously dispatched steps (it read ~30% low in a run here). Both print
    after the losses are on the host, so arrival times are comparable. The median drops
    the windows that hold an evaluation or compilation.
    """
    points = []
    for t, text in lines:
        if m := pattern.search(text):
            points.append((t, int(m[1]) if m[1] else 1))  # jaxgen's "compiled" line: step 1
    rates = [1000 * (t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in itertools.pairwise(points) if s1 > s0]
    return round(statistics.median(rates), 1) if rates else None


# ----------------------------------------------------------------------------- peer side


def prepare_peer_data(nanogpt: pathlib.Path) -> None:
    """Puts this repo's text where prepare.py looks, and removes its outputs so it reruns."""
    data_dir = nanogpt / "data" / "shakespeare_char"
    if not (data_dir / "prepare.py").exists():
        raise SystemExit(f"--nanogpt {nanogpt}: no data/shakespeare_char/prepare.py (not a nanoGPT checkout)")
    shutil.copyfile(TEXT, data_dir / "input.txt")
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (data_dir / name).unlink(missing_ok=True)


def run_peer(python: pathlib.Path, nanogpt: pathlib.Path, work: pathlib.Path) -> dict:
    """Times prepare.py + train.py (the README recipe), then evaluates the whole split."""
    prepare_peer_data(nanogpt)
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="nanogpt-out-", dir=work))
    log = work / f"{out_dir.name}.log"
    start = time.perf_counter()
    run_logged([str(python), "data/shakespeare_char/prepare.py"], log, nanogpt)
    train = [str(python), "train.py", *PEER_RECIPE, f"--out_dir={out_dir}", "--always_save_checkpoint=True"]
    _, lines = run_logged(train, log, nanogpt)
    wall = time.perf_counter() - start
    evals = PEER_EVAL.findall("\n".join(text for _, text in lines))
    if not evals:
        raise SystemExit(f"nanoGPT printed no 'val loss' line; see {log}")
    step, _, val = evals[-1]
    full = run_peer_full_eval(python, nanogpt, out_dir)
    return {
        "side": "nanogpt",
        "wall_s": round(wall, 1),
        "val_nats_per_char_estimate": float(val),
        "val_nats_per_char_full": round(full["nats_per_char"], 4),
        "full_eval_chars": full["predicted"],
        "checkpoint_step": full["iter_num"],
        "steps": int(step),
        "ms_per_step_wall": round(1000 * wall / int(step), 1),
        "ms_per_step_median": steady_ms_per_step(lines, PEER_STEP),
        "log": str(log),
    }


def run_peer_full_eval(python: pathlib.Path, nanogpt: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """Runs `peer_full_eval` in the peer's venv (this file, --peer-eval) and reads its JSON."""
    cmd = [str(python), __file__, "--peer-eval", str(out_dir), "--nanogpt", str(nanogpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"full-split evaluation of {out_dir}/ckpt.pt failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_full_eval(nanogpt: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """Child (peer venv): nats/char of ckpt.pt over every char of val.bin but the first.

    Windows are non-overlapping WINDOW-char slices (the last one shorter), so each
    character after the first is predicted exactly once, from up to WINDOW-1 chars of
    context, like jaxgen's evaluation (which uses WINDOW-token windows).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    # weights_only: the safe loader (tensors, dicts, numbers, strings) — never plain pickle.
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    model.eval()
    val = nanogpt / "data" / "shakespeare_char" / "val.bin"
    ids = torch.from_numpy(np.fromfile(val, dtype=np.uint16).astype(np.int64))  # [N]
    predicted = len(ids) - 1
    end = predicted // WINDOW * WINDOW  # the whole windows; the rest is one shorter tail
    x = ids[:end].view(-1, WINDOW)  # [B, T]
    y = ids[1 : end + 1].view(-1, WINDOW)  # [B, T]
    pieces = list(zip(x.split(128), y.split(128), strict=True))
    if end < predicted:
        pieces.append((ids[end:-1][None], ids[end + 1 :][None]))  # [1, <T] each
    nll = 0.0
    with torch.no_grad():
        for xb, yb in pieces:
            logits, _ = model(xb, yb)  # [B, T, V]: with targets, logits at every position
            nll += F.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="sum").item()
    return {"nats_per_char": nll / predicted, "predicted": predicted, "iter_num": int(ckpt["iter_num"])}


# ----------------------------------------------------------------------------- jaxgen side


def run_jaxgen(work: pathlib.Path, config: str) -> dict:
    """Times `jaxgen train CONFIG` with a fresh run dir and data dir (tokenizer + prepare included)."""
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="jaxgen-run-", dir=work))
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="jaxgen-data-", dir=work))
    log = work / f"{run_dir.name}.log"
    cli = pathlib.Path(sys.executable).parent / "jaxgen"
    cmd = [str(cli), "train", config, "--run-dir", str(run_dir), f"data.data_dir={data_dir}"]
    wall, lines = run_logged(cmd, log, REPO)
    finals = list(JAXGEN_FINAL.finditer("\n".join(text for _, text in lines)))
    if not finals:
        raise SystemExit(f"jaxgen printed no 'final: ... nats/char' line; see {log}")
    match = finals[-1]
    steps = int(match[1])
    return {
        "side": "jaxgen",
        "wall_s": round(wall, 1),
        "val_nats_per_char": float(match[3]),
        "val_loss_per_token": float(match[2]),
        "reported_wall_s": float(match[4]),
        "steps": steps,
        "ms_per_step_wall": round(1000 * wall / steps, 1),
        "ms_per_step_median": steady_ms_per_step(lines, JAXGEN_STEP),
        "log": str(log),
    }


# ----------------------------------------------------------------------------- driver


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def one_run(index: int, peer_first: bool, python: pathlib.Path, nanogpt: pathlib.Path, args) -> None:
    """Both sides once, in the given order; prints their JSON lines and the summary."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="shakespeare-vs-nanogpt-"))
    print(f"run {index}: logs and outputs under {work}", file=sys.stderr, flush=True)
    sides = [lambda: run_peer(python, nanogpt, work), lambda: run_jaxgen(work, args.config)]
    results = {}
    for side in sides if peer_first else sides[::-1]:
        before = load_average()
        result = side()
        result.update(run=index, load_before=before, load_after=load_average())
        print(json.dumps(result), flush=True)
        results[result["side"]] = result
    ours, peer = results["jaxgen"], results["nanogpt"]
    summary = {
        "run": index,
        "order": "peer-first" if peer_first else "jaxgen-first",
        "jaxgen_wall_s": ours["wall_s"],
        "nanogpt_wall_s": peer["wall_s"],
        "wall_ratio": round(ours["wall_s"] / peer["wall_s"], 3),
        "jaxgen_nats_per_char": ours["val_nats_per_char"],
        "nanogpt_nats_per_char_full": peer["val_nats_per_char_full"],
        "nanogpt_nats_per_char_estimate": peer["val_nats_per_char_estimate"],
        "met_loss_target": ours["val_nats_per_char"] <= args.target,
        "met_wall_target": ours["wall_s"] <= peer["wall_s"],
        "beat_nanogpt_loss": ours["val_nats_per_char"] <= peer["val_nats_per_char_full"],
    }
    summary["met_target"] = summary["met_loss_target"] and summary["met_wall_target"]
    print(json.dumps(summary), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--nanogpt", default=os.environ.get("NANOGPT_DIR"), help="nanoGPT checkout (env NANOGPT_DIR)"
    )
    p.add_argument("--venv", default=str(VENV), help="the peer's virtualenv (created on first use)")
    p.add_argument("--order", choices=["peer-first", "jaxgen-first", "alternate"], default="peer-first")
    p.add_argument("--repeat", type=int, default=1, help="runs of both sides (noise)")
    p.add_argument("--config", default=CONFIG, help="jaxgen config, relative to the repo root")
    p.add_argument("--target", type=float, default=TARGET_NATS_PER_CHAR, help="nats/char target")
    p.add_argument("--peer-eval", metavar="OUT_DIR", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if not args.nanogpt:
        p.error("pass --nanogpt DIR or set NANOGPT_DIR (a nanoGPT checkout; its code is not vendored here)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nanogpt = pathlib.Path(args.nanogpt).resolve()
    if args.peer_eval:
        print(json.dumps(peer_full_eval(nanogpt, pathlib.Path(args.peer_eval))))
        return 0
    python = ensure_venv(pathlib.Path(args.venv))
    for i in range(args.repeat):
        peer_first = args.order == "peer-first" or (args.order == "alternate" and i % 2 == 0)
        one_run(i, peer_first, python, nanogpt, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
