"""Continuous refill: a finished row of the batch takes the next prompt at once.

Static batching decodes a batch until its longest row is done, so on a file whose
requested lengths differ 10x most rows idle most of the time. Here the batch is a fixed
set of B rows (decode/ragged.py: each row's text from slot 0, its own cache index and
length limit). The device runs plain decode steps until some occupied row finishes (or
`chunk` steps pass); the host then takes that row's completion and prefills the next
prompt into the row (`insert`: a one-row prefill whose cache is written over the row's),
while the other rows keep their caches and go on. Shapes never change, so two programs
(`insert`, `advance`) serve the whole file.

A row's tokens depend only on its prompt, its limit and its row id (sampling keys are
per row and per step, as in the plain loop), so each completion is the one decoding
that prompt alone gives.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.decode import loop, ragged, sampling
from jaxgen.model.serving import ServingTransformer, unstack_layers


def empty_rows(config: ModelConfig, batch: int, width: int, buffer: int, knobs) -> ragged.RowState:
    """B unoccupied rows (done) of `width` slots."""
    zeros = lambda: jnp.zeros((batch,), jnp.int32)  # noqa: E731 (distinct buffers: the state is donated)
    cache = loop.new_cache(config, batch, width)
    return ragged.RowState(
        tokens=jnp.zeros((batch, width), jnp.int32),
        valid=jnp.zeros((batch, width), bool),
        cache=cache.replace(index=zeros()),
        step=zeros(),
        prompt_lengths=jnp.ones((batch,), jnp.int32),
        done=jnp.ones((batch,), bool),
        finish=zeros(),
        num_tokens=zeros(),
        logprob=jnp.zeros((batch,), jnp.float32),
        keys=sampling.row_keys(0, zeros()),
        knobs=knobs,
        limit=jnp.full((batch,), buffer, jnp.int32),
    )


def insert(model, params, state: ragged.RowState, row, prompt, length, row_id, seed, limit, spec):
    """Prefills `prompt` ([1, P] from slot 0, `length` real tokens) into row `row` and picks its
    first token; the other rows are unchanged."""
    width = state.tokens.shape[1]
    one = loop.new_cache(model.config, 1, width)
    logits, one = ragged.prefill_rows(model, params, prompt, length[None], one)  # [1, V]
    put = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new, row, 0)  # noqa: E731
    put_layers = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new[:, 0], row, 1)  # noqa: E731
    cache = state.cache.replace(
        k=put_layers(state.cache.k, one.k),
        v=put_layers(state.cache.v, one.v),
        segment=put(state.cache.segment, one.segment[0]),
        index=put(state.cache.index, length),
    )
    tokens = jnp.zeros((width,), jnp.int32).at[: prompt.shape[1]].set(prompt[0])
    state = state.replace(
        tokens=put(state.tokens, tokens),
        valid=put(state.valid, jnp.arange(width) < length),
        cache=cache,
        step=put(state.step, 0),
        prompt_lengths=put(state.prompt_lengths, length),
        done=put(state.done, False),
        finish=put(state.finish, 0),
        num_tokens=put(state.num_tokens, 0),
        logprob=put(state.logprob, 0.0),
        keys=put(state.keys, sampling.row_keys(seed, row_id[None])[0]),
        limit=put(state.limit, jnp.minimum(limit, spec.buffer)),
    )
    this = jnp.arange(state.done.shape[0]) == row
    batch_logits = jnp.zeros((this.shape[0], logits.shape[-1]), logits.dtype).at[row].set(logits[0])
    return loop.append(state, *loop.next_token(state, batch_logits, spec), spec.stopping, active=this)


def advance(model, params, state: ragged.RowState, occupied, chunk: int, spec) -> ragged.RowState:
    """Decode steps until an occupied row finishes, every row is done, or `chunk` steps."""

    def cond(carry):
        s, n = carry
        return (n < chunk) & ~jnp.any(s.done & occupied) & ~jnp.all(s.done)

    def body(carry):
        s, n = carry
        return ragged.step_rows(model, params, s, spec), n + 1

    return jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))[0]


@functools.lru_cache(maxsize=16)
def compiled(config: ModelConfig, spec: loop.DecodeSpec, chunk: int):
    """(insert, advance) jitted for serving-layout params, the state donated."""
    model = ServingTransformer(config)
    jit_insert = jax.jit(functools.partial(insert, model, spec=spec), donate_argnums=(1,))
    jit_advance = jax.jit(functools.partial(advance, model, chunk=chunk, spec=spec), donate_argnums=(1,))
    return jit_insert, jit_advance


def refill_ids(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    limits: Sequence[int],
    spec: loop.DecodeSpec,
    *,
    batch_size: int,
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
    chunk: int = 64,
    shape: tuple[int, int] = (0, 0),
) -> Iterator[tuple[int, loop.Completion]]:
    """Decodes every prompt (its own max new tokens in `limits`, each <= spec.buffer) with
    `batch_size` rows kept busy; yields (prompt index, Completion) as rows finish.

    Greedy and sampling (a `Sample` strategy's knobs are shared by every row). `shape`:
    at least this many prompts, this long, to size the rows for (a resumed job's rest,
    decoded in the whole job's shapes).
    """
    for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
        loop.check_room(config, len(prompt), limit, f"prompt {i}")
        if limit > spec.buffer:
            raise ValueError(f"prompt {i}: max_new_tokens={limit} exceeds DecodeSpec.buffer={spec.buffer}")
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    p = loop.bucket(max(shape[1], *(len(x) for x in prompts)), cap=config.max_len)
    b = min(batch_size, max(shape[0], len(prompts)))
    jit_insert, jit_advance = compiled(config, spec.program(), chunk)
    params = unstack_layers(params, config)
    state = empty_rows(config, b, p + spec.buffer, spec.buffer, sampling.knobs(spec.strategy, b))
    pending = collections.deque(range(len(prompts)))
    holder: list[int | None] = [None] * b  # the prompt index each row decodes

    def fill(state, row):
        i = pending.popleft()
        prompt, length = ragged.right_pad([prompts[i]], p)
        holder[row] = i
        args = (np.int32(row), prompt, np.int32(length[0]), np.int32(row_ids[i]), np.int32(seed))
        return jit_insert(params, state, *args, np.int32(limits[i]))

    for row in range(b):
        if pending:
            state = fill(state, row)
    while any(h is not None for h in holder):
        occupied = np.array([h is not None for h in holder])
        state = jit_advance(params, state, occupied)
        finished = np.flatnonzero(np.asarray(state.done) & occupied)
        # One transfer of every row's outputs; refilling a row leaves the others' as they are.
        rows = loop.completions(*ragged.completions_of(state, spec.buffer), b) if finished.size else []
        for row in finished:
            yield holder[row], rows[row]
            holder[row] = None
            if pending:
                state = fill(state, row)
