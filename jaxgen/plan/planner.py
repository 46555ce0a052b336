"""`jaxgen plan`: compile a config's real program for a topology and judge the fit.

    devices = topology_devices(topology)
    plan = make_plan(config, topology, devices)   # compile, measure
    print(format_plan(plan))

Settings the model resolves by platform (`model.dtype: auto`, `model.scan_layers: null`)
are resolved for the *target* here, not for the CPU that compiles: a TPU plan runs in
bfloat16 with scanned layers, as `jaxgen train` would on the slice.
"""

from __future__ import annotations

import functools
import math
import os

from jax.sharding import Mesh

from jaxgen.config import Config
from jaxgen.errors import JaxgenError
from jaxgen.model.transformer import model_flops_per_token
from jaxgen.plan.advice import advise
from jaxgen.plan.devices import Devices
from jaxgen.plan.programs import Program, generate_program, train_program
from jaxgen.plan.report import Plan, size
from jaxgen.plan.topology import Topology
from jaxgen.runtime.mesh import MESH_AXES, make_mesh

# The argument groups of programs.py (the rest of a program's memory is the compiler's).
ARGUMENT_GROUPS = ("parameters", "optimizer state", "frozen weights", "batch")
KV_CACHE = "kv cache (in temporaries)"


def resolve_for(config: Config, topology: Topology) -> Config:
    """`config` with its by-platform model settings fixed for the target's platform."""
    m = config.model
    tpu = topology.platform == "tpu"
    update = {}
    if m.dtype == "auto":
        update["dtype"] = "bfloat16" if tpu else "float32"  # as model/layers.compute_dtype picks
    if m.scan_layers is None:
        update["scan_layers"] = tpu  # as model/transformer picks by platform
    return config.model_copy(update={"model": m.model_copy(update=update)})


def check_mesh(config: Config, topology: Topology, devices: Devices) -> None:
    """Raises unless the config's mesh uses exactly the topology's devices.

    Raises:
        JaxgenError: one line with the mesh, the device count and the devices per process.
    """
    sizes = dict(zip(MESH_AXES, (config.mesh.data, config.mesh.fsdp, config.mesh.tensor), strict=True))
    n = len(devices.devices)
    where = (
        f"topology {topology.name} has {n} devices"
        f" ({devices.processes} process{'es' if devices.processes > 1 else ''}"
        f" x {devices.per_process} devices per process)"
    )
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if n % known:
            raise JaxgenError(f"mesh: {sizes} cannot fill them: {where}, not a multiple of {known}")
        return
    if known != n:
        product = "*".join(str(s) for s in sizes.values())
        raise JaxgenError(
            f"mesh: data*fsdp*tensor = {product} = {known} but {where}; set the axes to multiply to {n}"
            " or one of them to -1"
        )


def capacity(topology: Topology, devices: Devices, hbm: int | None) -> tuple[int, str]:
    """(bytes one device may use, where that figure comes from)."""
    if hbm is not None:
        return hbm, "--hbm"
    if topology.hbm_bytes is not None:
        return topology.hbm_bytes, f"{topology.chip.name} HBM"
    # Fake CPU devices share the host's memory.
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ram // len(devices.devices), f"host RAM / {len(devices.devices)} devices"


def compile_program(config: Config, mesh: Mesh, generate: bool) -> Program:
    """The compiled program (cached: an advice knob or a second plan of the same config
    and mesh, with another --hbm or --mfu, reuses it)."""
    return _compile_cached(config.model_dump_json(), mesh, generate)


@functools.lru_cache(maxsize=16)
def _compile_cached(config_json: str, mesh: Mesh, generate: bool) -> Program:
    config = Config.model_validate_json(config_json)
    return generate_program(config, mesh) if generate else train_program(config, mesh)


