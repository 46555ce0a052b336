"""Issue 19's GPU table in one run: jaxgen vs nanoGPT (training) and Hugging Face (decoding).

    benchmarks/gpu/run.sh                          # on the GPU machine: wheels, then this
    python benchmarks/gpu/run.py --dry-run         # the plan and time budget (no JAX, no torch)
    python benchmarks/gpu/run.py --cpu-smoke       # every row at tiny shapes on CPU

Rows run in priority order (rows.py) while their budget fits before `--deadline-s`; each
finished row is appended at once to the results file (JSON lines), so a run cut short
keeps what it measured. At the end the side-by-side table is printed and, on a GPU,
inserted into benchmarks/RESULTS.md (report.py). See benchmarks/gpu/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback

_STARTED = time.perf_counter()  # the deadline counts from here: imports and start-up included

import report  # noqa: E402
from rows import BY_NAME, ROWS, Row  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
_TARGETS = ("min_speedup", "min_mfu", "min_floor_fraction")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="every row at tiny shapes on CPU")
    p.add_argument("--dry-run", action="store_true", help="print the plan and budgets, measure nothing")
    p.add_argument("--rows", help="comma-separated row names (default: all, in priority order)")
    p.add_argument("--repeats", type=int, help="repeats per row (default 3; smoke 2)")
    p.add_argument(
        "--deadline-s", type=float, default=450.0,
        help="start no row whose budget ends after this (run.sh stops the run at 480 s)",
    )  # fmt: skip
    p.add_argument("--no-peers", action="store_true", help="jaxgen alone")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a jaxgen config override added to every selected row (repeatable): try a setting",
    )  # fmt: skip
    p.add_argument(
        "--out", type=pathlib.Path, help="results file (default benchmarks/gpu/results-<date>.jsonl)"
    )
    p.add_argument(
        "--results-md", type=pathlib.Path,
        help="insert the table here (default: benchmarks/RESULTS.md on a GPU, nowhere in smoke)",
    )  # fmt: skip
    p.add_argument("--child-compile", help=argparse.SUPPRESS)  # compile row: variants for a fresh process
    p.add_argument("--child-row", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.rows.split(",") if args.rows else [r.name for r in ROWS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)} (rows: {', '.join(BY_NAME)})")
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        p.error(f"--set: expected KEY=VALUE, got {bad[0]!r}")
    rows = [r.with_overrides(tuple(args.set)) for r in ROWS] if args.set else list(ROWS)
    args.selected = [r for r in rows if r.name in names]  # priority order, whatever the order given
    args.repeats = args.repeats or (2 if args.cpu_smoke else 3)
    return args


def setup_environment(smoke: bool) -> str:
    """Environment for JAX and torch, set before either starts; returns a scratch directory."""
    # Both frameworks share one GPU: JAX must not take 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    scratch = tempfile.mkdtemp(prefix="jaxgen-gpu-bench-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    # Compiles are cold on both sides: fresh inductor and Triton caches per process.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(scratch, "triton")
    if smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
        # One CPU device like one GPU (the test suite's 8 fake devices would shard the batch),
        # and compiles tuned for compile time: smoke figures measure nothing.
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        )
    else:
        # One GPU for both sides (jaxgen's mesh would otherwise take every visible GPU).
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    return scratch


def compilation_cache(scratch: str) -> None:
    """Every compile of this process into a fresh persistent cache under `scratch`: a
    program's first call compiles cold, later calls of it (repeats) load it."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(scratch, "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def peer_support(args) -> tuple[bool, bool, str]:
    """(nanoGPT peer runs, Hugging Face peer runs, a sentence saying so)."""
    if args.no_peers:
        return False, False, "peers off (--no-peers): jaxgen alone"
    torch_ok = importlib.util.find_spec("torch") is not None
    hf_ok = torch_ok and importlib.util.find_spec("transformers") is not None
    if not torch_ok:
        return False, False, "torch is not importable: jaxgen alone, no peer figures"
    if not hf_ok:
        return True, False, "transformers is not importable: nanoGPT peer only, decode rows jaxgen alone"
    return True, True, "nanoGPT (re-implemented in benchmarks/gpu/nanogpt.py) and transformers generate"


def plan(args) -> str:
    """The dry run: rows, sizes and budgets, scheduled as a run would if every row took
    exactly its budget (budgets are estimates)."""
    lines, total = [], 0.0
    for row in args.selected:
        s = row.setting(args.cpu_smoke)
        budget = row.budget(not args.no_peers)
        fits = args.cpu_smoke or total + budget <= args.deadline_s
        total += budget if fits else 0.0
        size = (f"{s.batch} x {s.seq_len}" if row.kind in ("train", "compile")
                else f"batch {s.batch}, prompt {s.prompt_len}, {s.new_tokens} new")  # fmt: skip
        extra = f", layers {s.layers}" if s.layers else f", {s.num_beams} beams" if s.num_beams else ""
        when = f"(ends by {total:4.0f} s)" if fits else "(skipped: no time left)"
        lines.append(f"{row.name:22} {row.kind:8} peer={row.peer or '-':8} budget {budget:4.0f} s "
                     f"{when:24} {size}{extra}")  # fmt: skip
    mode = "cpu-smoke (budgets not applied)" if args.cpu_smoke else f"gpu, deadline {args.deadline_s:.0f} s"
    return "\n".join([f"mode: {mode}; repeats {args.repeats}", *lines])


