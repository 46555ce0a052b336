"""The side-by-side table of a results file, printed and inserted into benchmarks/RESULTS.md.

Reads only JSON (no JAX, no torch), so run.sh can render what a run recorded even after
the run was stopped by its timeout. RESULTS.md is only ever added to: a run's section
goes at the end of the GPU section (created at the end of the file the first time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import tempfile

GPU_HEADING = "## GPU: jaxgen vs nanoGPT and Hugging Face (issue 19, benchmarks/gpu)"


def read(path: pathlib.Path) -> tuple[dict, list[dict], dict | None]:
    """(environment record, row records, end record or None when the run was cut short)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    env = next((r for r in records if r["record"] == "env"), {})
    end = next((r for r in records if r["record"] == "end"), None)
    return env, [r for r in records if r["record"] == "row"], end


def num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if abs(x) >= 1e4:
        return f"{x / 1e3:,.1f}k" if abs(x) < 1e5 else f"{x / 1e3:,.0f}k"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _side(s: dict | None, unit: str) -> str:
    if not s:
        return "—"
    spread = f" ({num(s['min'])}–{num(s['max'])}, n={len(s['values'])})" if len(s["values"]) > 1 else ""
    return f"{num(s['median'])} {unit}{spread}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def met(row: dict) -> str:
    """Whether the issue's numeric targets are met; only for GPU runs."""
    if row.get("mode") != "gpu":
        return "n/a (smoke)"
    targets = row.get("targets") or {}
    checks = []
    if targets.get("min_speedup") is not None:
        checks.append(((row.get("speedup") or {}).get("median"), targets["min_speedup"]))
    if targets.get("min_mfu") is not None:
        checks.append(((row.get("jaxgen") or {}).get("mfu"), targets["min_mfu"]))
    if targets.get("min_floor_fraction") is not None:
        checks.append(((row.get("jaxgen") or {}).get("floor_fraction"), targets["min_floor_fraction"]))
    if not checks:
        return "see figures"
    if any(value is None for value, _ in checks):
        return "not measured"
    return "yes" if all(value >= bound for value, bound in checks) else "no"


def _compile_cells(row: dict) -> tuple[str, str]:
    j, p = row.get("jaxgen") or {}, row.get("peer") or {}
    lo, hi = row["setting"]["layers"]
    jv = j.get("variants", {})

    def pair(prefix):
        a, b = jv.get(f"{prefix}_{lo}"), jv.get(f"{prefix}_{hi}")
        return f"{num(a and a['compile_s'])} -> {num(b and b['compile_s'])} s" if a or b else "n/a"

    ratio = j.get("scan_vs_unrolled_tokens_per_s")
    jaxgen = (f"scan {pair('scan')}, unrolled {pair('unrolled')}; {hi} layers scan/unrolled tokens/s "
              f"{num(ratio)}")  # fmt: skip
    pv = p.get("variants", {})
    peer = (f"{num(pv.get(str(lo), {}).get('compile_s'))} -> {num(pv.get(str(hi), {}).get('compile_s'))} s"
            if pv else "—")  # fmt: skip
    return jaxgen, peer


