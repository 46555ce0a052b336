"""Autoregressive decoding: prefill, decode steps and one jitted loop with a KV cache.

The whole generation (prefill, a `lax.while_loop` of decode steps, per-row stopping)
is one compiled function, so the host is not involved per token. Streaming runs the
same loop in chunks of steps: `start` (prefill + first token) and `advance` (up to N
more steps, the state donated so the cache is updated in place) are compiled once
and reused for every chunk.

Rows are left-padded to a common prompt length P (see jaxgen/model/kvcache.py), so every
row's next token goes to the same slot `P + step`. Prompt lengths, batch sizes and
the generated-token buffer are bucketed (powers of two, or configured buckets), so a
new prompt length rarely compiles a new program; the real limit on new tokens is a
traced value.

The model runs in the serving layout (jaxgen/model/serving.py: one weight array per
layer, no per-step slicing of the stacked weights). The public functions take params
in either layout; stacked ones are unstacked once per call, outside the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.decode import sampling
from jaxgen.errors import JaxgenError
from jaxgen.model.kvcache import CACHE_NAMES, KVCache, init_cache, write_slots
from jaxgen.model.layers import constrain
from jaxgen.model.serving import ServingTransformer, unstack_layers
from jaxgen.model.transformer import Transformer
from jaxgen.runtime.mesh import batch_sharding, data_parallel_size, mesh_context
from jaxgen.tokenizer.text import stop_prefix

FINISH_REASONS = (None, "length", "eos", "stop")  # index = the code kept in the state
LENGTH, EOS, STOP = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How to decode: the strategy, processors, stopping rules and buffer size.

    Its `program()` (the static part: sampling values replaced by markers) keys the
    compiled loop; the sampling values go in as `sampling.SampleKnobs`.
    """

    strategy: sampling.Strategy = sampling.Greedy()
    processors: sampling.Processors = sampling.Processors()
    stopping: sampling.Stopping = sampling.Stopping()
    buffer: int = 16  # generated-token slots (a bucket >= max_new_tokens)

    def program(self) -> DecodeSpec:
        return dataclasses.replace(self, strategy=sampling.program(self.strategy))


@flax.struct.dataclass
class SamplingState:
    """What the decoding loop carries from step to step."""

    tokens: jax.Array  # [B, S] int32: prompt left-padded into [0, P), generated from P
    valid: jax.Array  # [B, S] bool: real text (not padding, not after the row stopped)
    cache: KVCache
    step: jax.Array  # [] int32: tokens generated so far; the next goes to slot P + step
    prompt_lengths: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    finish: jax.Array  # [B] int32 code into FINISH_REASONS
    num_tokens: jax.Array  # [B] int32 completion tokens kept (eos / stop sequence excluded)
    logprob: jax.Array  # [B] float32 sum of the generated tokens' log-probs (eos / stop included)
    keys: jax.Array  # [B] per-row PRNG keys
    knobs: sampling.SampleKnobs  # [B] per-row temperature, top-p, min-p
    limit: jax.Array  # [] int32 max new tokens
    prompt_len: int = flax.struct.field(pytree_node=False)  # P

    @property
    def slot(self) -> jax.Array:
        """[]: the slot every row's next token goes to."""
        return self.prompt_len + self.step


@dataclasses.dataclass
class Completion:
    """One row's result (host side)."""

    tokens: list[int]
    finish_reason: str
    # Beam search: HF's sequence score (length-penalised). Sampling and greedy: the sum of
    # the generated tokens' log-probs (sampling.choose), eos and stop sequence included.
    score: float | None = None


def bucket(n: int, buckets: Sequence[int] = (), cap: int | None = None) -> int:
    """The smallest configured bucket >= n, else the next power of two (at most `cap`)."""
    fits = [b for b in sorted(buckets) if b >= n]
    size = fits[0] if fits else 1 << max(n - 1, 0).bit_length()
    return max(n, min(size, cap)) if cap else size


# ----------------------------------------------------------------------------- model calls


def prefill(
    model: Transformer | ServingTransformer, params, prompt: jax.Array, lengths: jax.Array, cache: KVCache
):
    """Runs left-padded prompts [B, P] (real lengths [B]) through the model once.

    Returns:
        float32 logits of each row's last prompt token [B, V], and the filled cache.
    """
    p = prompt.shape[1]
    start = (p - lengths)[:, None]  # [B, 1] first real slot
    slots = jnp.arange(p)[None]  # [1, P]
    segment = (slots >= start).astype(jnp.int32)
    positions = jnp.maximum(slots - start, 0)  # 0 at each row's first real token
    last = jnp.full(lengths.shape, p - 1, jnp.int32)  # left-padded: every prompt ends at P - 1
    logits, cache = model.apply({"params": params}, prompt, positions, segment, cache=cache, logits_at=last)
    return logits[:, 0].astype(jnp.float32), cache