def _record(out: pathlib.Path, record: dict) -> None:
    with open(out, "a", encoding="utf-8") as f:  # one line per record, flushed as it is made
        f.write(json.dumps(record) + "\n")


def run_rows(args, runner, ctx, out: pathlib.Path, started: float) -> tuple[list[str], list[str]]:
    skipped, errors = [], []
    for priority, row in enumerate(ROWS, 1):
        row = next((r for r in args.selected if r.name == row.name), None)
        if row is None:
            continue
        setting = row.setting(args.cpu_smoke)
        base = {"record": "row", "row": row.name, "priority": priority, "title": row.title, "kind": row.kind,
                "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "target": row.target,
                "setting": dataclasses.asdict(setting), "dtype": ctx.dtype,
                "targets": {k: getattr(row, k) for k in _TARGETS}}  # fmt: skip
        left = ctx.deadline - time.perf_counter()
        budget = row.budget(peer_name(row, ctx) is not None)
        if not args.cpu_smoke and budget > left:
            skipped.append(row.name)
            _record(out, base | {"status": "skipped", "reason": f"budget {budget:.0f} s > {left:.0f} s left"})
            continue
        print(f"[{time.perf_counter() - started:6.1f} s] {row.name} ...", flush=True)
        t = time.perf_counter()
        try:
            measured = measure_one(runner, row, setting)
            record = base | {"status": "ok", **measured}
        except Exception as e:  # one failing row must not cost the others their GPU time
            errors.append(row.name)
            record = base | {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300],
                             "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            print(record["traceback"], file=sys.stderr)
        ctx.rows_done += 1
        record |= {"row_s": time.perf_counter() - t, "unit": "s" if row.kind == "compile" else "tokens/s",
                   "metric": "compile_s" if row.kind == "compile" else "tokens_per_s",
                   "peer_name": peer_name(row, ctx)}  # fmt: skip
        _record(out, record)
        print(report.table([record]).splitlines()[-1], flush=True)
    return skipped, errors


def peer_name(row: Row, ctx) -> str | None:
    if row.peer == "nanogpt" and ctx.nanogpt:
        return "nanoGPT (torch.compile, bf16 autocast, flash SDPA, fused AdamW)"
    if row.peer == "hf" and ctx.hf:
        return "transformers generate (static cache, auto torch.compile)"
    return None


def measure_one(runner, row: Row, setting) -> dict:
    if row.kind == "train":
        return runner.train_row(row, setting)
    if row.kind == "compile":
        return runner.compile_row(row, setting)
    return runner.decode_row(row, setting)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print(plan(args))
        return 0
    scratch = setup_environment(args.cpu_smoke)
    # JAX, jaxgen and torch start only now, under the environment set above.
    import jax
    import machine
    import measure

    if not args.child_compile:
        compilation_cache(scratch)
    nano_ok, hf_ok, peer_status = peer_support(args)
    torch = None
    if nano_ok:
        import torch
    gpu = jax.default_backend() == "gpu"
    if not args.cpu_smoke and not gpu:
        print("run.py: JAX sees no GPU (use --cpu-smoke on a CPU machine, --dry-run for the plan)")
        return 2
    if not args.cpu_smoke and torch is not None and not torch.cuda.is_available():
        print("run.py: torch sees no GPU; install a CUDA torch or pass --no-peers")
        return 2
    env = {"peak_flops": None} if args.child_compile else machine.describe(torch)
    ctx = measure.Context(
        smoke=args.cpu_smoke, dtype="float32" if args.cpu_smoke else "bfloat16",
        device="cpu" if args.cpu_smoke else "cuda", peak_flops=env["peak_flops"],
        data_dir=os.path.join(scratch, "data"), repeats=args.repeats,
        deadline=_STARTED + args.deadline_s, nanogpt=nano_ok, hf=hf_ok, overrides=tuple(args.set),
    )  # fmt: skip
    os.makedirs(ctx.data_dir, exist_ok=True)
    if args.child_compile:
        row = next(r for r in args.selected if r.name == args.child_row)
        measure.child_compile(ctx, row, args.child_compile.split(","), args.child_out)
        return 0
    return run_all(args, ctx, measure.Runner(ctx), env, peer_status)


def run_all(args, ctx, runner, env: dict, peer_status: str) -> int:
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC)
    default = f"results-{'smoke-' if args.cpu_smoke else ''}{date:%Y-%m-%d-%H%M}.jsonl"
    out = args.out or HERE / default
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    _record(out, {"record": "env", "started": f"{date:%Y-%m-%d %H:%M} UTC", "mode": "cpu-smoke" if ctx.smoke
                  else "gpu", "command": command, "peer_status": peer_status, **env})  # fmt: skip
    print(
        f"{'CPU smoke' if ctx.smoke else 'GPU'} run -> {out}\npeers: {peer_status}\n"
        f"{env.get('gpu_name') or env['device_kind']}, peak bf16 {env['peak_flops'] or 'n/a'}",
        flush=True,
    )
    skipped, errors = run_rows(args, runner, ctx, out, started)
    rerun = f"benchmarks/gpu/run.sh --rows {','.join(skipped)}" if skipped else None
    _record(out, {"record": "end", "elapsed_s": time.perf_counter() - started, "skipped": skipped,
                  "errors": errors, "rerun": rerun})  # fmt: skip
    text = report.section(out)
    print("\n" + text)
    md = args.results_md or (None if ctx.smoke else REPO / "benchmarks" / "RESULTS.md")
    if md is not None:
        report.append_results(md, text)
        print(f"appended to {md}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
