"""grain worker processes: many fresh starts without a hang, and a dead or stuck worker ends
the job with one line in bounded time (a run directory that resumes).

The stress test runs the worker pipeline JAXGEN_WORKER_STRESS times (default 6) in a fresh
interpreter, as `jaxgen train` runs it. Before the fix a worker start now and then
deadlocked under load: its read threads both opened the split lazily, importing TFDS at
once (`JAXGEN_WORKER_STRESS=50 python -m pytest tests/test_data_workers.py -k stress`
failed on that code with the stuck worker named in `open_split`).
"""

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from jaxgen import checkpoint
from jaxgen.config import load_config, to_yaml
from jaxgen.data import as_numpy, dataset_dir, prepare, train_batches
from jaxgen.data.pipeline import WindowReader
from jaxgen.data.prepare import read_metadata
from jaxgen.data.workers import WorkerWatch, _where
from jaxgen.errors import JaxgenError

ROOT = pathlib.Path(__file__).parent.parent
STRESS = int(os.environ.get("JAXGEN_WORKER_STRESS", "6"))
# With JAXGEN_WORKER_STRESS set, busy processes load the CPU as a full suite run does: the
# old deadlock needed a read thread to be descheduled inside TFDS's import.
BURNERS = 2 * (os.cpu_count() or 1) if "JAXGEN_WORKER_STRESS" in os.environ else 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("workers")
    (root / "text.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:40_000])
    return root


def _overrides(corpus: pathlib.Path, **extra) -> list[str]:
    base = {
        "model.preset": "tiny",
        "model.dtype": "float32",
        "model.max_len": 32,
        "tokenizer.kind": "char",
        "tokenizer.vocab_size": 128,
        "data.train_files": f"[{corpus / 'text.txt'}]",
        "data.data_dir": str(corpus / "prepared"),
        "data.read_threads": 4,  # more read threads: the old deadlock needed two at once
        "train.batch_size": 8,
        "train.seq_len": 32,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def config(corpus):
    config = load_config(None, _overrides(corpus))
    prepare(config, progress=False)
    return config


def _with_workers(config, **data):
    return config.model_copy(update={"data": config.data.model_copy(update={"worker_count": 1, **data})})


_STRESS_SCRIPT = """
import json, sys, time
import numpy as np
from jaxgen.config import load_config
from jaxgen.data import as_numpy, train_batches

def main():
    config = load_config(sys.argv[1])
    count = int(sys.argv[2])
    threads = config.model_copy(update={"data": config.data.model_copy(update={"worker_count": 0})})
    with train_batches(threads, None) as it:
        expected = [as_numpy(next(it)) for _ in range(2)]
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        with train_batches(config, None) as it:  # a fresh worker process each time
            got = [as_numpy(next(it)) for _ in range(2)]
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(got, expected) for k in a)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"runs": len(seconds), "max_s": max(seconds)}))

if __name__ == "__main__":
    main()
"""


def test_stress_fresh_worker_processes_never_hang(config, tmp_path):
    # worker_timeout turns a hang into an error naming the stuck frame; the outer timeout
    # is only a backstop for the test itself.
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(_with_workers(config, worker_timeout=60)))
    script = tmp_path / "stress.py"  # a file: spawned workers re-import the main module
    script.write_text(_STRESS_SCRIPT)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BURNERS)]
    try:
        out = subprocess.run(
            [sys.executable, str(script), str(path), str(STRESS)],
            capture_output=True,
            text=True,
            timeout=120 + 30 * STRESS,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    finally:
        for p in burners:
            p.kill()
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["runs"] == STRESS


def test_a_reader_opens_its_split_as_it_is_unpickled(config):
    # In a worker, unpickling runs on the main thread before any read thread starts; a
    # source opened lazily on first read was opened by two read threads at once.
    meta = read_metadata(config)
    reader = WindowReader(str(dataset_dir(config)), "train", 32, meta["splits"]["train"]["tokens"])
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._source is not None
    assert np.array_equal(copy(np.array([0, 1]))["tokens"], reader(np.array([0, 1]))["tokens"])


def _until_error(it, limit: int = 100) -> JaxgenError:
    """Consumes what the buffers still hold until the loader raises."""
    for _ in range(limit):
        try:
            next(it)
        except JaxgenError as e:
            return e
    raise AssertionError(f"no error after {limit} batches")


def test_a_killed_worker_is_one_line_naming_it(config):
    with train_batches(_with_workers(config, worker_timeout=30), None) as it:
        as_numpy(next(it))
        (pid,) = it._watch.pids().values()
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        error = _until_error(it)
        assert time.monotonic() - start < 30
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"data: worker process 0 (pid {pid}) of 'train/seed=0/batch=8/seq=32' died:")
    assert message.endswith("died: Worker process was terminated unexpectedly with exit code -9")


