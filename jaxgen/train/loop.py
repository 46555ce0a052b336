"""`jaxgen train`: the pretraining loop around the pure step in jaxgen/train_step.py.

The loop owns the side effects: preparing data, the run directory, checkpoints
(resume, periodic, on SIGTERM/SIGINT), metrics, evaluation and samples. The host
never waits on the device between logging steps (metrics are fetched only then).
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import numpy as np
from jax.experimental import multihost_utils
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from jaxgen import checkpoint, data
from jaxgen.config import Config, check_no_placeholders
from jaxgen.decode.request import complete_text
from jaxgen.errors import JaxgenError
from jaxgen.metrics import MetricsWriter, eval_figures, mfu, peak_tflops
from jaxgen.model.transformer import model_flops_per_token
from jaxgen.runtime import cpu_malloc
from jaxgen.runtime.mesh import activate, data_parallel_size, make_mesh
from jaxgen.tokenizer import load_tokenizer, model_vocab_size
from jaxgen.train.step import Trainer, TrainState


@dataclasses.dataclass
class TrainResult:
    run_dir: pathlib.Path
    step: int  # batches consumed (checkpoint numbering)
    losses: list[float]  # training loss of every step run in this call
    final_eval: dict | None
    wall_seconds: float
    preempted: bool = False
    skipped_steps: int = 0
    process_index: int = 0


def resolve_config(config: Config, tokenizer) -> Config:
    """The model's vocab comes from the tokenizer, rounded up for fast matmuls."""
    vocab = model_vocab_size(tokenizer, config.tokenizer.vocab_multiple)
    return config.model_copy(update={"model": config.model.model_copy(update={"vocab_size": vocab})})


def check_shapes(config: Config, mesh) -> None:
    t, m = config.train, config.model
    if t.seq_len > m.max_len:
        raise JaxgenError(f"train.seq_len: {t.seq_len} exceeds model.max_len={m.max_len}")
    dp = data_parallel_size(mesh) * t.grad_accum
    if t.batch_size % dp:
        raise JaxgenError(f"train.batch_size: {t.batch_size} is not divisible by data*fsdp*grad_accum = {dp}")


def _check_resume(run_dir: pathlib.Path, config: Config) -> None:
    if not (run_dir / checkpoint.CONFIG_FILE).exists():
        return
    before = checkpoint.read_run_config(run_dir).model.model_dump(exclude={"preset"})
    now = config.model.model_dump(exclude={"preset"})
    changed = [k for k in now if before[k] != now[k]]
    if changed:
        key = changed[0]
        raise JaxgenError(
            f"{run_dir}: its checkpoints are for a different model (model.{key}: {before[key]!r} there,"
            f" {now[key]!r} now); use another --run-dir"
        )