def decode_step(
    model: Transformer | ServingTransformer, params, tokens: jax.Array, positions: jax.Array, cache: KVCache
):
    """One token per row (tokens, positions [B]) -> float32 logits [B, V] and the cache."""
    tokens, positions = tokens[:, None], positions[:, None]
    logits, cache = model.apply({"params": params}, tokens, positions, jnp.ones_like(tokens), cache=cache)
    return logits[:, 0].astype(jnp.float32), cache


def new_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache laid out by logical axes (batch on data, kv heads on tensor)."""
    cache = init_cache(config, batch, length)
    return cache.replace(
        k=constrain(cache.k, CACHE_NAMES),
        v=constrain(cache.v, CACHE_NAMES),
        segment=constrain(cache.segment, ("batch", "cache_length")),
    )


# ----------------------------------------------------------------------------- the loop


def append(state, token: jax.Array, logp: jax.Array, stopping: sampling.Stopping, active=True):
    """Writes each running row's new token (log-prob `logp`) at its `state.slot`, applies stopping.

    `state` is a `SamplingState` (every row at slot P + step) or a `ragged.RowState` (a
    slot and a step per row); `active` [B] leaves the other rows as they are.
    """
    slot = state.slot
    running = ~state.done & active
    token = jnp.where(running, token, 0)
    logprob = state.logprob + jnp.where(running, logp, 0.0)
    # A row that does not append writes (0, False) at its next slot: nothing there yet.
    tokens = write_slots(state.tokens, token[:, None], slot)
    valid = write_slots(state.valid, running[:, None], slot)
    num = state.num_tokens + running
    finish = state.finish
    done = state.done
    if stopping.eos_ids:
        eos = running & jnp.isin(token, jnp.asarray(stopping.eos_ids, jnp.int32))
        finish, done, num = jnp.where(eos, EOS, finish), done | eos, num - eos
    for seq in stopping.stop:
        hit = ~done & sampling.ends_with(tokens, valid, slot + 1, seq)
        finish, done = jnp.where(hit, STOP, finish), done | hit
        num = jnp.where(hit, jnp.maximum(num - len(seq), 0), num)
    step = state.step + running if jnp.ndim(state.step) else state.step + 1
    out_of_room = ~done & (step >= state.limit)
    finish, done = jnp.where(out_of_room, LENGTH, finish), done | out_of_room
    return state.replace(
        tokens=tokens, valid=valid, step=step, done=done, finish=finish, num_tokens=num, logprob=logprob
    )


def next_token(state: SamplingState, logits: jax.Array, spec: DecodeSpec) -> tuple[jax.Array, jax.Array]:
    scores = sampling.process(logits, state.tokens, state.valid, state.slot, spec.processors)
    return sampling.choose(scores, spec.strategy, state.knobs, state.keys, state.step)


def fresh_rows(batch: int, row_ids, seed, limit, knobs, spec: DecodeSpec) -> dict:
    """The per-row fields every decoding state starts with: nothing generated yet."""
    return dict(
        done=jnp.zeros((batch,), bool),
        finish=jnp.zeros((batch,), jnp.int32),
        num_tokens=jnp.zeros((batch,), jnp.int32),
        logprob=jnp.zeros((batch,), jnp.float32),
        keys=sampling.row_keys(seed, row_ids),
        knobs=knobs,
        limit=jnp.minimum(limit, spec.buffer).astype(jnp.int32),
    )


def start(model, params, prompt, lengths, row_ids, seed, limit, knobs, spec: DecodeSpec) -> SamplingState:
    """Prefill and pick the first new token: the loop's initial state."""
    b, p = prompt.shape
    cache = new_cache(model.config, b, p + spec.buffer)
    logits, cache = prefill(model, params, prompt, lengths, cache)
    tokens = jnp.zeros((b, p + spec.buffer), jnp.int32).at[:, :p].set(prompt)
    valid = jnp.arange(p + spec.buffer)[None] >= (p - lengths)[:, None]
    valid &= jnp.arange(p + spec.buffer)[None] < p
    state = SamplingState(
        tokens=tokens,
        valid=valid,
        cache=cache,
        step=jnp.zeros((), jnp.int32),
        prompt_lengths=lengths,
        **fresh_rows(b, row_ids, seed, limit, knobs, spec),
        prompt_len=p,
    )
    return append(state, *next_token(state, logits, spec), spec.stopping)


