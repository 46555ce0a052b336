"""`jaxgen train`: the loop around the pure step in train/step.py: a step, then its hooks.

The loop owns the side effects: preparing data, the run directory, checkpoints
(resume, periodic, on SIGTERM/SIGINT), metrics, evaluation and samples. The host
never waits on the device between logging steps (metrics are fetched only then).
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax
from jax.experimental import multihost_utils
from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jaxgen import checkpoint, data
from jaxgen.config import Config, check_no_placeholders
from jaxgen.errors import JaxgenError
from jaxgen.metrics import MetricsWriter, progress_bar
from jaxgen.paths import RunPath, run_path
from jaxgen.runtime import cpu_malloc
from jaxgen.runtime.mesh import activate, data_parallel_size, make_mesh
from jaxgen.tokenizer import load_tokenizer, model_vocab_size
from jaxgen.train import resume
from jaxgen.train.hooks import Hooks, StepInfo
from jaxgen.train.reports import Sampler, StepLogger, Validation
from jaxgen.train.step import TrainState, TrainStep
from jaxgen.train.tuning import Tuning


@dataclasses.dataclass
class TrainResult:
    run_dir: RunPath
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


def check_resume(run_dir: RunPath, config: Config) -> None:
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


class Run:
    """One `train` call's mesh, jitted step, checkpoints, batches and hooks.

    A fine-tuning run passes its `tuning` and `load_base` (the starting params, read for a
    fresh run, and for a resumed LoRA run whose checkpoints hold only the adapters).
    """

    def __init__(
        self,
        config: Config,
        run_dir: RunPath,
        mesh,
        console: Console,
        tuning: Tuning | None = None,
        load_base: Callable[[], Any] | None = None,
    ):
        self.config, self.run_dir, self.mesh, self.console = config, run_dir, mesh, console
        self.load_base = load_base
        check_shapes(config, mesh)
        self.step_fn = TrainStep.from_config(config, mesh, tuning, data.prefix_segments(config))
        self.mngr = checkpoint.manager(run_dir, config)
        self.batches = data.train_batches(config, mesh)
        self.metrics = MetricsWriter(run_dir)
        self.hooks = Hooks()
        self.logger = StepLogger(config, self.metrics, console, self.hooks)
        self.validation = Validation(config, self.step_fn, mesh, self.metrics, console)
        cfg = config.train
        self.hooks.add("collect", self.logger.collect, 1)
        self.hooks.add("log", self.logger.report, cfg.log_every, at_last=True)
        self.hooks.add("eval", self._validate_between_steps, cfg.eval_every, pauses=True)
        sampler = Sampler(config, run_dir, mesh, self.metrics, console, self.step_fn.model_params)
        self.hooks.add("sample", sampler, cfg.sample_every, pauses=True)
        self.hooks.add("checkpoint", lambda info: self.save(info.state, info.step), config.checkpoint.every)

    def _validate_between_steps(self, info: StepInfo) -> None:
        if not info.last:  # the final step gets a full validation after the loop
            self.validation(info)

    def start(self) -> tuple[TrainState, int]:
        """The state to train from: the newest intact checkpoint (train/resume.py), or a
        fresh init when the run has none."""
        leader = jax.process_index() == 0
        if not checkpoint.step_dirs(self.run_dir):
            resume.check_fresh_start(self.run_dir)
            base = None if self.load_base is None else self.load_base()
            return self.step_fn.init(jax.random.key(self.config.train.seed), base), 0
        if self.load_base is not None and self.step_fn.tuning.has_frozen_base:
            self.step_fn.set_frozen(self.load_base())
        abstract = self.step_fn.abstract_state()
        shard = self.step_fn.state_shardings
        targets = {
            "params": (abstract.params, shard.params),
            "opt": (
                (abstract.opt_state, abstract.step, abstract.rng),
                (shard.opt_state, shard.step, shard.rng),
            ),
            "data": None,
        }
        shapes = {
            jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]
        }
        warn = self.console.print if leader else (lambda _: None)
        found = resume.newest_intact(
            self.run_dir,
            lambda step: checkpoint.restore(self.mngr, step, targets),
            tuple(targets),
            shapes,
            warn,
        )
        assert found is not None  # there are step directories
        latest, items, damaged = found
        barrier("jaxgen-restored")  # every process has read before the damaged ones move
        if leader:
            resume.move_aside(self.run_dir, damaged)
            resume.trim_metrics(self.run_dir, latest)
        barrier("jaxgen-moved-aside")
        if damaged:
            self.mngr.reload()
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
        with checkpoint.writing(self.run_dir):
            checkpoint.save(self.mngr, step, items, force=force)

    def wait(self) -> None:
        """Waits for a checkpoint save in flight (one line if it failed to write)."""
        with checkpoint.writing(self.run_dir):
            self.mngr.wait_until_finished()


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_data(config: Config) -> data.DatasetInfo:
    """`data.prepare` by process 0 first (it writes the shared files); the others then read them."""
    leader = jax.process_index() == 0
    if leader:
        info = data.prepare(config)
    barrier("jaxgen-prepared")
    return info if leader else data.prepare(config, progress=False)


def begin(
    config: Config, run_dir, console: Console | None, overwrite: bool = False
) -> tuple[Console, RunPath]:
    """The console and run directory of a `train` or `finetune` call (default `runs/<name>`;
    a `gs://` URL is a run directory in a bucket: jaxgen/paths.py); `overwrite` clears what
    an earlier run left there (train/resume.py: `clear`)."""
    # One process speaks for a multi-host job. Lines are not wrapped to the console's width:
    # a log line cut mid-value (the banner's mesh dict, a long run dir) reads as two.
    console = console or Console(quiet=jax.process_index() != 0, soft_wrap=True)
    check_no_placeholders(config)
    run_dir = run_path(run_dir or pathlib.Path("runs") / config.name)
    if overwrite and jax.process_index() == 0:
        resume.clear(run_dir)
    barrier("jaxgen-begin")
    return console, run_dir


def train(
    config: Config,
    run_dir: str | RunPath | None = None,
    *,
    console: Console | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Trains `config` in `run_dir` (default `runs/<config.name>`), resuming if possible;
    `overwrite` starts over instead (an existing run never restarts from scratch without it)."""
    started = time.perf_counter()
    leader = jax.process_index() == 0
    console, run_dir = begin(config, run_dir, console, overwrite)
    # Process 0 writes shared files (prepared data, run config); the others wait for it
    # and then only read them.
    info = prepare_data(config)
    tokenizer = load_tokenizer(info.tokenizer_path)
    config = resolve_config(config, tokenizer)
    check_resume(run_dir, config)
    if leader:
        checkpoint.write_run_config(run_dir, config)
        checkpoint.copy_tokenizer(info.tokenizer_path, run_dir)
    barrier("jaxgen-run-dir")
    return run_training(config, run_dir, console, started)


