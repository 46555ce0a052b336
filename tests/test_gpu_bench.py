"""benchmarks/gpu (issue 19's GPU harness) cannot rot between GPU runs: its CPU smoke mode
runs every row end to end in a subprocess, its scripts pass shellcheck and dry-run, and the
wheels it carries to the offline GPU machine cover pyproject.toml's dependencies."""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))  # the harness's modules import each other by plain name

import report  # noqa: E402
import run  # noqa: E402
import wheel_list  # noqa: E402
from rows import ROWS  # noqa: E402

SHELLCHECK = pathlib.Path(sys.executable).parent / "shellcheck"
PEERS = importlib.util.find_spec("torch") is not None


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `run.py --cpu-smoke` (all rows) in a subprocess: (records, output, RESULTS.md)."""
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    out, md = tmp / "results.jsonl", tmp / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Earlier section\n\nkept as it was\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        [sys.executable, str(GPU / "run.py"), "--cpu-smoke", "--out", str(out), "--results-md", str(md)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records, proc.stdout, md.read_text()


def test_smoke_every_row_measured(smoke):
    records, stdout, _ = smoke
    assert [r["record"] for r in records[:1] + records[-1:]] == ["env", "end"]
    rows = {r["row"]: r for r in records if r["record"] == "row"}
    assert list(rows) == [row.name for row in ROWS]
    for row in ROWS:
        r = rows[row.name]
        assert r["status"] == "ok", r.get("traceback")
        assert {
            "priority",
            "title",
            "kind",
            "mode",
            "metric",
            "unit",
            "setting",
            "jaxgen",
            "peer",
            "target",
        } <= set(r)
        for side in ("jaxgen", "peer") if r["peer"] is not None else ("jaxgen",):
            s = r[side]
            assert all(_finite(s[k]) and s[k] > 0 for k in ("median", "min", "max")), (row.name, side, s)
            assert s["values"] and all(_finite(v) for v in s["values"]), (row.name, side)
            assert _finite(s["compile_s"]), (row.name, side)
        if row.kind == "compile":
            variants = r["jaxgen"]["variants"]
            assert sorted(variants) == ["scan_1", "scan_2", "unrolled_1", "unrolled_2"]
            assert all(_finite(v["compile_s"]) and _finite(v["tokens_per_s"]) for v in variants.values())
        elif len(r["jaxgen"]["values"]) > 1 and r["peer"] is not None:
            assert r["orders"][:2] == ["jaxgen-peer", "peer-jaxgen"]  # alternating order
        if row.kind == "train":
            assert "mfu" in r["jaxgen"] and r["jaxgen"]["mfu"] is None  # no peak FLOP/s for a CPU
        if row.min_floor_fraction is not None:
            assert _finite(r["jaxgen"]["floor_fraction"])
        # Peers run wherever torch is importable; otherwise the output says jaxgen ran alone.
        assert (r["peer"] is not None) == (PEERS and row.peer is not None), row.name
    if not PEERS:
        assert "jaxgen alone" in stdout


def test_smoke_table_added_to_results(smoke):
    _, stdout, md = smoke
    assert md.startswith("# Benchmark results\n\n## Earlier section\n\nkept as it was\n")
    assert md.count(report.GPU_HEADING) == 1
    table = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [line.split(" | ")[1] for line in table] == [row.title for row in ROWS]
    assert "| 1 | " + ROWS[0].title in stdout


def test_results_only_added_to(tmp_path):
    """A second run's section lands after the first, inside the GPU section; nothing is lost."""
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nintro\n")
    report.append_results(md, "### run 1\n\nfirst\n")
    md.write_text(md.read_text() + "\n## A later section\n\nlater\n")
    report.append_results(md, "### run 2\n\nsecond\n")
    text = md.read_text()
    assert text.index("intro") < text.index("run 1") < text.index("run 2") < text.index("## A later section")
    assert text.count(report.GPU_HEADING) == 1 and "later\n" in text