def advance(model, params, state: SamplingState, until: jax.Array, spec: DecodeSpec) -> SamplingState:
    """Decodes until every row is done or `step == until` (a traced bound)."""

    def cond(s: SamplingState):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: SamplingState):
        last = s.prompt_len + s.step - 1
        token = jax.lax.dynamic_slice_in_dim(s.tokens, last, 1, axis=1)[:, 0]
        logits, cache = decode_step(model, params, token, s.prompt_lengths + s.step - 1, s.cache)
        s = s.replace(cache=cache)
        return append(s, *next_token(s, logits, spec), spec.stopping)

    return jax.lax.while_loop(cond, body, state)


def _outputs(state: SamplingState):
    return state.tokens[:, state.prompt_len :], state.num_tokens, state.finish, state.logprob


# XLA's default command buffers (CUDA graphs) on GPUs, plus the loops and conditionals
# themselves: the whole decoding while-loop then runs as one graph, without a host round
# trip per step to test its condition. On an H200 GPT-2 124M greedy decoding went from
# 1,505 to 1,738 tokens/s at batch 1 (through XLA_FLAGS; at batch 64 no gain showed beyond
# the earlier spread; benchmarks/RESULTS.md).
_GPU_COMMANDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"
_GPU_LOOP_OPTIONS = {"xla_gpu_enable_command_buffer": _GPU_COMMANDS + ",WHILE,CONDITIONAL"}


def loop_jit(fn, **kwargs):
    """`jax.jit` for a program built around a decoding while-loop (see _GPU_LOOP_OPTIONS)."""
    options = _GPU_LOOP_OPTIONS if jax.default_backend() == "gpu" else None
    return jax.jit(fn, compiler_options=options, **kwargs)


def compiled(config: ModelConfig, spec: DecodeSpec):
    """The jitted programs for one model config and decoding spec's program (cached; jit
    caches shapes). Specs that differ only in sampling values share them.

    Each takes params in either layout (stacked ones are unstacked inside, before the loop:
    pass `unstack_layers(params, config)` to programs called repeatedly).

    Returns:
        (generate, start, advance): `generate(params, prompt, lengths, row_ids, seed, limit,
        knobs)` -> (tokens [B, buffer], num_tokens [B], finish [B], logprob [B]); `start` (same
        arguments) -> SamplingState; `advance(params, state, until)` -> SamplingState with
        the state donated.
    """
    return _compiled(config, spec.program())


@functools.lru_cache(maxsize=64)
def _compiled(config: ModelConfig, spec: DecodeSpec):
    model = ServingTransformer(config)

    def whole(params, prompt, lengths, row_ids, seed, limit, knobs):
        params = unstack_layers(params, config)
        state = start(model, params, prompt, lengths, row_ids, seed, limit, knobs, spec)
        return _outputs(advance(model, params, state, state.limit, spec))

    def begin(params, *args):
        return start(model, unstack_layers(params, config), *args, spec=spec)

    def resume(params, state, until):
        return advance(model, unstack_layers(params, config), state, until, spec)

    return loop_jit(whole), jax.jit(begin), loop_jit(resume, donate_argnums=(1,))


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class Batch:
    """Prompts laid out for the device: left-padded, batch and length bucketed."""

    prompt: np.ndarray  # [B, P] int32
    lengths: np.ndarray  # [B] int32
    row_ids: np.ndarray  # [B] int32
    count: int  # real rows (the rest are padding rows)


