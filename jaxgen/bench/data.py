"""`jaxgen bench data`: prepare throughput and peak RSS, pipeline batches/s. One line each.

Prepare runs in a child process so its memory is measured alone (VmHWM of the child,
and the sampled sum over the child and its tokenizing workers); the tokenizer is
trained first (timed separately), so `prepare` measures reading, tokenizing and
writing only.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np

from jaxgen.config import load_config
from jaxgen.data import dataset_dir, prepare, train_batches
from jaxgen.data.prepare import tokenizing_workers
from jaxgen.data.tokenizer_training import train_tokenizer
from jaxgen.runtime.mesh import make_mesh

_WORDS = 20_000


def synthetic_corpus(directory: pathlib.Path, mb: float, files: int = 4, seed: int = 0) -> list[pathlib.Path]:
    """Zipf-distributed pseudo-words in lines and paragraphs: `mb` megabytes over `files` files."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    lengths = rng.integers(1, 10, _WORDS)
    vocab = np.array(
        ["".join(rng.choice(letters, n)) for n in lengths] + ["\n", "\n\n", ", ", ". "], dtype=object
    )
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights[-4:] = [0.08, 0.01, 0.05, 0.05]  # line and paragraph breaks, punctuation
    weights /= weights.sum()
    paths = []
    per_file = int(mb * 1e6 / files)
    for i in range(files):
        path = directory / f"corpus-{i}.txt"
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                text = " ".join(vocab[rng.choice(len(vocab), 100_000, p=weights)])[: per_file - written]
                f.write(text)
                written += len(text)  # ASCII: characters are bytes
        paths.append(path)
    return paths


def _config(workdir: pathlib.Path, kind: str, files: list[pathlib.Path]):

    return load_config(
        None,
        [
            f"data.train_files={json.dumps([str(p) for p in files])}",
            f"data.data_dir={workdir / 'prepared'}",
            f"data.name=bench-{kind}",
            "data.documents=blank_lines",
            f"tokenizer.kind={kind}",
            "tokenizer.vocab_size=1024",
            "tokenizer.train_sentences=200000",
            "train.seq_len=1024",
            "train.batch_size=16",
        ],
    )


def _status_mb(pid: str, key: str) -> float:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:  # the process just exited
        pass
    return 0.0


def _children() -> list[str]:
    pids = []
    for task in pathlib.Path("/proc/self/task").iterdir():
        pids += (task / "children").read_text().split()
    return pids


class _PeakRSS:
    """Samples the RSS of this process plus its children (tokenizing workers) every 0.1 s.

    Why not ru_maxrss: Linux carries a parent's peak across fork + exec into the child's.
    """

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            total = _status_mb("self", "VmRSS") + sum(_status_mb(p, "VmRSS") for p in _children())
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def _child_prepare(workdir: str, kind: str) -> None:
    """Runs in the child: prepare (the tokenizer already exists), print figures as JSON."""

    files = sorted(pathlib.Path(workdir, "corpus").glob("*.txt"))
    sampler = _PeakRSS()
    start = time.perf_counter()
    info = prepare(_config(pathlib.Path(workdir), kind, files), progress=False)
    seconds = time.perf_counter() - start
    total_mb = sampler.stop()
    tokens = sum(s.tokens for s in info.splits.values())
    main_mb = _status_mb("self", "VmHWM")  # this process's own peak since exec
    # CPU seconds of this process and its (finished) workers: MB per CPU second is the
    # per-core rate, whatever else is running on the machine.
    cpu = sum(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    figures = {"seconds": seconds, "tokens": tokens, "main_mb": main_mb, "total_mb": total_mb, "cpu_s": cpu}
    print(json.dumps(figures))


def bench_prepare(workdir: pathlib.Path, kind: str, files: list[pathlib.Path]) -> dict:

    config = _config(workdir, kind, files)
    start = time.perf_counter()
    train_tokenizer(config)
    tok_seconds = time.perf_counter() - start
    shutil.rmtree(dataset_dir(config), ignore_errors=True)  # measure a full build
    code = f"from jaxgen.bench.data import _child_prepare; _child_prepare({str(workdir)!r}, {kind!r})"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    mb = sum(p.stat().st_size for p in files) / 1e6
    return {
        "bench": "data_prepare",
        "tokenizer": kind,
        "corpus_mb": round(mb, 1),
        "tokenizer_train_s": round(tok_seconds, 2),
        "prepare_s": round(child["seconds"], 2),
        "mb_per_s": round(mb / child["seconds"], 2),
        "cpu_s": round(child["cpu_s"], 1),
        "mb_per_cpu_s": round(mb / child["cpu_s"], 2),
        "workers": tokenizing_workers(config, int(mb * 1e6)),
        "tokens": child["tokens"],
        "peak_rss_mb": round(child["main_mb"], 1),
        "peak_rss_with_workers_mb": round(child["total_mb"], 1),
        "cpu_count": os.cpu_count(),
    }


def bench_pipeline(workdir: pathlib.Path, kind: str, files: list[pathlib.Path], batches: int) -> dict:

    config = _config(workdir, kind, files)
    mesh = make_mesh(devices=jax.devices()[:1])
    out = {"bench": "data_pipeline", "tokenizer": kind, "batch": "16x1024"}
    for name, m in (("numpy", None), ("jax_array", mesh)):
        it = train_batches(config, m)
        for _ in range(20):  # warm up threads and the read-ahead buffer
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        out[f"{name}_batches_per_s"] = round(batches / (time.perf_counter() - start), 1)
    out["read_threads"] = config.data.read_threads
    return out


def run(
    mb: float = 200.0, batches: int = 500, kind: str = "bpe", workdir: str | None = None
) -> Iterator[dict]:
    """Yields one line per measurement (the CLI prints each as JSON)."""
    with tempfile.TemporaryDirectory(prefix="jaxgen-bench-data-") as tmp:
        root = pathlib.Path(workdir or tmp)
        (root / "corpus").mkdir(parents=True, exist_ok=True)
        files = sorted((root / "corpus").glob("*.txt"))
        if abs(sum(p.stat().st_size for p in files) / 1e6 - mb) > 0.05 * mb + 1:
            for p in files:
                p.unlink()
            files = synthetic_corpus(root / "corpus", mb)
        for k in kind.split(","):
            yield bench_prepare(root, k, files)
            yield bench_pipeline(root, k, files, batches)