def test_dry_run_plans_every_row_within_the_deadline():
    args = run.parse_args(["--dry-run"])
    lines = run.plan(args).splitlines()[1:]
    assert [line.split()[0] for line in lines] == [row.name for row in ROWS]
    ends = [float(m.group(1)) for line in lines if (m := re.search(r"ends by\s+(\d+) s", line))]
    assert ends and max(ends) <= args.deadline_s and ROWS[0].name in lines[0] and "ends by" in lines[0]


def test_scripts_shellcheck_and_dry_run():
    scripts = [GPU / "run.sh", GPU / "install.sh", GPU / "prepare_wheels.sh", GPU / "followup.sh"]
    subprocess.run([str(SHELLCHECK), *map(str, scripts)], check=True)
    out = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run"], capture_output=True, text=True,
                         env=os.environ | {"PYTHON": sys.executable}, check=True, timeout=60)  # fmt: skip
    assert all(row.name in out.stdout for row in ROWS)


def test_no_module_shadows_the_standard_library():
    # The scripts run with benchmarks/gpu first on sys.path: a profile.py there replaced
    # Python's `profile`, which torch's compiler imports (through cProfile), and every peer
    # row failed on import on the GPU.
    clashes = sorted(p.stem for p in GPU.glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not clashes


def test_wheels_cover_pyproject_dependencies():
    """Every dependency is on the GPU machine's image or travels as a wheel at a version
    that satisfies pyproject.toml (the version this venv runs with)."""
    wheels = wheel_list.closure()
    for req in wheel_list.dependencies():
        name = canonicalize_name(req.name)
        if name in wheel_list.GPU_IMAGE:
            continue
        assert name in wheels, f"{req} neither on the GPU image nor in the wheel list"
        assert req.specifier.contains(wheels[name], prereleases=True), (req, wheels[name])
    assert not set(wheels) & wheel_list.GPU_IMAGE
    assert {"jax", "flax", "optax", "orbax-checkpoint", "torch", "transformers"} <= wheel_list.GPU_IMAGE
    assert all(Requirement(f"{n}=={v}") for n, v in wheels.items())


def test_mfu_peak_by_device_name():
    import machine

    assert machine.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert machine.peak_flops("NVIDIA H200") == 989e12
    assert machine.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert machine.peak_flops("NVIDIA L4") == 121e12
    for other in (
        "NVIDIA H100 PCIe",
        "NVIDIA H200 NVL",
        "NVIDIA L40S",
        "NVIDIA GeForce RTX 4090",
        "cpu",
        None,
    ):
        assert machine.peak_flops(other) is None


def test_profile_names_the_ops_a_row_spends_its_time_in(tmp_path):
    """profile_rows.py --cpu-smoke: one decode row under the profiler, summarised to a text file."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        [sys.executable, str(GPU / "profile_rows.py"), "--cpu-smoke", "--rows", "decode_gpt2_124m_b1",
         "--trace-dir", str(tmp_path / "traces"), "--summary-dir", str(tmp_path / "summary")],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = (tmp_path / "summary" / "decode_gpt2_124m_b1.txt").read_text()
    ops = re.findall(r"^(\S+)\s+([\d.]+)\s+([\d.]+)%\s+(\d+)$", text, re.M)
    assert len(ops) >= 5, text
    assert sum(float(share) for _, _, share, _ in ops) <= 100.5
    assert all(float(ms) >= 0 and int(calls) > 0 for _, ms, _, calls in ops)
    assert float(ops[0][1]) > 0, text  # the top op took measurable time
    # --summarize reads the same trace again.
    trace = tmp_path / "traces" / "decode_gpt2_124m_b1"
    again = subprocess.run(
        [sys.executable, str(GPU / "profile_rows.py"), "--summarize", str(trace)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert again.returncode == 0 and text.split("\n", 1)[1] == again.stdout
