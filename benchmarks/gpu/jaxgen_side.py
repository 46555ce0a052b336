"""jaxgen's side of each row, through the code behind `jaxgen bench train|generate`.

Each call is one repeat: `jaxgen.bench.train.run` builds the state and compiles the real
train step every time it is called, so repeats after the first would pay a compile again.
run.py points JAX's persistent compilation cache at a fresh directory per invocation:
the first call of a program compiles cold (the figure reported), later repeats load it.
"""

from __future__ import annotations

import pathlib
import statistics

from rows import Setting

from jaxgen.bench import generate as bench_generate
from jaxgen.bench import train as bench_train
from jaxgen.config import Config, load_config
from jaxgen.convert.hf_config import hf_config
from jaxgen.model.transformer import model_flops_per_token

REPO = pathlib.Path(__file__).resolve().parents[2]


def train_config(setting: Setting, dtype: str, data_dir: str, layers: int = 0, scan: bool | None = None):
    """The config `jaxgen train` would run for a train or compile row, as `jaxgen bench
    train` resolves it (the vocab from the tokenizer settings: no tokenizer file in data_dir)."""
    overrides = [
        *setting.overrides,
        f"train.batch_size={setting.batch}",
        f"train.seq_len={setting.seq_len}",
        "train.grad_accum=1",  # one step = one batch of batch x seq_len tokens, as nanoGPT's
        f"model.dtype={dtype}",
        f"data.data_dir={data_dir}",
    ]
    if layers:
        overrides.append(f"model.num_layers={layers}")
    if scan is not None:
        overrides.append(f"model.scan_layers={str(scan).lower()}")
    path = None if setting.config_file is None else REPO / setting.config_file
    config, _ = bench_train.as_trained(load_config(path, overrides))
    return config


def decode_config(setting: Setting, dtype: str) -> Config:
    """Decode rows: weights stored in `dtype` too (the peer's weights are bf16 on GPU)."""
    return load_config(None, [*setting.overrides, f"model.dtype={dtype}", f"model.param_dtype={dtype}"])


def flops_per_token(config: Config) -> float:
    """Training FLOPs per token (6N + 12 L H Q T), used for both sides' MFU."""
    return model_flops_per_token(config.model, config.train.seq_len)


def train(config: Config, setting: Setting) -> dict:
    """One `jaxgen bench train` measurement: `warmup` untimed steps, then `steps` timed."""
    (line,) = bench_train.run(config, steps=setting.steps, warmup=setting.warmup)
    return {
        "tokens_per_s": line["tokens_per_second"],
        "step_ms": line["step_ms"],
        "compile_s": line["compile_seconds"],
        "loss": line["final_loss"],
        "params": line["params"],
        "vocab_size": line["vocab_size"],
        "compute_dtype": line["compute_dtype"],
        # The allocator's peak since the process started (not per row): an upper bound.
        "peak_memory_bytes": line["peak_memory_bytes"],
    }


def decode(config: Config, setting: Setting, floor: bool = False) -> dict:
    """One `jaxgen bench generate` measurement of greedy (or beam) decoding.

    The headline is new tokens per second of the whole call (prefill included), the figure
    the peer reports too. With `floor`, also the time of a bare pass over the weights in
    their stored format, measured beside decoding (what a batch-1 step cannot beat).
    """
    weights = (config.model.param_dtype,) if floor else ()
    lines = list(bench_generate.run(
        config, batches=(setting.batch,), prompt_len=setting.prompt_len, new_tokens=setting.new_tokens,
        num_beams=setting.num_beams, baseline=False, weights=weights,
    ))  # fmt: skip
    wanted = f"beam{setting.num_beams}" if setting.num_beams > 1 else "cached_decode"
    line = next(x for x in lines if x["setting"] == wanted and "weights" not in x)
    out = {
        "tokens_per_s": setting.batch * setting.new_tokens / line["total_s"],
        "total_s": line["total_s"],
        "ms_per_decode_step": line["ms_per_decode_step"],
        "compile_s": line["compile_s"],
        "params": line["params"],
    }
    if "decode_tokens_per_s" in line:  # greedy: prefill and the decode loop are timed apart
        out["decode_only_tokens_per_s"] = line["decode_tokens_per_s"]
    weighed = [x for x in lines if "weights" in x]
    if weighed:
        out["weight_pass_ms"] = statistics.median(x["weight_pass_ms"] for x in weighed)
        out["weight_mb"] = weighed[0]["weight_mb"]
        out["floor_fraction"] = statistics.median(
            x["weight_pass_ms"] / x["ms_per_decode_step"] for x in weighed
        )
    return out


def hf_config_for(config: Config) -> dict:
    """The config.json of the Hugging Face model that computes what jaxgen's model computes."""
    return hf_config(config.model)
