"""`jaxgen bench generate`: prefill and decode throughput, ms per decode step, compile time.

One JSON line per setting. Timings are of the second call of each compiled program
(the first call's extra time is reported as compile seconds). The baseline line times
greedy decoding by re-running the full forward pass over the whole (fixed-size) token
buffer for every new token, for the same model and batch, in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import Config, GenerateConfig
from jaxgen.decode import beam, loop, request, sampling
from jaxgen.errors import JaxgenError
from jaxgen.model import quant
from jaxgen.model.serving import unstack_layers
from jaxgen.model.transformer import Transformer, init_params, param_count


def _seconds(fn, *args) -> float:
    """One call's wall seconds, waited until the result is ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _timed(fn, *args) -> tuple[float, float]:
    """(first call seconds, second call seconds)."""
    return _seconds(fn, *args), _seconds(fn, *args)


def _median_seconds(fn, *args, calls: int = 5) -> float:
    """The median of `calls` timed calls after a first (compiling) one. For the bare weight
    pass: one pass moved between 8.5 and 15.7 ms within a run (GPT-2 124M int8-head, a
    shared 2-core machine), as much as the decode step it is the floor of."""
    _seconds(fn, *args)
    return float(np.median([_seconds(fn, *args) for _ in range(calls)]))


def _prompts(batch: int, length: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    return prompt, np.full((batch,), length, np.int32), np.arange(batch, dtype=np.int32)


def _decode_line(config, params, batch, prompt_len, new_tokens, strategy) -> dict:
    cfg = config.model
    spec = loop.DecodeSpec(strategy, buffer=loop.bucket(new_tokens))
    whole, start, _ = loop.compiled(cfg, spec)
    prompt, lengths, ids = _prompts(batch, prompt_len, cfg.vocab_size)
    args = (params, prompt, lengths, ids, np.int32(0), np.int32(new_tokens), sampling.knobs(strategy, batch))
    first_prefill, prefill_s = _timed(start, *args)  # prefill + the first token
    first_whole, whole_s = _timed(whole, *args)
    decode_s = max(whole_s - prefill_s, 1e-9)
    return {
        "setting": "cached_decode", "strategy": _describe(strategy), "batch": batch,
        "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "ms_per_decode_step": 1e3 * decode_s / (new_tokens - 1),
        "total_s": whole_s,
        "compile_s": (first_prefill - prefill_s) + (first_whole - whole_s),
    }  # fmt: skip


@jax.jit
def _weight_pass(params):
    """Reads every weight once: the largest value of each array, in its stored format.

    A max is what XLA:CPU reduces fastest in every format (124 MB of int8: 4.7 ms, where a
    float32 sum of the same bytes converts them first and took 12-14 ms): the pass then
    times the read, not a conversion.
    """
    return sum(jnp.max(x).astype(jnp.float32) for x in jax.tree.leaves(params))


def _describe(strategy) -> str:
    if isinstance(strategy, sampling.Greedy):
        return "greedy"
    off = sampling.Sample(strategy.temperature)  # the filters' "off" values
    changed = [f"{k}={getattr(strategy, k)}" for k in ("top_k", "top_p", "min_p")
               if getattr(strategy, k) != getattr(off, k)]  # fmt: skip
    return " ".join([f"temperature={strategy.temperature}", *changed])


def parse_sample(spec: str) -> sampling.Sample:
    """`"temperature=0.8 top_p=0.9"` (space- or comma-separated) -> a validated Sample strategy."""
    options: dict[str, float] = {}
    for item in spec.replace(",", " ").split():
        key, eq, value = item.partition("=")
        if not eq or key not in ("temperature", "top_k", "top_p", "min_p"):
            raise JaxgenError(f"--sample: {item!r} is not one of temperature=, top_k=, top_p=, min_p=")
        try:
            options[key] = int(value) if key == "top_k" else float(value)
        except ValueError:
            raise JaxgenError(f"--sample: {key}={value!r} is not a number") from None
    strategy = sampling.make_strategy(request.validate(GenerateConfig(), **options))
    if not isinstance(strategy, sampling.Sample):
        raise JaxgenError(f"--sample: {spec!r} is greedy (temperature=0); greedy is always timed")
    return strategy


def _baseline_line(config, params, batch, prompt_len, new_tokens) -> dict:
    """Greedy decoding by a full forward pass over the whole buffer per new token."""
    cfg = config.model
    model = Transformer(cfg)
    width = prompt_len + new_tokens

    @jax.jit
    def step(params, tokens, t):  # tokens [B, width]; the next token goes to slot t
        positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
        logits = model.apply({"params": params}, tokens, positions)[0]
        nxt = jnp.argmax(logits[:, t - 1], axis=-1).astype(jnp.int32)
        return tokens.at[:, t].set(nxt)

    prompt, _, _ = _prompts(batch, prompt_len, cfg.vocab_size)
    tokens = np.zeros((batch, width), np.int32)
    tokens[:, :prompt_len] = prompt
    first, _ = _timed(step, params, tokens, np.int32(prompt_len))
    t = time.perf_counter()
    out = jnp.asarray(tokens)
    for i in range(prompt_len, width):
        out = step(params, out, np.int32(i))
    jax.block_until_ready(out)
    total = time.perf_counter() - t
    return {
        "setting": "full_forward_per_token", "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_tokens_per_s": batch * new_tokens / total, "ms_per_decode_step": 1e3 * total / new_tokens,
        "total_s": total, "compile_s": first,
    }  # fmt: skip


def _beam_line(config, params, batch, prompt_len, new_tokens, num_beams) -> dict:
    cfg = config.model
    spec = loop.DecodeSpec(sampling.BeamSearch(num_beams, 1, 1.0, False), buffer=loop.bucket(new_tokens))
    prompt, lengths, _ = _prompts(batch, prompt_len, cfg.vocab_size)
    first, total = _timed(beam.compiled(cfg, spec), params, prompt, lengths, np.int32(new_tokens))
    return {
        "setting": f"beam{num_beams}", "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "returned_tokens_per_s": batch * new_tokens / total, "ms_per_decode_step": 1e3 * total / new_tokens,
        "total_s": total, "compile_s": first - total,
    }  # fmt: skip


def run(
    config: Config,
    *,
    batches=(1, 8),
    prompt_len=32,
    new_tokens=256,
    num_beams=0,
    baseline=True,
    samplers: tuple[sampling.Sample, ...] = (),
    weights: tuple[str, ...] = (),
) -> Iterator[dict]:
    """Yields one dict per setting (the CLI prints each as a JSON line).

    Greedy cached decoding is timed at every batch size; each of `samplers` at the first;
    with `weights` (model/quant.py), greedy batch-1 decoding again for each storage format,
    beside a bare pass that reads every weight once (the max of each array in its format:
    the floor of a batch-1 step), in alternating order.
    """
    cfg = config.model
    loop.check_room(cfg, prompt_len, new_tokens, "bench")
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    serving = unstack_layers(params, cfg)  # as LanguageModel decodes: one array per layer
    common = {
        "bench": "generate", "model": f"{cfg.family} L{cfg.num_layers} D{cfg.d_model} V{cfg.vocab_size}",
        "params": param_count(cfg), "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
    }  # fmt: skip
    cached = {}
    for b in batches:
        line = _decode_line(config, serving, b, prompt_len, new_tokens, sampling.Greedy())
        cached[b] = line["total_s"]
        yield common | line
    for strategy in samplers:
        yield common | _decode_line(config, serving, batches[0], prompt_len, new_tokens, strategy)
    if num_beams > 1:
        yield common | _beam_line(config, serving, batches[0], prompt_len, new_tokens, num_beams)
    convert = jax.jit(quant.serving_weights, static_argnums=(1, 2))
    for r, name in enumerate(list(weights) + list(reversed(weights))):  # each twice, order alternating
        converted = convert(serving, name, quant.tiles_for(cfg))
        line = _decode_line(config, converted, batches[0], prompt_len, new_tokens, sampling.Greedy())
        floor_ms = 1e3 * _median_seconds(_weight_pass, converted)
        yield common | line | {
            "weights": name, "round": r // len(weights), "weight_mb": quant.weight_bytes(converted) / 1e6,
            "weight_pass_ms": floor_ms, "vs_weight_pass": line["ms_per_decode_step"] / floor_ms,
        }  # fmt: skip
    if baseline:
        b = batches[0]
        line = _baseline_line(config, params, b, prompt_len, new_tokens)
        yield common | line | {"cached_speedup": line["total_s"] / cached[b]}
