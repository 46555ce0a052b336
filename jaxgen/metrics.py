"""What a run reports: MFU, evaluation figures, one writer for metrics.jsonl and TensorBoard,
and the one progress-bar layout every long job shows."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile
from typing import Any

import jax
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from tensorboardX import SummaryWriter

from jaxgen.paths import RunPath, is_url

# Dense bf16 peak TFLOP/s per chip, by a substring of `device.device_kind`.
# Order matters: more specific names first ("v5 lite" before "v5").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("v5", 459.0),
    ("v4", 275.0),
)


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """Peak bf16 TFLOP/s of one device, or None when unknown (e.g. CPU)."""
    if override is not None:
        return override
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def mfu(
    tokens_per_second: float, flops_per_token: float, num_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    if peak is None:
        return None
    return tokens_per_second * flops_per_token / (num_devices * peak * 1e12)


def perplexity_figures(nll_sum: float, tokens: float, chars: int = 0, nbytes: int = 0) -> dict:
    """The evaluation figures of summed token NLL, under the names every report uses
    (metrics.jsonl, TensorBoard, `jaxgen eval` JSON and the console).

    Per-character and per-byte figures make models with different tokenizers comparable
    (tokens are not characters); they are left out when the text's size is unknown.
    """
    per_token = nll_sum / max(tokens, 1.0)
    out = {"tokens": tokens, "nats_per_token": per_token, "perplexity": math.exp(min(per_token, 700.0))}
    if chars:
        out |= {"chars": chars, "nats_per_char": nll_sum / chars}
    if nbytes:
        out |= {"bytes": nbytes, "bits_per_byte": nll_sum / math.log(2) / nbytes}
    return out


class MetricsWriter:
    """Appends JSON lines to `metrics.jsonl` and scalars to TensorBoard (process 0 only).

    In a run directory on an object store (`gs://`), where nothing can be appended to, each
    record rewrites the metrics object whole (`_Rewritten`) and TensorBoard writes its event
    files locally, copied up after each record: what is in the bucket is always up to date,
    so a resumed run finds every record up to its checkpoint. Rewriting costs the object's
    size per record (a few MB after 10^4 records), small beside a step of a pod's model.
    """

    def __init__(self, run_dir: RunPath):
        self.enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        self._events = None  # (local directory, bucket directory) of a remote run's events
        if self.enabled:
            events = str(run_dir / "events")
            if is_url(run_dir):
                self._file = _Rewritten(run_dir / "metrics.jsonl")
                events = tempfile.mkdtemp(prefix="jaxgen-events-")
                self._events = (pathlib.Path(events), run_dir / "events")
            else:
                self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            try:
                self._tb = SummaryWriter(events)
            except ImportError:  # TensorBoard is optional; metrics.jsonl always exists
                self._tb = None

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._upload_events()

    def _upload_events(self) -> None:
        if self._events is None:
            return
        self._tb.flush()
        local, remote = self._events
        remote.mkdir(parents=True, exist_ok=True)
        for file in local.iterdir():
            (remote / file.name).write_bytes(file.read_bytes())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._upload_events()
            self._tb.close()
        if self._events is not None:
            shutil.rmtree(self._events[0], ignore_errors=True)


class _Rewritten:
    """A file-like `metrics.jsonl` on an object store: the lines so far, the object rewritten
    whole after each one. It reads the object at its first line, not when opened, because
    resuming trims the object (train/resume.py) between the two."""

    def __init__(self, path: RunPath):
        self.path, self.text = path, None

    def write(self, line: str) -> None:
        if self.text is None:
            self.text = self.path.read_text() if self.path.exists() else ""
        self.text += line
        self.path.write_text(self.text)

    def flush(self) -> None:
        pass  # each write is already whole in the store

    def close(self) -> None:
        pass


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def progress_bar(
    label: str, *figures: ProgressColumn, console: Console | None = None, enabled: bool = True
) -> Progress:
    """A transient rich progress bar: `label` (a TextColumn template), the bar, then the
    caller's figures. Disabled, it shows nothing (quiet runs, tests, non-leader processes)."""
    return Progress(
        TextColumn(label), BarColumn(), *figures, console=console, transient=True, disable=not enabled
    )