def run_training(
    config: Config,
    run_dir: RunPath,
    console: Console,
    started: float,
    *,
    tuning: Tuning | None = None,
    load_base: Callable[[], Any] | None = None,
    title: str = "training",
) -> TrainResult:
    """The loop over a prepared run directory: `train`'s second half, and `finetune`'s."""
    mesh = make_mesh(config.mesh)
    cpu_malloc.prepare_for_training()
    with activate(mesh), _preemption_flag() as flag:
        run = Run(config, run_dir, mesh, console, tuning, load_base)
        m = config.model
        console.print(
            f"{title} {config.name}: {m.family} {m.num_layers}x{m.d_model}, vocab {m.vocab_size},"
            f" mesh {dict(mesh.shape)}, run dir {run_dir}"
        )
        try:
            return _loop(run, flag, started)
        except BaseException:
            # Whatever stopped the loop (a data worker, NaNs, Ctrl-C twice), a save in flight
            # completes, so the last checkpoint is whole and the run resumes from it.
            run.wait()
            raise
        finally:
            run.batches.close()  # stops worker processes before grain's exit-time finalizers


def _loop(run: Run, flag: dict, started: float) -> TrainResult:
    steps = run.config.train.steps
    state, step = run.start()
    run.logger.since = time.perf_counter()
    bar = progress_bar("train", MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                       TimeRemainingColumn(), console=run.console)  # fmt: skip
    with bar:
        task = bar.add_task("train", total=steps, completed=step)
        while step < steps and flag["stop"] is None:
            with _memory_hint(run.config):
                state, metrics = run.step_fn.step(state, next(run.batches))
            step += 1
            run.hooks.run(StepInfo(step, state, metrics, last=step == steps))
            bar.update(task, completed=step)
    run.logger.report(StepInfo(step, state, None, last=True))  # what a preemption left unlogged
    preempted = flag["stop"] is not None
    final_eval = None
    if preempted:
        run.console.print(f"{flag['stop']}: saving a checkpoint at step {step} and exiting")
    else:
        final_eval = run.validation(StepInfo(step, state, None, last=True), max_batches=None)
    run.wait()
    if step not in run.mngr.all_steps():
        run.save(state, step, force=True)
        run.wait()
    run.mngr.close()
    run.metrics.close()
    return TrainResult(
        run.run_dir,
        step,
        run.logger.losses,
        final_eval,
        time.perf_counter() - started,
        preempted,
        run.logger.skipped,
        jax.process_index(),
    )
