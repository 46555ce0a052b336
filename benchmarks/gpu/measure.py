"""Measuring one row: both sides, repeats in alternating order, the spread, MFU.

Imported by run.py after it has set up the environment (JAX and torch are imported here).
Each row's sides are built once; a repeat runs one measurement of each side back to back,
jaxgen first in even repeats and the peer first in odd ones, so both see the same state
of the machine. The first repeat of each side includes its compile (reported apart).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jaxgen_side
from rows import Row, Setting

HERE = pathlib.Path(__file__).resolve().parent


def summarize(runs: list[dict], key: str) -> dict:
    """Median, range and every repeat of `key`; compile seconds from the first repeat."""
    values = [r[key] for r in runs]
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values),
            "compile_s": runs[0].get("compile_s"), "runs": runs}  # fmt: skip


def speedup(jaxgen: list[float], peer: list[float], higher_is_better: bool = True) -> dict | None:
    """jaxgen's speed-up over the peer per repeat (the pair measured back to back)."""
    if not jaxgen or not peer:
        return None
    values = [j / p if higher_is_better else p / j for j, p in zip(jaxgen, peer, strict=False)]
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclasses.dataclass
class Context:
    """What every row needs to know about this run."""

    smoke: bool
    dtype: str  # "bfloat16" on GPU; "float32" in smoke mode (CPU)
    device: str  # the peers' torch device
    peak_flops: float | None
    data_dir: str  # empty: no tokenizer file, so train rows take the vocab from the config
    repeats: int
    deadline: float  # time.perf_counter() value after which no repeat starts
    nanogpt: bool  # peers available
    hf: bool
    overrides: tuple[str, ...] = ()  # run.py --set: passed on to the compile row's children
    rows_done: int = 0  # rows measured so far in this process
    first_train: dict | None = None  # the process's first row, when a train row: its cold figures


