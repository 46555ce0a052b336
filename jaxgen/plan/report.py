"""What a plan found, as figures (`Plan`), a table for people and a dict for scripts.

Memory is per device, from XLA's buffer assignment of the compiled program
(`compiled.memory_analysis()`): arguments, outputs, temporaries (activations, gradients,
collectives' buffers) and code. Outputs aliased to donated arguments (the train state)
are counted once. The argument bytes are split into named groups (parameters, optimizer
state, batch, ...) from the shardings of the abstract arguments.

Speed comes from FLOPs. MFU is defined on *model* FLOPs (6N + 12LHQT per token, the
figure the training loop's MFU uses), so the step time at a given MFU is model FLOPs
over (chips x peak x MFU). XLA's own count (`compiled.cost_analysis()`) is shown beside it:
it includes recomputation under remat, and counts a loop body once, so with scanned
layers it holds about one layer's share of the work.
"""

from __future__ import annotations

import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Advice:
    """One knob that lowers per-device memory, and its total.

    Attributes:
        overrides: the config overrides that set it (`mesh.fsdp=8`, ...).
        why: what it trades.
        total_bytes: per-device total with it (None: no estimate without a compile).
        compiled: True when `total_bytes` comes from compiling the changed program.
    """

    overrides: tuple[str, ...]
    why: str
    total_bytes: int | None
    compiled: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """The figures of one planned program on one topology (bytes per device)."""

    kind: str  # "train" or "generate"
    config_name: str
    model: str  # "llama 32x4096, vocab 128256"
    settings: str  # dtype, layer loop, remat, batch
    topology: str
    devices: int
    processes: int
    mesh: dict[str, int]
    compile_seconds: float
    memory: dict[str, int]  # argument groups, then temporaries, outputs, code
    total_bytes: int
    capacity_bytes: int
    capacity_source: str  # "v5e HBM", "--hbm", "host RAM / 8 devices"
    xla_flops: float | None  # per device, per call
    model_flops: float | None  # all devices, per step (train)
    tokens: int  # per call
    peak_flops: float | None  # per chip
    mfu: float
    notes: tuple[str, ...] = ()
    advice: tuple[Advice, ...] = ()

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def margin_bytes(self) -> int:
        """Capacity left (negative: bytes missing)."""
        return self.capacity_bytes - self.total_bytes

    @property
    def step_seconds(self) -> float | None:
        if self.model_flops is None or self.peak_flops is None:
            return None
        return self.model_flops / (self.devices * self.peak_flops * self.mfu)

    @property
    def tokens_per_second(self) -> float | None:
        seconds = self.step_seconds
        return None if seconds is None else self.tokens / seconds

    def to_dict(self) -> dict:
        """Everything, in plain JSON types (bytes as integers, seconds as floats)."""
        out = dataclasses.asdict(self)
        out["advice"] = [dataclasses.asdict(a) for a in self.advice]
        out.update(
            fits=self.fits,
            margin_bytes=self.margin_bytes,
            step_seconds=self.step_seconds,
            tokens_per_second=self.tokens_per_second,
        )
        return out


def size(n: float) -> str:
    """Bytes in binary units: '512 B', '3.4 MiB', '15.2 GiB' (negative sizes keep their sign)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def verdict(plan: Plan) -> str:
    """'FITS: 2.1 GiB to spare (13% of 16.0 GiB)' or 'DOES NOT FIT: 3.2 GiB over ...'."""
    share = abs(plan.margin_bytes) / plan.capacity_bytes * 100
    cap = f"{share:.0f}% of {size(plan.capacity_bytes)} {plan.capacity_source}"
    if plan.fits:
        return f"FITS: {size(plan.margin_bytes)} to spare ({cap})"
    return f"DOES NOT FIT: {size(-plan.margin_bytes)} over ({cap})"


def format_plan(plan: Plan) -> str:
    """The plan as the lines `jaxgen plan` prints."""
    program = "train step" if plan.kind == "train" else "generation (prefill + decode loop)"
    per = plan.devices // plan.processes
    lines = [
        f"plan {plan.config_name}: {program} on {plan.topology}: {plan.devices} devices"
        f" ({_count(plan.processes, 'process')} x {_count(per, 'device')} per process), mesh {plan.mesh}",
        f"model {plan.model}; {plan.settings}",
        f"compiled in {plan.compile_seconds:.1f} s",
        "",
        "per device",
    ]
    width = max(len(k) for k in (*plan.memory, "capacity")) + 2
    for name, value in plan.memory.items():
        lines.append(f"  {name:<{width}}{size(value):>12}")
    lines.append(f"  {'total':<{width}}{size(plan.total_bytes):>12}")
    lines.append(f"  {'capacity':<{width}}{size(plan.capacity_bytes):>12}  ({plan.capacity_source})")
    lines += [verdict(plan), ""]
    lines += _speed_lines(plan)
    lines += [f"note: {n}" for n in plan.notes]
    if plan.advice:
        lines += ["", "what would lower memory per device:"]
        lines += [f"  {_advice_line(plan, a)}" for a in plan.advice]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def _speed_lines(plan: Plan) -> list[str]:
    lines = []
    if plan.xla_flops is not None:
        lines.append(
            f"FLOPs per {'step' if plan.kind == 'train' else 'call'} (XLA cost analysis):"
            f" {plan.xla_flops:.3g} per device, {plan.xla_flops * plan.devices:.3g} all devices"
        )
    if plan.model_flops is not None:
        lines.append(f"model FLOPs per step (6N + 12LHQT x {plan.tokens:,} tokens): {plan.model_flops:.3g}")
    if plan.kind != "train":
        return lines
    mfu = f"at {plan.mfu:.0%} MFU"
    if plan.step_seconds is None:
        lines.append(f"{mfu}: n/a ({plan.topology} has no peak FLOP/s figure)")
    else:
        lines.append(
            f"{mfu} of {plan.peak_flops / 1e12:.0f} TFLOP/s per chip: {plan.step_seconds:.3g} s per step,"
            f" {plan.tokens_per_second:,.0f} tokens/s"
        )
    return lines


def _advice_line(plan: Plan, advice: Advice) -> str:
    knob = " ".join(advice.overrides)
    if advice.total_bytes is None:
        return f"{knob}: {advice.why} (not compiled; run plan with it to see)"
    change = advice.total_bytes - plan.total_bytes
    change = f"+{size(change)}" if change >= 0 else size(change)
    how = "compiled" if advice.compiled else "estimate"
    fits = "fits" if advice.total_bytes <= plan.capacity_bytes else "still over"
    return f"{knob}: {size(advice.total_bytes)} per device ({change}, {how}; {fits}): {advice.why}"