def make_batch(
    prompts: Sequence[Sequence[int]], row_ids: Sequence[int], *, buckets=(), batch_multiple=1, max_len=None
) -> Batch:
    """Left-pads token lists into a bucketed [B, P] batch; padding rows hold one token."""
    longest = max(len(p) for p in prompts)
    p = bucket(longest, buckets, cap=max_len)
    b = bucket(len(prompts))
    b = -(-b // batch_multiple) * batch_multiple
    prompt = np.zeros((b, p), np.int32)
    lengths = np.ones((b,), np.int32)
    ids = np.zeros((b,), np.int32)
    for i, (toks, rid) in enumerate(zip(prompts, row_ids, strict=True)):
        if not toks:
            raise JaxgenError(f"prompt {rid}: empty (give at least one token, e.g. the bos token)")
        prompt[i, p - len(toks) :] = toks
        lengths[i], ids[i] = len(toks), rid
    return Batch(prompt, lengths, ids, len(prompts))


def check_room(config: ModelConfig, prompt_len: int, max_new_tokens: int, where: str = "prompt") -> None:
    if prompt_len + max_new_tokens > config.max_len:
        raise JaxgenError(
            f"{where}: {prompt_len} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
            f"max_len={config.max_len} (shorten the prompt, lower max_new_tokens"
            " or set generate.truncate_prompt)"
        )


def device_args(batch: Batch, seed: int, limit: int, mesh, strategy: sampling.Strategy):
    """The compiled loop's arguments after params: per-row arrays sharded like the batch."""
    rows = (batch.prompt, batch.lengths, batch.row_ids, sampling.knobs(strategy, len(batch.lengths)))
    if mesh is not None:
        rows = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim)), rows)
    prompt, lengths, row_ids, knobs = rows
    return prompt, lengths, row_ids, np.int32(seed), np.int32(limit), knobs


def completions(tokens, num, finish, logprob, count) -> list[Completion]:
    tokens, num, finish, logprob = (np.asarray(x) for x in (tokens, num, finish, logprob))
    return [
        Completion(tokens[i, : num[i]].tolist(), FINISH_REASONS[finish[i]], float(logprob[i]))
        for i in range(count)
    ]


def prepare_batch(config, spec, prompts, max_new_tokens, row_ids, mesh, buckets) -> Batch:
    if max_new_tokens > spec.buffer:  # the buffer is static; the loop would stop early
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds DecodeSpec.buffer={spec.buffer}")
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    for rid, prompt in zip(row_ids, prompts, strict=True):
        check_room(config, len(prompt), max_new_tokens, f"prompt {rid}")
    multiple = 1 if mesh is None else data_parallel_size(mesh)
    return make_batch(prompts, row_ids, buckets=buckets, batch_multiple=multiple, max_len=config.max_len)


def generate_ids(
    config, params, prompts, spec: DecodeSpec, *, max_new_tokens, seed=0, row_ids=None, mesh=None, buckets=()
) -> list[Completion]:
    """Generates for token-id prompts in one batch; one `Completion` per prompt, in order.

    Args:
        config: the ModelConfig of `params` (placed with the model's shardings on `mesh`).
        prompts: token-id lists, each non-empty.
        spec: the decoding program; `spec.buffer` must be >= max_new_tokens.
        row_ids: each row's identity (default 0..n-1): equal id and seed give equal text,
            whatever else is in the batch.
        mesh: shard the batch over its data axes (None: one device).
        buckets: prompt-length buckets (empty: powers of two).
    """
    batch = prepare_batch(config, spec, prompts, max_new_tokens, row_ids, mesh, buckets)
    whole, _, _ = compiled(config, spec)
    with mesh_context(mesh):
        out = whole(params, *device_args(batch, seed, max_new_tokens, mesh, spec.strategy))
    return completions(*out, batch.count)


def stream_ids(
    config,
    params,
    prompts,
    spec: DecodeSpec,
    *,
    max_new_tokens,
    chunk=8,
    seed=0,
    row_ids=None,
    mesh=None,
    buckets=(),
) -> Iterator[list[list[int]]]:
    """Like `generate_ids`, yielding each row's newly kept tokens after every chunk of steps.

    The pieces of a row add up to its final completion: a running row's last tokens are
    held back while they could be the start of a stop sequence. The final `Completion`s
    are the generator's return value.
    """
    batch = prepare_batch(config, spec, prompts, max_new_tokens, row_ids, mesh, buckets)
    _, begin, advance_fn = compiled(config, spec)
    sent = [0] * batch.count
    params = unstack_layers(params, config)  # once, not per chunk
    with mesh_context(mesh):
        state = begin(params, *device_args(batch, seed, max_new_tokens, mesh, spec.strategy))
        while True:
            # Running rows keep every token so far; finished ones exclude eos and stop sequences.
            tokens, num = np.asarray(state.tokens[:, batch.prompt.shape[1] :]), np.asarray(state.num_tokens)
            done = np.asarray(state.done)
            new = []
            for i in range(batch.count):
                kept = tokens[i, : num[i]].tolist()
                upto = len(kept) if done[i] else len(kept) - stop_prefix(tuple(kept), spec.stopping.stop)
                new.append(kept[sent[i] : upto])
                sent[i] = max(sent[i], upto)
            yield new
            if bool(np.all(done)):
                break
            state = advance_fn(params, state, state.step + chunk)
    return completions(*_outputs(state), batch.count)