@contextmanager
def _preemption_flag() -> Iterator[dict]:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0."""
    flag = {"stop": None}
    handler = lambda signum, _frame: flag.__setitem__("stop", signal.Signals(signum).name)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _memory_hint(config: Config) -> Iterator[None]:
    """Turns an out-of-memory failure into one line naming the knobs that reduce memory."""
    try:
        yield
    except Exception as e:  # XlaRuntimeError's type moves between jaxlib versions
        if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise
        t, m = config.train, config.model
        raise JaxgenError(
            f"out of memory in the train step: lower train.batch_size ({t.batch_size}) or raise"
            f" train.grad_accum ({t.grad_accum}), set model.remat=dots_saveable|full (now {m.remat}),"
            " or shard parameters with mesh.fsdp"
        ) from None


def evaluate(trainer: Trainer, params, config: Config, mesh, max_batches: int | None) -> dict:
    """Validation loss/perplexity; nats/char and bits/byte when the whole split is seen."""
    nll, count, seen, complete = 0.0, 0.0, 0, True
    with data.eval_batches(config, mesh, "validation", config.train.batch_size) as batches:
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                complete = False
                break
            b_nll, b_count = trainer.eval_sums(params, batch)
            nll, count, seen = nll + float(b_nll), count + float(b_count), seen + 1
    stats = data.split_stats(config, "validation")
    if complete:
        return {**eval_figures(nll, count, stats.chars, stats.bytes), "tokens": count}
    return {**eval_figures(nll, count), "tokens": count}


class _Loop:
    """State of one `train` call; methods are the loop's phases."""

    def __init__(self, config: Config, run_dir: pathlib.Path, console: Console):
        self.config, self.run_dir, self.console = config, run_dir, console
        self.mesh = make_mesh(config.mesh)
        check_shapes(config, self.mesh)
        self.trainer = Trainer(config, self.mesh)
        self.mngr = checkpoint.manager(run_dir, config)
        self.batches = data.train_batches(config, self.mesh)
        self.metrics = MetricsWriter(run_dir)
        self.flops = model_flops_per_token(config.model, config.train.seq_len)
        self.peak = peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops)
        self.tokenizer = None  # loaded on the first sample

    def start(self) -> tuple[TrainState, int]:
        latest = self.mngr.latest_step()
        if latest is None:
            return self.trainer.init(jax.random.key(self.config.train.seed)), 0
        abstract = self.trainer.abstract_state()
        shard = self.trainer.state_shardings
        items = checkpoint.restore(
            self.mngr,
            latest,
            {
                "params": (abstract.params, shard.params),
                "opt": (
                    (abstract.opt_state, abstract.step, abstract.rng),
                    (shard.opt_state, shard.step, shard.rng),
                ),
                "data": None,
            },
        )
        opt_state, step, rng = items["opt"]
        self.batches.set_state(items["data"])
        self.console.print(f"resumed from {self.run_dir}/checkpoints/{latest}")
        return TrainState(params=items["params"], opt_state=opt_state, step=step, rng=rng), latest

    def save(self, state: TrainState, step: int, force: bool = False) -> None:
        items = {
            "params": state.params,
            "opt": (state.opt_state, state.step, state.rng),
            "data": self.batches.get_state(),
            "meta": {"step": step, "updates": int(state.step)},
        }
        checkpoint.save(self.mngr, step, items, force=force)

    def log(self, step: int, pending: list, since: float, quiet: bool = False) -> tuple[list[float], int]:
        """Fetches the pending steps' metrics (the only host sync) and reports them.

        `since` is when the interval started; it ends once the fetch has waited for the
        device, so the rate counts finished steps, not dispatched ones.
        """
        fetched = jax.device_get(pending)
        seconds = time.perf_counter() - since
        losses = [float(m.loss) for m in fetched]
        skipped = sum(not bool(m.finite) for m in fetched)
        if quiet:
            return losses, skipped
        last = fetched[-1]
        tokens = self.config.train.batch_size * self.config.train.seq_len * len(fetched)
        tps = tokens / seconds
        values = {
            "loss": float(np.mean(losses)),
            "grad_norm": float(last.grad_norm),
            "learning_rate": float(last.learning_rate),
            "tokens_per_second": tps,
            "step_ms": 1000 * seconds / len(fetched),
            "skipped": skipped,
        }
        util = mfu(tps, self.flops, jax.device_count(), self.peak)
        if util is not None:
            values["mfu"] = util
        if self.config.train.z_loss:
            values["z_loss"] = float(last.z_loss)
        self.metrics.write(step, "train", values)
        mfu_text = f" mfu {util:.1%}" if util is not None else ""
        self.console.print(
            f"step {step:>6}  loss {values['loss']:.4f}  grad {values['grad_norm']:.3f}"
            f"  lr {values['learning_rate']:.2e}  {tps:,.0f} tok/s  {values['step_ms']:.1f} ms/step{mfu_text}"
        )
        return losses, skipped

    def sample(self, state: TrainState, step: int) -> None:
        """A short greedy-or-sampled completion of `train.sample_prompt` with the current params."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.run_dir)
        cfg = self.config
        text = complete_text(
            cfg.model, state.params, self.tokenizer, cfg.train.sample_prompt, cfg.generate, self.mesh,
            max_new_tokens=cfg.train.sample_tokens,
        )  # fmt: skip
        self.metrics.write(step, "sample", {"prompt": self.config.train.sample_prompt, "text": text})
        self.console.print(f"sample {step:>6}  {self.config.train.sample_prompt}{text!r}")

    def validate(self, state: TrainState, step: int, max_batches: int | None) -> dict:
        result = evaluate(self.trainer, state.params, self.config, self.mesh, max_batches)
        self.metrics.write(step, "eval", result)
        per_char = f"  {result['nats_per_char']:.4f} nats/char" if "nats_per_char" in result else ""
        self.console.print(
            f"eval  {step:>6}  loss {result['loss']:.4f}  ppl {result['perplexity']:.2f}{per_char}"
        )
        return result


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def train(
    config: Config, run_dir: str | pathlib.Path | None = None, *, console: Console | None = None
) -> TrainResult:
    """Trains `config` in `run_dir` (default `runs/<config.name>`), resuming if possible."""
    started = time.perf_counter()
    leader = jax.process_index() == 0
    console = console or Console(quiet=not leader)  # one process speaks for a multi-host job
    run_dir = pathlib.Path(run_dir or pathlib.Path("runs") / config.name)
    check_no_placeholders(config)
    # Process 0 writes shared files (prepared data, run config); the others wait for it
    # and then only read them.
    if leader:
        info = data.prepare(config)
    _barrier("jaxgen-prepared")
    if not leader:
        info = data.prepare(config, progress=False)
    tokenizer = load_tokenizer(info.tokenizer_path)
    config = resolve_config(config, tokenizer)
    _check_resume(run_dir, config)
    if leader:
        checkpoint.write_run_config(run_dir, config)
        checkpoint.copy_tokenizer(info.tokenizer_path, run_dir)
    _barrier("jaxgen-run-dir")
    mesh_shape = dict(make_mesh(config.mesh).shape)
    cpu_malloc.prepare_for_training()
    with activate(make_mesh(config.mesh)), _preemption_flag() as flag:
        loop = _Loop(config, run_dir, console)
        console.print(
            f"training {config.name}: {config.model.family} {config.model.num_layers}x{config.model.d_model},"
            f" vocab {config.model.vocab_size}, mesh {mesh_shape}, run dir {run_dir}"
        )
        try:
            return _run(loop, flag, started)
        except BaseException:
            # Whatever stopped the loop (a data worker, NaNs, Ctrl-C twice), a save in flight
            # completes, so the last checkpoint is whole and the run resumes from it.
            loop.mngr.wait_until_finished()
            raise
        finally:
            loop.batches.close()  # stops worker processes before grain's exit-time finalizers


def _run(loop: _Loop, flag: dict, started: float) -> TrainResult:
    cfg = loop.config.train
    state, step = loop.start()
    losses, pending, skipped, final_eval, compiled = [], [], 0, None, False
    tick = time.perf_counter()
    with _progress(loop.console) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=step)
        while step < cfg.steps and flag["stop"] is None:
            with _memory_hint(loop.config):
                state, metrics = loop.trainer.step(state, next(loop.batches))
            step += 1
            pending.append(metrics)
            if not compiled:  # keep compilation out of the first interval's tokens/s
                jax.block_until_ready(metrics)
                compiled = True
                loop.console.print(f"compiled and ran the first step in {time.perf_counter() - tick:.1f} s")
                got, bad = loop.log(step, pending, tick, quiet=True)
                losses, skipped, pending = losses + got, skipped + bad, []
                tick = time.perf_counter()
            progress.update(task, completed=step)
            if pending and (step % cfg.log_every == 0 or step == cfg.steps):
                got, bad = loop.log(step, pending, tick)
                losses += got
                skipped += bad
                pending = []
                if bad and cfg.nan_policy == "stop":
                    raise JaxgenError(
                        f"step {step}: loss or gradient is NaN/Inf; stopped (train.nan_policy=stop),"
                        " the last good checkpoint is kept"
                    )
                tick = time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                loop.validate(state, step, cfg.eval_batches)
                tick = time.perf_counter()
            if cfg.sample_every and step % cfg.sample_every == 0:
                loop.sample(state, step)
                tick = time.perf_counter()
            if loop.config.checkpoint.every and step % loop.config.checkpoint.every == 0:
                loop.save(state, step)
    if pending:
        got, bad = loop.log(step, pending, tick)
        losses, skipped = losses + got, skipped + bad
    preempted = flag["stop"] is not None
    if preempted:
        loop.console.print(f"{flag['stop']}: saving a checkpoint at step {step} and exiting")
    else:
        final_eval = loop.validate(state, step, None)
    loop.mngr.wait_until_finished()
    if step not in loop.mngr.all_steps():
        loop.save(state, step, force=True)
        loop.mngr.wait_until_finished()
    loop.mngr.close()
    loop.metrics.close()
    return TrainResult(
        loop.run_dir,
        step,
        losses,
        final_eval,
        time.perf_counter() - started,
        preempted,
        skipped,
        jax.process_index(),
    )