def memory_rows(program: Program) -> tuple[dict[str, int], int]:
    """The per-device memory table and its total (arguments + temporaries + code, and
    the outputs that do not reuse a donated argument's buffer)."""
    rows = dict(program.groups)
    if program.out_of_memory is not None:
        need = program.out_of_memory[0]
        arguments = sum(v for k, v in rows.items() if k in ARGUMENT_GROUPS)
        rows["temporaries and outputs"] = need - arguments
        return rows, need
    stats = program.compiled.memory_analysis()
    outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
    # The KV cache lives inside the decoding program; a tiny one on TPU was reported with
    # 0 temporaries (kept outside HBM's buffer assignment), so it is a floor here.
    temps = max(stats.temp_size_in_bytes, rows.get(KV_CACHE, 0))
    total = stats.argument_size_in_bytes + outputs + temps + stats.generated_code_size_in_bytes
    rows.update(
        {
            "temporaries": temps,
            "outputs (not donated)": outputs,
            "generated code": stats.generated_code_size_in_bytes,
        }
    )
    return rows, total


def xla_flops(program: Program) -> float | None:
    if program.compiled is None:
        return None
    cost = program.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return None if flops is None else float(flops)


def make_plan(
    config: Config,
    topology: Topology,
    devices: Devices,
    *,
    generate: bool = False,
    mfu: float = 0.5,
    hbm: int | None = None,
    advice_seconds: float = 600.0,
) -> Plan:
    """Compiles `config`'s train step (or generation with `generate`) for `topology`.

    Args:
        config: the experiment; its `mesh` must use exactly the topology's devices.
        topology: the target (`parse_topology`).
        devices: `topology_devices(topology)`.
        generate: plan the decoding program instead of the train step.
        mfu: the model FLOPs utilisation the step time and tokens/s assume.
        hbm: bytes per device to judge against instead of the chip's HBM.
        advice_seconds: when it does not fit, compile the knobs that would help for at
            most about this long (0: estimates only).

    Returns:
        The plan; its `advice` is empty when the program fits.
    """
    if not 0 < mfu <= 1:
        raise JaxgenError(f"--mfu: {mfu} must be in (0, 1]")
    config = resolve_for(config, topology)
    check_mesh(config, topology, devices)
    mesh = make_mesh(config.mesh, list(devices.devices))
    program = compile_program(config, mesh, generate)
    plan = _figures(config, topology, devices, mesh, program, mfu, hbm)
    if plan.fits:
        return plan
    return advise(plan, config, lambda c: _total(c, mesh, generate), advice_seconds)


def _total(config: Config, mesh: Mesh, generate: bool) -> int:
    return memory_rows(compile_program(config, mesh, generate))[1]


def _figures(config, topology, devices, mesh, program: Program, mfu, hbm) -> Plan:
    m, t = config.model, config.train
    rows, total = memory_rows(program)
    cap, source = capacity(topology, devices, hbm)
    notes = []
    if program.out_of_memory is not None:
        need, have = program.out_of_memory
        notes.append(
            f"the TPU compiler stopped: the program needs {size(need)} per device and the chip leaves"
            f" {size(have)} to programs; temporaries are that total less the arguments"
        )
    model_flops = None
    settings = f"dtype {m.dtype}, params {m.param_dtype}"
    if program.kind == "train":
        model_flops = model_flops_per_token(m, t.seq_len) * program.tokens
        layers = "scanned" if m.scan_layers else "unrolled"
        settings += f", layers {layers}, remat {m.remat}, grad_accum {t.grad_accum}, {config.optimizer.name}"
        if m.scan_layers and program.compiled is not None:
            notes.append("XLA counts a loop body once: with scanned layers its FLOPs are about one layer's")
    else:
        notes.append("XLA counts a loop body once: its FLOPs are the prefill and one decode step")
    return Plan(
        kind=program.kind,
        config_name=config.name,
        model=f"{m.family} {m.num_layers}x{m.d_model}, vocab {m.vocab_size}",
        settings=f"{settings}; {program.shape}",
        topology=topology.name,
        devices=len(devices.devices),
        processes=devices.processes,
        mesh=dict(mesh.shape),
        compile_seconds=program.compile_seconds,
        memory=rows,
        total_bytes=total,
        capacity_bytes=cap,
        capacity_source=source,
        xla_flops=xla_flops(program),
        model_flops=model_flops,
        tokens=program.tokens,
        peak_flops=topology.peak_flops,
        mfu=mfu,
        notes=tuple(notes),
    )
