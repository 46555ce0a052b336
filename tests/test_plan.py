"""`jaxgen plan`: the real train step and decoding loop compiled ahead of time for a topology.

The cpu:8 plans run on the 8 fake CPU devices of conftest.py and share one compile of
the tiny model's train step (planner caches compiled programs by config and mesh). TPU
topologies need libtpu (the `tpu` extra); their tests run where it is installed.
"""

import importlib.util
import json
import pathlib

import pytest

from jaxgen.cli import main
from jaxgen.errors import JaxgenError
from jaxgen.plan import parse_topology, topology_devices
from jaxgen.plan.advice import advise
from jaxgen.plan.report import size

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# The tiny model on cpu:8: data-parallel 8 ways, 2 sequences per device.
TRAIN = ["plan", TINY, "--topology", "cpu:8", "train.batch_size=16", "model.dtype=float32"]
GENERATE = [*TRAIN, "--generate", "generate.max_new_tokens=16", "generate.batch_size=8"]
KNOWN = (
    "known: cpu:N, v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB, each with Kx in front for K slices"
    " (e.g. 2xv5e:16x16)"
)


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_json(capsys, argv: list[str]) -> tuple[int, dict]:
    code, out, _ = run(capsys, [*argv, "--json"])
    return code, json.loads(out)


# ----------------------------------------------------------------------------- topologies


@pytest.mark.parametrize(
    "text, platform, devices, libtpu_name, wrap",
    [
        ("cpu:8", "cpu", 8, None, None),
        ("v4:2x2x2", "tpu", 8, "v4:2x2x2", (False, False, False)),
        ("v5e:4x4", "tpu", 16, "v5e:4x4", (False, False, False)),
        ("v5e:16x16", "tpu", 256, "v5e:16x16", (True, True, False)),
        ("v5p:4x4x4", "tpu", 64, "v5:4x4x4", (True, True, True)),
        ("v6e:8x8", "tpu", 64, "v6e:8x8", (False, False, False)),
        ("2xv5e:16x16", "tpu", 512, "v5e:16x16", (True, True, False)),
    ],
)
def test_topologies_parse(text, platform, devices, libtpu_name, wrap):
    topology = parse_topology(text)
    assert (topology.platform, topology.num_devices) == (platform, devices)
    if platform == "tpu":
        assert (topology.libtpu_name, topology.wrap, topology.host_bounds) == (libtpu_name, wrap, (2, 2, 1))


@pytest.mark.parametrize(
    "text, why",
    [
        ("v9:4x4", ": no chip 'v9'"),
        ("v5e:4x4x4", ": v5e slices have 2 axes"),
        ("cpu:2x2", ": cpu takes one device count, cpu:N"),
        ("v5e-16", ""),
        ("v5e:0x4", ""),
    ],
)
def test_unknown_topology_lists_the_known_ones(capsys, text, why):
    code, out, err = run(capsys, ["plan", TINY, "--topology", text])
    assert (code, out) == (1, "")
    assert err == f"error: unknown topology {text!r}{why} ({KNOWN})\n"


def test_tpu_topology_without_libtpu_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(JaxgenError) as e:
        topology_devices(parse_topology("v5e:4x4"))
    assert str(e.value) == 'topology v5e:4x4: libtpu is not installed; pip install -e ".[tpu]"'


def test_more_cpu_devices_than_jax_started_with():
    with pytest.raises(JaxgenError) as e:
        topology_devices(parse_topology("cpu:16"))
    assert str(e.value) == (
        "topology cpu:16: JAX started with 8 CPU devices;"
        " set XLA_FLAGS=--xla_force_host_platform_device_count=16 before JAX starts"
        " (jaxgen plan does this itself when it runs first)"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["mesh.data=2", "mesh.fsdp=2"],
            "mesh: data*fsdp*tensor = 2*2*1 = 4 but topology cpu:8 has 8 devices (1 process x 8 devices"
            " per process); set the axes to multiply to 8 or one of them to -1",
        ),
        (
            ["mesh.fsdp=3"],
            "mesh: {'data': -1, 'fsdp': 3, 'tensor': 1} cannot fill them: topology cpu:8 has 8 devices"
            " (1 process x 8 devices per process), not a multiple of 3",
        ),
    ],
)
def test_mesh_that_does_not_match_the_devices(capsys, overrides, message):
    code, out, err = run(capsys, [*TRAIN, *overrides])
    assert (code, out, err) == (1, "", f"error: {message}\n")


def test_mfu_out_of_range(capsys):
    code, _, err = run(capsys, [*TRAIN, "--mfu", "1.5"])
    assert (code, err) == (1, "error: --mfu: 1.5 must be in (0, 1]\n")


# ----------------------------------------------------------------------------- cpu:8 plans