class Runner:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def alternate(self, budget_s: float, jaxgen_fn, peer_fn) -> tuple[list, list, list[str]]:
        """Repeats of both sides in alternating order, at least two (when the deadline
        allows), at most `repeats`, stopping once the row's budget would be overrun."""
        jaxgen, peer, orders = [], [], []
        start = time.perf_counter()
        for r in range(self.ctx.repeats):
            sides = [("jaxgen", jaxgen_fn, jaxgen), ("peer", peer_fn, peer)]
            sides = [s for s in (sides if r % 2 == 0 else sides[::-1]) if s[1] is not None]
            t = time.perf_counter()
            for _, fn, out in sides:
                out.append(fn())
            orders.append("-".join(name for name, _, _ in sides))
            took, now = time.perf_counter() - t, time.perf_counter()
            over_budget = not self.ctx.smoke and now - start + took > budget_s
            if (r >= 1 and over_budget) or now + took > self.ctx.deadline:
                break
        return jaxgen, peer, orders

    def train_row(self, row: Row, setting: Setting) -> dict:
        config = jaxgen_side.train_config(setting, self.ctx.dtype, self.ctx.data_dir)
        trainer, first_step = None, None
        if row.peer == "nanogpt" and self.ctx.nanogpt:
            import nanogpt  # torch: only when the peers run

            trainer = nanogpt.Trainer(config.model, setting.batch, setting.seq_len, self.ctx.device)
            first_step = trainer.compile()
        peer_fn = trainer and (lambda: trainer.measure(setting.steps, setting.warmup))
        try:
            jruns, pruns, orders = self.alternate(
                row.budget_s, lambda: jaxgen_side.train(config, setting), peer_fn
            )
        finally:  # an error (say, out of memory) must not leave the GPU memory to the peer
            if trainer is not None:
                trainer.close()
        flops = jaxgen_side.flops_per_token(config)
        out = {"jaxgen": self._train_side(jruns, flops), "peer": None, "orders": orders,
               "flops_per_token": flops}  # fmt: skip
        if trainer is not None:
            out["peer"] = self._train_side(pruns, flops)
            # Compile = the first step minus a steady one (jaxgen's figure is its compile alone).
            out["peer"]["compile_s"] = first_step - statistics.median(r["step_ms"] for r in pruns) / 1e3
            out["speedup"] = speedup(out["jaxgen"]["values"], out["peer"]["values"])
        if self.ctx.rows_done == 0:  # nothing compiled before it: its compile figures are cold
            self.ctx.first_train = {"row": row.name, "model": config.model, "setting": setting, **out}
        return out

    def _train_side(self, runs: list[dict], flops: float) -> dict:
        s = summarize(runs, "tokens_per_s")
        s["mfu"] = None if self.ctx.peak_flops is None else s["median"] * flops / self.ctx.peak_flops
        return s

    def decode_row(self, row: Row, setting: Setting) -> dict:
        config = jaxgen_side.decode_config(setting, self.ctx.dtype)
        floor = row.min_floor_fraction is not None
        generator = None
        if row.peer == "hf" and self.ctx.hf:
            import hf_side  # torch: only when the peers run

            generator = hf_side.Generator(
                jaxgen_side.hf_config_for(config), batch=setting.batch, prompt_len=setting.prompt_len,
                new_tokens=setting.new_tokens, num_beams=setting.num_beams, device=self.ctx.device,
                dtype=self.ctx.dtype, compile_on_cpu=self.ctx.smoke,
            )  # fmt: skip
        try:
            jruns, pruns, orders = self.alternate(
                row.budget_s,
                lambda: jaxgen_side.decode(config, setting, floor),
                generator and generator.measure,
            )
        finally:
            if generator is not None:
                generator.close()
        out = {"jaxgen": summarize(jruns, "tokens_per_s"), "peer": None, "orders": orders}
        if floor:
            out["jaxgen"]["floor_fraction"] = statistics.median(r["floor_fraction"] for r in jruns)
        if generator is not None:
            out["peer"] = summarize(pruns, "tokens_per_s")
            out["speedup"] = speedup(out["jaxgen"]["values"], out["peer"]["values"])
            if not all(r["compiled"] for r in pruns):
                out["notes"] = [
                    "transformers ran this without a compiled step (no auto-compile on this path)"
                ]
        if setting.num_beams > 1:
            out.setdefault("notes", []).append("beams of the two sides are not compared (different weights)")
        return out

    def compile_row(self, row: Row, setting: Setting) -> dict:
        """Cold compile time and throughput at two depths: jaxgen scanned and unrolled,
        nanoGPT. On a GPU each variant runs in a fresh process (fresh caches; XLA keeps
        autotuning results per process), except the first train row's own figures when it
        measured the same program first in this process — already cold."""
        lo, hi = setting.layers
        jaxgen, peer, notes = {}, {}, []
        first = self.ctx.first_train
        reusable = (
            first is not None
            and first["setting"].batch == setting.batch
            and (first["setting"].seq_len == setting.seq_len)
            and first["model"]
            == jaxgen_side.train_config(setting, self.ctx.dtype, self.ctx.data_dir, lo, False).model
        )
        if reusable:
            jaxgen[f"unrolled_{lo}"] = first["jaxgen"]["runs"][0]
            reused = f"{lo}-layer unrolled jaxgen"
            if first["peer"] is not None:
                peer[str(lo)] = first["peer"]["runs"][0] | {"compile_s": first["peer"]["compile_s"]}
                reused += f" and {lo}-layer nanoGPT"
            notes.append(f"{reused} figures: the cold first repeat of {first['row']} in this process")
        todo = [f"jaxgen:{n}:{kind}" for n in (lo, hi) for kind in ("scan", "unrolled")
                if f"{kind}_{n}" not in jaxgen]  # fmt: skip
        if self.ctx.nanogpt:
            todo += [f"nanogpt:{n}" for n in (lo, hi) if str(n) not in peer]
        if self.ctx.smoke:
            # A CPU has no autotuning to keep cold: all jaxgen variants but the last run in this
            # process; one child (the last one, then nanoGPT's) keeps the GPU run's path tested.
            here = [v for v in todo if v.startswith("jaxgen")][:-1]
            plan = [(here, False), ([v for v in todo if v not in here], True)]
            notes.append("smoke: all jaxgen variants but the last compiled in the run's own process")
        else:
            plan = [([v], True) for v in todo]
        for group, fresh in plan:
            for line in self._variants(row, group, fresh) if group else []:
                (jaxgen if line["side"] == "jaxgen" else peer)[line["variant"]] = line
        return self._compile_summary(lo, hi, jaxgen, peer, notes)

    def _variants(self, row: Row, variants: list[str], fresh: bool) -> list[dict]:
        """`child_compile` for `variants`, in a fresh process or (smoke mode) in this one."""
        out = pathlib.Path(self.ctx.data_dir) / f"child-{time.monotonic_ns()}.jsonl"
        if not fresh:
            child_compile(self.ctx, row, variants, out)
            return [json.loads(line) for line in out.read_text().splitlines()]
        cmd = [sys.executable, str(HERE / "run.py"), "--child-compile", ",".join(variants),
               "--child-row", row.name, "--child-out", str(out)]  # fmt: skip
        cmd += ["--cpu-smoke"] if self.ctx.smoke else []
        cmd += [f"--set={kv}" for kv in self.ctx.overrides]
        timeout = max(self.ctx.deadline - time.perf_counter(), 1.0)
        subprocess.run(cmd, check=True, timeout=timeout)
        return [json.loads(line) for line in out.read_text().splitlines()]

    def _compile_summary(self, lo: int, hi: int, jaxgen: dict, peer: dict, notes: list[str]) -> dict:
        def growth(variants, a, b):
            return variants[b]["compile_s"] / variants[a]["compile_s"]

        scan_hi = jaxgen[f"scan_{hi}"]["compile_s"]
        j = {"variants": jaxgen, "values": [scan_hi], "median": scan_hi, "min": scan_hi, "max": scan_hi,
             "compile_s": scan_hi, "growth_scan": growth(jaxgen, f"scan_{lo}", f"scan_{hi}"),
             "growth_unrolled": growth(jaxgen, f"unrolled_{lo}", f"unrolled_{hi}"),
             "scan_vs_unrolled_tokens_per_s":
                 jaxgen[f"scan_{hi}"]["tokens_per_s"] / jaxgen[f"unrolled_{hi}"]["tokens_per_s"]}  # fmt: skip
        out = {"jaxgen": j, "peer": None, "orders": [], "notes": notes}
        if peer:
            p_hi = peer[str(hi)]["compile_s"]
            out["peer"] = {"variants": peer, "values": [p_hi], "median": p_hi, "min": p_hi, "max": p_hi,
                           "compile_s": p_hi, "growth": growth(peer, str(lo), str(hi))}  # fmt: skip
            out["speedup"] = speedup([scan_hi], [p_hi], higher_is_better=False)
        return out


def child_compile(ctx: Context, row: Row, variants: list[str], out: pathlib.Path) -> None:
    """In a fresh process: one cold compile + timed steps per variant, a JSON line each."""
    setting = row.setting(ctx.smoke)
    for spec in variants:
        side, layers, *kind = spec.split(":")
        n = int(layers)
        if side == "jaxgen":
            config = jaxgen_side.train_config(setting, ctx.dtype, ctx.data_dir, n, kind[0] == "scan")
            line = jaxgen_side.train(config, setting) | {"variant": f"{kind[0]}_{n}"}
        else:
            import nanogpt  # torch: only in the peer's child

            config = jaxgen_side.train_config(setting, ctx.dtype, ctx.data_dir, n, False)
            trainer = nanogpt.Trainer(config.model, setting.batch, setting.seq_len, ctx.device)
            first_step = trainer.compile()
            line = trainer.measure(setting.steps, setting.warmup) | {"variant": str(n)}
            line["compile_s"] = first_step - line["step_ms"] / 1e3
            trainer.close()
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line | {"side": side, "layers": n}) + "\n")