def test_a_worker_slower_to_start_than_the_timeout_is_not_a_stall(config):
    # A fresh interpreter importing JAX and TFDS takes seconds (more under load): the
    # timeout counts from the worker's start, not from the first request.
    with train_batches(_with_workers(config, worker_timeout=1), None) as it:
        batches = [as_numpy(next(it)) for _ in range(3)]
    assert len(batches) == 3


def test_a_stopped_worker_times_out_and_is_killed(config):
    with train_batches(_with_workers(config, worker_timeout=3), None) as it:
        as_numpy(next(it))
        (pid,) = it._watch.pids().values()
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        error = _until_error(it)
        waited = time.monotonic() - start
        assert 3 <= waited < 15
        message = str(error)
        assert "\n" not in message
        assert f"worker process 0 (pid {pid}) is stopped (SIGSTOP)" in message
        assert "no batch of 'train/seed=0/batch=8/seq=32' came in 3 s (data.worker_timeout)" in message
        time.sleep(0.5)
        assert not os.path.exists(f"/proc/{pid}") or _proc_state(pid) == "Z"  # killed


def _proc_state(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_stuck_worker_is_named_with_the_frame_it_is_in():
    # A live worker that never yields: its stack is dumped and the frame named.
    ds = grain.MapDataset.source([3600.0] * 4).map(time.sleep).to_iter_dataset()
    watch = WorkerWatch(1, 4, "'sleep'")
    it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1), worker_init_fn=watch.init_fn()))
    try:
        with pytest.raises(JaxgenError) as e:
            watch.next(it)
    finally:
        it.close()
        watch.close()
    (pid,) = watch.pids().values()
    assert f"worker process 0 (pid {pid}) was in _map_element (map.py:" in str(e.value)
    assert "(all its threads: " in str(e.value)


def test_where_prefers_the_innermost_jaxgen_frame():
    dump = (
        "Thread 0x1 (most recent call first):\n"
        '  File "/x/site-packages/grain/map.py", line 161 in _map_element\n'
        '  File "/x/jaxgen/data/builder.py", line 180 in open_split\n'
        '  File "/x/jaxgen/data/pipeline.py", line 64 in _chunks\n'
    )
    assert _where(dump) == "open_split (jaxgen/data/builder.py:180)"
    assert _where(dump.replace("/jaxgen/", "/other/")) == "_map_element (map.py:161)"
    assert _where("") is None


def test_train_ends_with_one_line_when_a_worker_dies_and_resumes(corpus, tmp_path):
    run_dir = tmp_path / "run"
    overrides = _overrides(
        corpus,
        **{
            "train.steps": 100000,
            "train.log_every": 1,
            "checkpoint.every": 5,
            "checkpoint.async_save": False,
            "data.worker_count": 1,
            "data.worker_timeout": 60,
        },
    )
    cmd = [
        sys.executable,
        "-m",
        "jaxgen.cli",
        "train",
        str(ROOT / "configs" / "tiny.yaml"),
        "--run-dir",
        str(run_dir),
    ]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        cmd + overrides, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "5").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        (worker,) = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        os.kill(worker, signal.SIGKILL)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: data: worker process 0 (pid {worker}) of 'train/"), err[-3000:]
    assert last.endswith(" died: Worker process was terminated unexpectedly with exit code -9")
    assert "Traceback" not in err
    steps = checkpoint.manager(run_dir, read_only=True).all_steps()
    assert steps and steps[-1] >= 5
    resumed = subprocess.run(
        cmd + [*overrides, f"train.steps={steps[-1] + 2}"],  # the last of a key wins
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = resumed.stdout.splitlines()  # whole lines, however long (no wrapping at 80 columns)
    assert f"resumed from {run_dir}/checkpoints/{steps[-1]}" in lines
    assert any(
        line.endswith(f"mesh {{'data': 1, 'fsdp': 1, 'tensor': 1}}, run dir {run_dir}") for line in lines
    )
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
