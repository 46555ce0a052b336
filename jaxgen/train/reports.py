"""The training loop's standard hooks: step logging (with the NaN policy and compile
timing), validation, samples. Each reports to the console and to metrics.jsonl/TensorBoard."""

from __future__ import annotations

import time

import jax
import numpy as np
from rich.console import Console

from jaxgen import checkpoint, data
from jaxgen.config import Config
from jaxgen.decode.request import complete_text
from jaxgen.errors import JaxgenError
from jaxgen.metrics import MetricsWriter, mfu, peak_tflops, perplexity_figures
from jaxgen.model.transformer import model_flops_per_token
from jaxgen.tokenizer import load_tokenizer
from jaxgen.train import dpo
from jaxgen.train.hooks import Hooks, StepInfo
from jaxgen.train.spikes import SpikeWatch
from jaxgen.train.step import TrainStep


class StepLogger:
    """Collects each step's metrics on the device and fetches them only when reporting (the
    one host sync), so the host never waits on the device between logging steps.

    The first step after a start includes compilation: its time (not its loss) is left out
    of its interval's tokens/s and ms/step, and so is the time of hooks that pause training.
    Its loss stays in the interval's record, so every step is in exactly one train record
    and a resumed run logs the same records as an uninterrupted one (checkpoints fall on
    logging steps).
    """

    def __init__(self, config: Config, metrics: MetricsWriter, console: Console, hooks: Hooks):
        self.config, self.metrics, self.console, self.hooks = config, metrics, console, hooks
        self.flops = model_flops_per_token(config.model, config.train.seq_len)
        self.peak = peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops)
        self.pending: list = []
        self.losses: list[float] = []
        self.skipped = 0
        self.nonfinite = 0  # non-finite steps since this process started (in every train record)
        self.spikes = SpikeWatch(config.train.spike_factor, config.train.batch_size)
        self.since = time.perf_counter()
        self.paused_since = 0.0
        self.compiled = False
        self.compile_seconds: float | None = None  # the first step's, until its interval is fetched

    def collect(self, info: StepInfo) -> None:
        self.pending.append(info.metrics)
        if not self.compiled:
            jax.block_until_ready(info.metrics)
            self.compiled = True
            self.compile_seconds = time.perf_counter() - self.since
            self.console.print(f"compiled and ran the first step in {self.compile_seconds:.1f} s")

    def report(self, info: StepInfo) -> None:
        if self.pending:
            self._report(info.step, *self._fetch(info.step))

    def _fetch(self, step: int) -> tuple[list, float, int, list[float], int]:
        """The pending metrics on the host, the seconds they took and how many steps those
        seconds cover (pauses and the compiling first step left out), their losses and how
        many steps were skipped; applies the NaN policy."""
        fetched = jax.device_get(self.pending)
        now = time.perf_counter()
        seconds = now - self.since - (self.hooks.paused - self.paused_since)
        timed = len(fetched)
        if self.compile_seconds is not None and timed > 1:  # alone, the first step is timed with compilation
            seconds, timed = seconds - self.compile_seconds, timed - 1
        self.compile_seconds = None
        self.since, self.paused_since, self.pending = now, self.hooks.paused, []
        losses = [float(m.loss) for m in fetched]
        bad = sum(not bool(m.finite) for m in fetched)
        self.losses += losses
        self.skipped += bad
        self.nonfinite += bad
        first = step - len(fetched) + 1  # the pending metrics are of consecutive steps
        for i, loss in enumerate(losses):
            self._report_spike(first + i, self.spikes.check(first + i, loss))
        if bad and self.config.train.nan_policy == "stop":
            raise JaxgenError(
                f"step {step}: loss or gradient is NaN/Inf; stopped (train.nan_policy=stop),"
                " the last good checkpoint is kept"
            )
        return fetched, seconds, timed, losses, bad

    def _report_spike(self, step: int, spike: dict | None) -> None:
        if spike is None:
            return
        self.metrics.write(step, "spike", spike)
        loss, factor, median = spike["loss"], spike["factor"], spike["median"]
        self.console.print(
            f"loss spike at step {step}: {loss:.4f} > {factor:g} x median {median:.4f}"
            f" (batch {spike['batch']} of the run's stream, rows {spike['rows'][0]}-{spike['rows'][1] - 1})"
        )

    def _report(
        self, step: int, fetched: list, seconds: float, timed: int, losses: list[float], bad: int
    ) -> None:
        last = fetched[-1]
        tokens = self.config.train.batch_size * self.config.train.seq_len * timed
        tps = tokens / seconds
        values = {
            "loss": float(np.mean(losses)),
            "grad_norm": float(last.grad_norm),
            "learning_rate": float(last.learning_rate),
            "tokens_per_second": tps,
            "step_ms": 1000 * seconds / timed,
            "skipped": bad,
            "nonfinite_total": self.nonfinite,
        }
        util = mfu(tps, self.flops, jax.device_count(), self.peak)
        if util is not None:
            values["mfu"] = util
        if self.config.train.z_loss:
            values["z_loss"] = float(last.z_loss)
        for name in last.extra:  # the objective's own figures (DPO: accuracy, rewards, ...)
            values[name] = float(np.mean([m.extra[name] for m in fetched]))
        self.metrics.write(step, "train", values)
        mfu_text = f" mfu {util:.1%}" if util is not None else ""
        self.console.print(
            f"step {step:>6}  loss {values['loss']:.4f}  grad {values['grad_norm']:.3f}"
            f"  lr {values['learning_rate']:.2e}  {tps:,.0f} tok/s  {values['step_ms']:.1f} ms/step{mfu_text}"
            + (
                f"  acc {values['accuracy']:.3f}  margin {values['margin']:.4f}"
                if "accuracy" in values
                else ""
            )
        )


