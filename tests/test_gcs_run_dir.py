"""A run directory on gs:// (jaxgen/paths.py): `jaxgen train --run-dir gs://bucket/run`
writes config, tokenizer, checkpoints, metrics and TensorBoard events as objects, and a
second run resumes from them exactly.

No network: a local stand-in replaces the three places where the real stack reaches Cloud
Storage, and nothing else:
- gcsfs (`gcsfs.GCSFileSystem`, what etils.epath opens `gs://` with through fsspec) is
  replaced by an fsspec filesystem over a temporary directory: `gs://bucket/run/x` is
  `<root>/bucket/run/x`;
- TensorStore's `gcs` kvstore driver, which orbax writes arrays with, by its `file` driver
  over the same directory (orbax's `gcs_utils.get_kvstore_for_gcs`);
- the google-cloud-storage bucket query orbax makes before listing or deleting steps
  (`gcs_utils.is_hierarchical_namespace_enabled`): a plain bucket, as most are.
Everything else runs as it would against a bucket: the paths are `epath` URLs end to end,
and orbax takes its object-store code paths (commit-file saves, no renames).
"""

import importlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from jaxgen import checkpoint
from jaxgen.cli.app import main
from jaxgen.paths import is_url, run_path

ROOT = pathlib.Path(__file__).parent.parent
RUN = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> pathlib.Path:
    """The stand-in's local directory: `gs://bucket/...` lands in `<it>/bucket/...`."""
    root = tmp_path / "gcs"
    root.mkdir()

    class StandIn(DirFileSystem):  # in place of gcsfs.GCSFileSystem
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):  # epath passes gcsfs's finalize_on_close
            super().__init__(path=str(root), fs=LocalFileSystem())

    def kvstore(path: str) -> dict:
        bucket_name, rest = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": str(root / bucket_name / rest)}

    registry = importlib.import_module("fsspec.registry")._registry  # `fsspec.registry` is its view
    for protocol in StandIn.protocol:
        monkeypatch.setitem(registry, protocol, StandIn)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    # epath keeps one filesystem per protocol for the process: forget it on both sides
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "shakespeare.txt").write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    return root


def _overrides(corpus: pathlib.Path) -> list[str]:
    return [
        "model.preset=tiny",
        "model.dtype=float32",
        "model.max_len=32",
        "tokenizer.vocab_size=200",
        f"data.train_files=[{corpus / 'shakespeare.txt'}]",
        f"data.data_dir={corpus / 'prepared'}",
        "train.steps=8",
        "train.batch_size=8",
        "train.seq_len=32",
        "train.log_every=2",
        "checkpoint.every=4",
        "checkpoint.async_save=False",
        "optimizer.learning_rate=1e-2",
        "schedule.warmup_steps=3",
    ]


def test_paths_keep_local_runs_local():
    assert type(run_path("runs/x")) is type(pathlib.Path("runs/x")) and not is_url(run_path("runs/x"))
    assert is_url(run_path(RUN)) and str(run_path(RUN) / "checkpoints") == RUN + "/checkpoints"


def test_train_in_a_bucket_resumes_exactly(bucket, corpus, capsys):
    command = ["train", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", RUN, *_overrides(corpus)]
    assert main(command) == 0
    local = bucket / "bucket" / "run"
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl"):
        assert (local / name).is_file(), name
    assert [p.name for p in (local / "events").iterdir()], "no TensorBoard events uploaded"
    for step in (4, 8):
        assert (local / "checkpoints" / str(step) / checkpoint.COMMIT_MARKER).is_file()
    straight = _records(local)
    _, params = checkpoint.load_params(RUN)  # read back through the URL
    params = jax.device_get(params)

    # An interruption after step 4's checkpoint: step 8's never happened.
    shutil.rmtree(local / "checkpoints" / "8")
    assert main(command) == 0
    assert f"resumed from {RUN}/checkpoints/4" in capsys.readouterr().out
    resumed = _records(local)
    assert [r["step"] for r in resumed] == [2, 4, 6, 8]  # trimmed to step 4, logged again once
    for before, after in zip(straight, resumed, strict=True):
        assert after["loss"] == before["loss"]  # bit-identical
    _, again = checkpoint.load_params(RUN)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), params)


def _records(run: pathlib.Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]
