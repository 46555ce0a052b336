"""Where a row's time goes: jaxgen's side of chosen rows under `jax.profiler`, summarised.

    python benchmarks/gpu/profile_rows.py --rows train_gpt2_124m,decode_gpt2_124m_b1 --summary-dir "$OUT"
    python benchmarks/gpu/profile_rows.py --cpu-smoke --rows train_gpt2_124m   # tiny shapes, CPU
    python benchmarks/gpu/profile_rows.py --summarize TRACE_DIR                # any trace already taken

Each row runs once (its GPU shape, or its smoke shape with --cpu-smoke) inside
`jax.profiler.trace`; the trace stays under --trace-dir (TensorBoard / Perfetto), and a
short text summary goes to --summary-dir/<row>.txt: the ops that took the most time, with
their share. On a GPU these are the device's kernels (XLA's op lines of the device planes);
on a CPU, XLA's ops on its compute threads. This is what names "what limits it" for a row
that misses its target (RESULTS.md); the summary of the CPU decoding profile there was read
the same way.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import tempfile

_WRAPPERS = ("ThreadpoolListener", "ThunkExecutor", "end:", "SlinkyThreadPool")


def _op_lines(planes) -> list:
    """The timelines of executed ops: the device planes' "XLA Ops" lines (all of a device
    plane's lines where it has none), else XLA's CPU threads (its compute pool, and the
    client thread that runs small programs inline)."""
    planes = list(planes)  # ProfileData hands them out once
    lines = []
    for plane in planes:
        if plane.name.startswith("/device:"):
            named = [line for line in plane.lines if "XLA Ops" in line.name]
            lines += named or [line for line in plane.lines if "XLA Modules" not in line.name]
    if lines:
        return lines
    for plane in planes:
        if plane.name == "/host:CPU":
            lines += [
                line for line in plane.lines if line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient"))
            ]
    return lines


def _busy(lines) -> tuple[int, int]:
    """(ns during which at least one op ran, ns from the first op's start to the last's end)."""
    spans = sorted((e.start_ns, e.start_ns + e.duration_ns) for line in lines for e in line.events)
    if not spans:
        return 0, 0
    busy, (start, end) = 0, spans[0]
    for a, b in spans[1:]:
        if a > end:
            busy, start = busy + end - start, a
        end = max(end, b)
    return busy + end - start, max(b for _, b in spans) - spans[0][0]


def _self_times(events) -> list[tuple[str, int]]:
    """(name, self time in ns) of each op: a `while` or `cond` on XLA's CPU timeline spans
    the ops of its body, which are counted as themselves, not again in their container."""
    ops = sorted(
        ((e.start_ns, e.duration_ns, e.name) for e in events if not e.name.startswith(_WRAPPERS)),
        key=lambda x: (x[0], -x[1]),
    )
    out: list[list] = []
    open_: list[tuple[float, int]] = []  # (end, index in out) of the ops enclosing this one
    for start, duration, name in ops:
        while open_ and open_[-1][0] <= start:
            open_.pop()
        if open_:
            out[open_[-1][1]][1] -= duration  # nested: not its container's own time
        out.append([name, duration])
        open_.append((start + duration, len(out) - 1))
    return [(name, max(ns, 0)) for name, ns in out]


def _module_spans(planes) -> list[str]:
    """Lines on the programs a device ran ("XLA Modules" lines): each program's runs and the
    time they spanned. Against the kernels' op time this shows how busy the device was while
    a program ran: a decoding loop whose kernels fill a small part of its span is bound by
    launches and the loop's per-step host round trip, not by the kernels."""
    spans, runs = collections.Counter(), collections.Counter()
    for plane in planes:
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                if "XLA Modules" in line.name:
                    for e in line.events:
                        name = re.sub(r"\(\d+\)$", "", e.name)
                        spans[name] += e.duration_ns
                        runs[name] += 1
    return [f"{name[:48]:<48} {ns / 1e6:>10.2f} ms in {runs[name]} runs" for name, ns in spans.most_common(8)]


