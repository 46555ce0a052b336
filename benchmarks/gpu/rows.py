"""The rows of issue 19's table, in priority order, with their GPU and CPU-smoke sizes.

A row is one workload measured on both sides (jaxgen and its peer) with the same shapes.
The model shape is always a jaxgen config (a file under configs/ plus overrides); the
peers build their model from that resolved config, so the shapes agree by construction.

Budgets are planning estimates for one H100/H200-class GPU (process start, compiles on
both sides, repeats), not measurements: the scheduler starts a row only when its budget
still fits before the deadline, and stops a row's repeats when its budget is spent.
Priority order: one row of each kind first (train, small decode, large decode), then the
other sizes, then beam search and the compile-time row (the most expensive: a cold compile
per variant, each in a fresh process).

This module imports no JAX or torch: `run.py --dry-run` prints the plan without them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Kind = Literal["train", "compile", "decode", "beam"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one row runs: a jaxgen config and the sizes it is run at."""

    config_file: str | None  # under the repo root; None: jaxgen's defaults + overrides
    overrides: tuple[str, ...]  # jaxgen `key=value` overrides (model shape, remat, ...)
    batch: int
    seq_len: int = 0  # train / compile rows: tokens per sequence
    prompt_len: int = 0  # decode / beam rows
    new_tokens: int = 0
    num_beams: int = 0
    layers: tuple[int, ...] = ()  # compile row: the depths compared
    steps: int = 20  # timed train steps per repeat (after `warmup` untimed ones)
    warmup: int = 3


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    title: str  # the issue table's wording
    kind: Kind
    peer: Literal["nanogpt", "hf"] | None
    budget_s: float
    gpu: Setting
    smoke: Setting
    target: str  # the jaxgen target, as text
    # Numeric targets where the issue gives one (None: judged from the figures).
    min_speedup: float | None = None  # jaxgen speed-up over the peer
    min_mfu: float | None = None
    min_floor_fraction: float | None = None  # weight-pass time / decode-step time
    solo_budget_s: float | None = None  # the budget when the peer does not run (None: budget_s)

    def setting(self, smoke: bool) -> Setting:
        return self.smoke if smoke else self.gpu

    def budget(self, peer_runs: bool) -> float:
        return self.budget_s if peer_runs or self.solo_budget_s is None else self.solo_budget_s

    def with_overrides(self, extra: tuple[str, ...]) -> Row:
        """This row with jaxgen overrides added to both settings (`run.py --set`)."""
        more = lambda s: dataclasses.replace(s, overrides=s.overrides + extra)  # noqa: E731
        return dataclasses.replace(self, gpu=more(self.gpu), smoke=more(self.smoke))


# Smoke shapes: one layer, width 32, vocab 256 — every code path, a few seconds of compile.
# GPT-2 rows share one shape so that their programs are compiled once per process.
_SMOKE_GPT2 = ("model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.max_len=64")
_SMOKE_LLAMA = _SMOKE_GPT2 + ("model.num_kv_heads=1", "model.mlp_dim=64")
# Train rows take the vocab from the tokenizer setting (as `jaxgen train` would); decode
# rows from the model.
_SMOKE_TRAIN_VOCAB = ("tokenizer.vocab_size=256",)
_SMOKE_DECODE_VOCAB = ("model.vocab_size=256",)

_GPT2_124M = ("model.preset=gpt2-124m",)
_LLAMA_1B = ("model.preset=llama-1.1b",)


def _train(config_file, overrides, batch, seq_len, smoke_overrides, **kw) -> tuple[Setting, Setting]:
    gpu = Setting(config_file, overrides, batch, seq_len=seq_len, **kw)
    smoke = Setting(config_file, overrides + smoke_overrides + _SMOKE_TRAIN_VOCAB, 2, seq_len=32, steps=2,
                    warmup=1, layers=(1, 2) if kw.get("layers") else ())  # fmt: skip
    return gpu, smoke


def _decode(preset, batch, smoke_overrides, smoke_batch, num_beams=0) -> tuple[Setting, Setting]:
    gpu = Setting(None, preset, batch, prompt_len=32, new_tokens=256, num_beams=num_beams)
    smoke = Setting(None, preset + smoke_overrides + _SMOKE_DECODE_VOCAB, smoke_batch, prompt_len=8,
                    new_tokens=16, num_beams=num_beams)  # fmt: skip
    return gpu, smoke


ROWS: tuple[Row, ...] = (
    Row("train_gpt2_124m", "train GPT-2 124M, 16 x 1024 tokens/step", "train", "nanogpt", 60,
        *_train("configs/gpt2_124m.yaml", (), 16, 1024, _SMOKE_GPT2),
        ">= 1.25x nanoGPT tokens/s, >= 52% MFU", min_speedup=1.25, min_mfu=0.52),
    Row("decode_gpt2_124m_b1", "decode GPT-2 124M, batch 1, 256 new tokens", "decode", "hf", 70,
        *_decode(_GPT2_124M, 1, _SMOKE_GPT2, 1), ">= 12x HF", min_speedup=12.0),
    Row("decode_llama_1b_b1", "decode Llama 1.1B, batch 1", "decode", "hf", 80,
        *_decode(_LLAMA_1B, 1, _SMOKE_LLAMA, 1),
        ">= 75% of the weight-bandwidth floor", min_floor_fraction=0.75),
    Row("train_llama_1b", "train Llama 1.1B (TinyLlama shape), 8 x 2048 tokens/step", "train", None, 80,
        *_train("configs/llama_1b.yaml", (), 8, 2048, _SMOKE_LLAMA), ">= 55% MFU", min_mfu=0.55),
    Row("decode_gpt2_124m_b64", "decode GPT-2 124M, batch 64", "decode", "hf", 50,
        *_decode(_GPT2_124M, 64, _SMOKE_GPT2, 2), ">= 10x HF", min_speedup=10.0),
    Row("decode_llama_1b_b32", "decode Llama 1.1B, batch 32", "decode", "hf", 90,
        *_decode(_LLAMA_1B, 32, _SMOKE_LLAMA, 1), ">= 20x HF", min_speedup=20.0),  # smoke: row 3's program
    Row("train_gpt2_350m", "train GPT-2 350M, 8 x 1024", "train", "nanogpt", 100,
        # In smoke, row 1's learning rate too: the same program as row 1's, compiled once.
        *_train("configs/gpt2_350m.yaml", (), 8, 1024, _SMOKE_GPT2 + ("optimizer.learning_rate=6.0e-4",)),
        ">= 1.25x nanoGPT, >= 52% MFU", min_speedup=1.25, min_mfu=0.52),
    Row("beam5_gpt2_124m", "beam search 5, GPT-2 124M, batch 1", "beam", "hf", 40,
        *_decode(_GPT2_124M, 1, _SMOKE_GPT2, 1, num_beams=5), ">= 10x HF, same beams", min_speedup=10.0),
    Row("compile_12_vs_48", "compile time, 12 vs 48 layers (GPT-2 124M width, 16 x 1024)", "compile",
        "nanogpt", 200, *_train("configs/gpt2_124m.yaml", (), 16, 1024, _SMOKE_GPT2, layers=(12, 48)),
        "flat in depth with no throughput loss vs unrolled", solo_budget_s=110),
)  # fmt: skip

BY_NAME = {row.name: row for row in ROWS}