def test_cpu_train_plan_prints_memory_flops_and_fits(capsys):
    code, out, _ = run(capsys, TRAIN)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == (
        "plan tiny: train step on cpu:8: 8 devices (1 process x 8 devices per process),"
        " mesh {'data': 8, 'fsdp': 1, 'tensor': 1}"
    )
    for row in ("parameters", "optimizer state", "batch", "temporaries", "total", "capacity"):
        assert any(line.startswith(f"  {row} ") for line in lines), row
    assert any(line.startswith("FITS: ") for line in lines)
    assert "at 50% MFU: n/a (cpu:8 has no peak FLOP/s figure)" in lines

    _, plan = plan_json(capsys, TRAIN)
    # Data parallel: every device holds all 2-layer tiny params in float32 and AdamW's two
    # moments of each; the batch is split 8 ways (5 [16, 64] fields of 4 bytes).
    params = plan["memory"]["parameters"]
    assert params % 4 == 0 and plan["memory"]["optimizer state"] >= 2 * params
    assert plan["memory"]["batch"] == 5 * 16 * 64 * 4 // 8
    assert plan["total_bytes"] >= params + plan["memory"]["optimizer state"] + plan["memory"]["temporaries"]
    assert plan["fits"] is True and plan["xla_flops"] > 0 and plan["model_flops"] > 0
    assert (plan["devices"], plan["processes"], plan["tokens"]) == (8, 1, 16 * 64)
    assert plan["step_seconds"] is None and plan["advice"] == []


def test_fake_hbm_decides_fits_or_not(capsys):
    _, plan = plan_json(capsys, TRAIN)
    total = plan["total_bytes"]
    code, out, _ = run(capsys, [*TRAIN, "--hbm", str(total)])
    assert code == 0 and f"FITS: 0 B to spare (0% of {size(total)} --hbm)" in out.splitlines()
    code, out, _ = run(capsys, [*TRAIN, "--hbm", str(total - 1000), "--advice-seconds", "0"])
    assert code == 3, out
    share = 1000 / (total - 1000) * 100
    assert f"DOES NOT FIT: 1000 B over ({share:.0f}% of {size(total - 1000)} --hbm)" in out.splitlines()
    advice = out.split("what would lower memory per device:\n", 1)[1].splitlines()
    assert [line.split(": ")[0].strip() for line in advice] == [
        "mesh.data=1 mesh.fsdp=8",
        "train.grad_accum=2",
        "model.remat=dots_saveable",
    ]
    assert "estimate; fits" in advice[0] and "not compiled" in advice[2]


def test_advice_compiles_within_the_budget(capsys):
    """Each knob's config (overrides applied) goes to the compiler while time is left."""
    from jaxgen.config import load_config
    from jaxgen.plan import make_plan

    config = load_config(TINY, TRAIN[4:])
    topology = parse_topology("cpu:8")
    plan = make_plan(config, topology, topology_devices(topology), hbm=1 << 20, advice_seconds=0)
    seen = []

    def total_of(changed):
        seen.append((changed.mesh.fsdp, changed.train.grad_accum, changed.model.remat))
        return 123

    advised = advise(plan, plan_config(config, topology), total_of, budget_seconds=60)
    assert seen == [(8, 1, "none"), (1, 2, "none"), (1, 1, "dots_saveable")]
    assert all(a.compiled and a.total_bytes == 123 for a in advised.advice)
    none = advise(plan, plan_config(config, topology), total_of, budget_seconds=0)
    assert len(seen) == 3 and not any(a.compiled for a in none.advice)


def plan_config(config, topology):
    from jaxgen.plan import resolve_for

    return resolve_for(config, topology)


def test_generate_plan_counts_weights_and_kv_cache(capsys):
    code, plan = plan_json(capsys, GENERATE)
    assert code == 0 and plan["kind"] == "generate"
    # One row per device (batch 8 over data 8); cache [L=2, 1, K=4, S=64, H=16] float32, keys and values.
    assert plan["memory"]["kv cache (in temporaries)"] == 2 * (2 * 1 * 4 * 64 * 16 * 4)
    assert plan["memory"]["temporaries"] >= plan["memory"]["kv cache (in temporaries)"]
    _, train = plan_json(capsys, TRAIN)
    assert plan["memory"]["parameters"] == train["memory"]["parameters"]
    assert plan["settings"].endswith("batch 8, prompt 48 + 16 new tokens")
    code, out, _ = run(capsys, GENERATE)
    assert code == 0 and out.startswith("plan tiny: generation (prefill + decode loop) on cpu:8")


# ----------------------------------------------------------------------------- TPU topologies


def test_tpu_plan_with_libtpu(capsys):
    pytest.importorskip("libtpu")
    code, out, err = run(capsys, ["plan", TINY, "--topology", "v5e:4x4", "train.batch_size=16"])
    assert code == 0, err
    assert out.startswith(
        "plan tiny: train step on v5e:4x4: 16 devices (4 processes x 4 devices per process),"
        " mesh {'data': 16, 'fsdp': 1, 'tensor': 1}"
    )
    assert "dtype bfloat16" in out and "layers scanned" in out
    assert "of 16.0 GiB v5e HBM)" in out and "at 50% MFU of 197 TFLOP/s per chip: " in out
    code, _, err = run(capsys, ["plan", TINY, "--topology", "2xv5e:4x4", "mesh.data=1", "mesh.fsdp=64"])
    assert code == 1 and err == (
        "error: mesh: data*fsdp*tensor = 1*64*1 = 64 but topology 2xv5e:4x4 has 32 devices"
        " (8 processes x 4 devices per process); set the axes to multiply to 32 or one of them to -1\n"
    )