def evaluate(step_fn: TrainStep, params, config: Config, mesh, max_batches: int | None) -> dict:
    """Validation figures: `metrics.perplexity_figures` (per character and byte when the
    whole split is seen), or for DPO the loss and the pairs' figures (train/dpo.py)."""
    sums, seen, complete = {}, 0, True
    with data.eval_batches(config, mesh, "validation", config.train.batch_size) as batches:
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                complete = False
                break
            batch_sums = jax.device_get(step_fn.eval_sums(params, batch))
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in batch_sums.items()}
            seen += 1
    nll, count = sums.get("loss", 0.0), sums.get("count", 0.0)
    if config.finetune.objective == "dpo":
        pairs = max(count, 1.0)
        return {"pairs": count, "loss": nll / pairs, **{k: sums[k] / pairs for k in dpo.METRICS}}
    if not complete:
        return perplexity_figures(nll, count)
    stats = data.split_stats(config, "validation")
    return perplexity_figures(nll, count, stats.chars, stats.bytes)


class Validation:
    """Evaluates the validation split (the first `train.eval_batches` batches between steps)."""

    def __init__(self, config: Config, step_fn: TrainStep, mesh, metrics: MetricsWriter, console: Console):
        self.config, self.step_fn, self.mesh, self.metrics, self.console = (
            config,
            step_fn,
            mesh,
            metrics,
            console,
        )

    def __call__(self, info: StepInfo, max_batches: int | None = -1) -> dict:
        limit = self.config.train.eval_batches if max_batches == -1 else max_batches
        result = evaluate(self.step_fn, info.state.params, self.config, self.mesh, limit)
        self.metrics.write(info.step, "eval", result)
        if "pairs" in result:  # DPO
            figures = f"accuracy {result['accuracy']:.3f}  margin {result['margin']:.4f}"
            self.console.print(f"eval  {info.step:>6}  loss {result['loss']:.4f}  {figures}")
            return result
        per_char = f"  {result['nats_per_char']:.4f} nats/char" if "nats_per_char" in result else ""
        loss, ppl = result["nats_per_token"], result["perplexity"]
        self.console.print(f"eval  {info.step:>6}  loss {loss:.4f}  ppl {ppl:.2f}{per_char}")
        return result


class Sampler:
    """A completion of `train.sample_prompt` with the current params (the `generate` defaults)."""

    def __init__(self, config: Config, run_dir, mesh, metrics: MetricsWriter, console: Console, model_params):
        self.config, self.run_dir, self.mesh, self.metrics, self.console = (
            config,
            run_dir,
            mesh,
            metrics,
            console,
        )
        self.model_params = model_params  # trainable tree -> plain params (LoRA: merged)
        self.tokenizer = None  # loaded on the first sample

    def __call__(self, info: StepInfo) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(checkpoint.local_tokenizer(self.run_dir))
        cfg = self.config
        params = self.model_params(info.state.params)
        text = complete_text(
            cfg.model, params, self.tokenizer, cfg.train.sample_prompt, cfg.generate, self.mesh,
            max_new_tokens=cfg.train.sample_tokens,
        )  # fmt: skip
        self.metrics.write(info.step, "sample", {"prompt": cfg.train.sample_prompt, "text": text})
        self.console.print(f"sample {info.step:>6}  {cfg.train.sample_prompt}{text!r}")