def summarize(trace_dir: str | pathlib.Path, top: int = 15) -> str:
    """The text summary of the newest trace under `trace_dir`."""
    from jax.profiler import ProfileData

    traces = sorted(pathlib.Path(trace_dir).glob("plugins/profile/*/*.xplane.pb"))
    if not traces:
        raise SystemExit(f"profile_rows.py: no plugins/profile/*/*.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(str(traces[-1]))
    planes = list(data.planes)
    total, calls = collections.Counter(), collections.Counter()
    lines = _op_lines(planes)
    for line in lines:
        for name, ns in _self_times(line.events):
            name = re.sub(r"\.\d+$", "", name)  # fusion.12 and fusion.13: one kind of op
            total[name] += ns
            calls[name] += 1
    whole = sum(total.values()) or 1
    busy, span = _busy(lines)
    out = [
        f"trace {traces[-1]}",
        f"op time {whole / 1e6:.1f} ms in {sum(calls.values())} ops; some op running {busy / 1e6:.1f} ms"
        f" of the {span / 1e6:.1f} ms from the first op to the last ({busy / max(span, 1):.0%})",
        "",
    ]
    out += [f"{'op':<48} {'ms':>10} {'share':>7} {'calls':>7}"]
    for name, ns in total.most_common(top):
        out.append(f"{name[:48]:<48} {ns / 1e6:>10.2f} {ns / whole:>6.1%} {calls[name]:>7}")
    modules = _module_spans(planes)
    if modules:
        out += ["", "programs run on the device (span of their runs):", *modules]
    return "\n".join(out) + "\n"


def profile_row(row, smoke: bool, trace_dir: pathlib.Path) -> None:
    """Runs jaxgen's side of `row` twice, the second time under the profiler: the first
    compiles (and autotunes, whose kernels would crowd the trace) into the persistent
    compilation cache that `main` points at, which the second loads."""
    import jaxgen_side

    from jaxgen.bench.profiling import trace

    if row.kind not in ("train", "decode", "beam"):
        raise SystemExit(f"profile_rows.py: {row.name} is a {row.kind} row; profile a train or decode row")
    setting = row.setting(smoke)
    dtype = "float32" if smoke else "bfloat16"
    with tempfile.TemporaryDirectory() as data_dir:
        if row.kind == "train":
            config = jaxgen_side.train_config(setting, dtype, data_dir)
            measure = lambda: jaxgen_side.train(config, setting)  # noqa: E731
        else:
            config = jaxgen_side.decode_config(setting, dtype)
            measure = lambda: jaxgen_side.decode(config, setting)  # noqa: E731
        plain = measure()
        with trace(trace_dir):
            traced = measure()
    rates = f"{plain['tokens_per_s']:,.0f} tokens/s, {traced['tokens_per_s']:,.0f} under the profiler"
    print(f"{row.name}: {rates}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", help="comma-separated row names (rows.py)")
    p.add_argument("--cpu-smoke", action="store_true", help="the rows' tiny shapes, on CPU")
    p.add_argument("--trace-dir", type=pathlib.Path, help="where traces go (default: a temp dir)")
    p.add_argument(
        "--summary-dir", type=pathlib.Path, help="where <row>.txt summaries go (default: stdout only)"
    )
    p.add_argument("--summarize", metavar="TRACE_DIR", help="only summarise a trace already taken")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.top), end="")
        return 0
    if not args.rows:
        p.error("give --rows (or --summarize TRACE_DIR)")
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import rows as row_table
    from run import compilation_cache, setup_environment

    wanted = args.rows.split(",")
    known = {r.name: r for r in row_table.ROWS}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        p.error(f"unknown rows: {', '.join(unknown)} (known: {', '.join(known)})")
    scratch = setup_environment(args.cpu_smoke)
    compilation_cache(scratch)
    traces = args.trace_dir or pathlib.Path(tempfile.mkdtemp(prefix="jaxgen-profile-"))
    for name in wanted:
        profile_row(known[name], args.cpu_smoke, traces / name)
        text = f"row {name} ({'cpu-smoke' if args.cpu_smoke else 'gpu'})\n" + summarize(
            traces / name, args.top
        )
        print(text, flush=True)
        if args.summary_dir:
            args.summary_dir.mkdir(parents=True, exist_ok=True)
            (args.summary_dir / f"{name}.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