def table(rows: list[dict]) -> str:
    lines = [
        "| # | row | jaxgen | peer | jaxgen speed-up (per-repeat range) | MFU jaxgen / peer "
        "| compile s jaxgen / peer | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            reason = " ".join(r.get("reason", "").split())[:160].replace("|", "/")  # one table cell
            lines.append(f"| {r['priority']} | {r['title']} | {r['status']}: {reason} "
                         f"| | | | | {r['target']} | not measured |")  # fmt: skip
            continue
        j, p, s = r.get("jaxgen") or {}, r.get("peer"), r.get("speedup")
        if r["kind"] == "compile":
            jaxgen, peer = _compile_cells(r)
        else:
            jaxgen, peer = _side(j, r["unit"]), _side(p, r["unit"])
        speed = "—" if not s else f"{num(s['median'])}x ({num(s['min'])}–{num(s['max'])}x)"
        mfu = "—" if r["kind"] != "train" else f"{_pct(j.get('mfu'))} / {_pct((p or {}).get('mfu'))}"
        compile_s = f"{num(j.get('compile_s'))} / {num((p or {}).get('compile_s'))}"
        lines.append(f"| {r['priority']} | {r['title']} | {jaxgen} | {peer} | {speed} | {mfu} | {compile_s} "
                     f"| {r['target']} | {met(r)} |")  # fmt: skip
    return "\n".join(lines)


def _environment(env: dict) -> str:
    v = env.get("versions", {})
    gpu = env.get("gpu_name") or env.get("torch_device") or env.get("device_kind", "?")
    peak = env.get("peak_flops")
    return (
        f"{gpu} (driver {env.get('driver', 'n/a')}, CUDA {env.get('cuda_driver_api', 'n/a')} driver API, "
        f"torch CUDA {env.get('torch_cuda', 'n/a')}); backend {env.get('backend')}; "
        f"jax {v.get('jax')} (jaxlib {v.get('jaxlib')}), flax {v.get('flax')}, optax {v.get('optax')}, "
        f"torch {v.get('torch', 'n/a')}, transformers {v.get('transformers', 'n/a')}, "
        f"python {env.get('python')}; MFU peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} "
        f"(bf16 dense, by name: {env.get('peak_flops_from')})"
        + (f"; XLA_FLAGS `{env['xla_flags'].strip()}`" if env.get("xla_flags", "").strip() else "")
    )


def section(path: pathlib.Path) -> str:
    """The markdown for one results file: heading, environment, table, notes."""
    env, rows, end = read(path)
    notes = [f"- {r['title']}: {n}" for r in rows for n in r.get("notes", [])]
    if end is None:
        notes.append(
            "- The run was stopped before its end (timeout): rows after the last one above are missing."
        )
    elif end.get("skipped"):
        notes.append(f"- Skipped for time: {', '.join(end['skipped'])}; rerun with `{end['rerun']}`.")
    parts = [
        f"### {env.get('started', '?')} — {env.get('mode', '?')} run, `{path.name}`",
        "",
        f"Command: `{env.get('command', '?')}`",
        "",
        f"Machine: {_environment(env)}.",
        "",
        *(
            ["Shapes: tiny (the smoke settings of rows.py); the row titles name the GPU shapes.", ""]
            if env.get("mode") == "cpu-smoke"
            else []
        ),
        f"Peer: {env.get('peer_status', '?')}. Speed-up is jaxgen / peer for throughput and peer / jaxgen "
        "for compile time, taken per repeat (the two sides of a repeat run back to back, the first side "
        "alternating); figures are medians over repeats with their range.",
        "",
        table(rows),
    ]
    return "\n".join(parts + ([""] + notes if notes else [])) + "\n"


def append_results(md_path: pathlib.Path, text: str) -> None:
    """Inserts `text` at the end of the GPU section of `md_path` (adding the section at the
    end of the file when it is missing); everything already there is kept as it was."""
    old = md_path.read_text(encoding="utf-8") if md_path.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == GPU_HEADING), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + GPU_HEADING + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        new = "".join(lines[:end]).rstrip("\n") + "\n\n" + text + ("\n" + after if after else "")
    # Written beside and moved into place: an interrupted write leaves the old file whole.
    with tempfile.NamedTemporaryFile("w", dir=md_path.parent, delete=False, encoding="utf-8") as f:
        f.write(new)
    if md_path.exists():
        os.chmod(f.name, md_path.stat().st_mode)
    os.replace(f.name, md_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=pathlib.Path, help="a results-*.jsonl file written by run.py")
    parser.add_argument("--results-md", type=pathlib.Path, help="insert the section into this file")
    args = parser.parse_args(argv)
    text = section(args.results)
    print(text)
    if args.results_md:
        append_results(args.results_md, text)
        print(f"appended to {args.results_md}")


if __name__ == "__main__":
    main()
