"""`jaxgen bench train CONFIG`: throughput of the real train step on synthetic tokens.

One line (the CLI prints it as JSON): tokens/s, ms per step, MFU, compile seconds and
peak device memory. Synthetic batches keep input out of the measurement (the input pipeline
has its own benchmark, `jaxgen bench data`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import Config
from jaxgen.data.pipeline import window_batch
from jaxgen.data.tokenizer_training import tokenizer_path
from jaxgen.errors import JaxgenError
from jaxgen.metrics import mfu, peak_tflops
from jaxgen.model.layers import compute_dtype
from jaxgen.model.transformer import abstract_variables, init_params, model_flops_per_token, param_count
from jaxgen.runtime import cpu_malloc
from jaxgen.runtime.mesh import activate, make_mesh, param_shardings
from jaxgen.tokenizer import load_tokenizer
from jaxgen.train.loop import check_shapes, resolve_config
from jaxgen.train.step import TrainStep
from jaxgen.train.tuning import Tuning


def synthetic_batch(config: Config, seed: int = 0) -> dict:
    """A batch laid out as the pipeline lays one out, of random tokens."""
    b, t, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
    windows = np.asarray(jax.random.randint(jax.random.key(seed), (b, t + 1), 0, v, dtype=jnp.int32))
    return window_batch(windows, np.ones(windows.shape, bool))


def as_trained(config: Config) -> tuple[Config, str]:
    """The config `jaxgen train` would run, and where its vocab came from.

    Training takes the model's vocab from the tokenizer (rounded up to
    `tokenizer.vocab_multiple`), whatever `model.vocab_size` says: the tokenizer file when
    it exists, else the vocab size the tokenizer will be trained to.
    """

    path = tokenizer_path(config)
    if path.is_file():
        return resolve_config(config, load_tokenizer(path)), str(path)
    if config.tokenizer.path is not None:
        raise JaxgenError(f"tokenizer.path: {config.tokenizer.path} does not exist")
    multiple = config.tokenizer.vocab_multiple
    vocab = -(-config.tokenizer.vocab_size // multiple) * multiple
    model = config.model.model_copy(update={"vocab_size": vocab})
    return config.model_copy(update={"model": model}), "tokenizer.vocab_size"


def _peak_memory(compiled) -> tuple[int | None, str]:
    """Peak bytes on device 0: the allocator's figure where it exists (GPU/TPU),
    otherwise XLA's static estimate for the compiled step (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "allocator"
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None, "unavailable"
    total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    return int(total - analysis.alias_size_in_bytes), "xla_estimate"


def run(config: Config, *, steps: int = 20, warmup: int = 3) -> Iterator[dict]:
    """Compiles and times `steps` train steps after `warmup` untimed ones, for the model
    `jaxgen train` would build from `config` (its vocab from the tokenizer); yields one line."""
    config, vocab_source = as_trained(config)
    mesh = make_mesh(config.mesh)
    check_shapes(config, mesh)
    cpu_malloc.prepare_for_training()
    # finetune.method=lora|freeze times what `jaxgen finetune` would run; a random base
    # stands in for the pretrained one (same shapes, same program).
    tuning = None if config.finetune.method == "full" else Tuning.from_config(config.finetune)
    with activate(mesh):
        trainer = TrainStep.from_config(config, mesh, tuning, prefix_segments=True)  # synthetic windows
        base = None
        if tuning is not None:
            shardings = param_shardings(mesh, abstract_variables(config.model))["params"]
            base = jax.jit(lambda rng: init_params(config.model, rng), out_shardings=shardings)(
                jax.random.key(1)
            )
        state = trainer.init(jax.random.key(0), base)
        trainable = sum(x.size for x in jax.tree.leaves(state.params))
        opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
        batch = jax.device_put(synthetic_batch(config), trainer.batch_sharding)
        start = time.perf_counter()
        compiled = trainer.jit_step.lower(state, trainer.frozen, batch).compile()
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = compiled(state, trainer.frozen, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, trainer.frozen, batch)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
    tokens = config.train.batch_size * config.train.seq_len
    kind = jax.devices()[0].device_kind
    flops = model_flops_per_token(config.model, config.train.seq_len)
    peak_bytes, memory_source = _peak_memory(compiled)
    util = mfu(tokens / seconds, flops, jax.device_count(), peak_tflops(kind, config.train.peak_tflops))
    yield {
        "bench": "train",
        "config": config.name,
        "device": kind,
        "devices": jax.device_count(),
        "params": param_count(config.model),
        "method": config.finetune.method,
        "trainable_params": int(trainable),
        "optimizer_state_bytes": int(opt_bytes),
        "vocab_size": config.model.vocab_size,
        "vocab_source": vocab_source,
        "batch": config.train.batch_size,
        "seq_len": config.train.seq_len,
        "compute_dtype": str(compute_dtype(config.model)),
        "tokens_per_second": round(tokens / seconds, 1),
        "step_ms": round(seconds * 1000, 3),
        "mfu": None if util is None else round(util, 4),
        "compile_seconds": round(compile_s, 2),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_source": memory_source,
        "final_loss": float(metrics.loss),
    }
