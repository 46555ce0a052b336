"""Beam search inside one jitted loop, with Hugging Face's (transformers 5.x) semantics.

Each step mirrors HF's vectorised `_beam_search`:

1. log-softmax of each running beam's logits, then the processors (on log-probs, as HF),
   plus the beam's running score;
2. the top K = max(2, 1 + #eos) * num_beams continuations over all beams and tokens;
3. continuations that hit a stopping criterion (eos, a stop sequence, the length limit)
   leave the running set; the best `num_beams` others keep running;
4. among the top `num_beams` continuations, the finished ones compete with the kept
   finished beams on score = sum of log-probs / generated_len ** length_penalty
   (generated_len counts the eos token), unless the row is full and early_stopping is
   True, or the early-stop heuristic says no improvement is possible;
5. the search ends when no row can improve, when early_stopping is True and every row
   has num_beams finished beams, or when every continuation hit a stopping criterion.

Beams of one prompt are adjacent rows of the model batch ([B * num_beams, ...]); the KV
cache is reordered by each step's source beams with one gather along its batch axis.
The model runs in the serving layout (jaxgen/model/serving.py), as in jaxgen/decode/loop.py.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.decode import sampling
from jaxgen.decode.loop import (
    EOS,
    FINISH_REASONS,
    LENGTH,
    STOP,
    Completion,
    DecodeSpec,
    decode_step,
    device_args,
    mesh_context,
    new_cache,
    prefill,
    prepare_batch,
)
from jaxgen.model.kvcache import KVCache
from jaxgen.model.serving import ServingTransformer, unstack_layers

NEG = -1.0e9  # HF's "impossible" score


@flax.struct.dataclass
class BeamState:
    running: jax.Array  # [B, N, S] running beams' tokens (prompt left-padded, then generated)
    running_scores: jax.Array  # [B, N] sum of processed log-probs
    seqs: jax.Array  # [B, N, S] finished beams, best first
    scores: jax.Array  # [B, N] finished beams' length-penalised scores
    seq_len: jax.Array  # [B, N] generated tokens of each finished beam (eos / stop included)
    seq_reason: jax.Array  # [B, N] finish code of each finished beam
    finished: jax.Array  # [B, N] bool: that finished slot holds a sequence
    improvable: jax.Array  # [B] bool: HF's early-stop heuristic is not yet satisfied
    all_hit: jax.Array  # [] bool: every continuation of the last step hit a stopping criterion
    logits: jax.Array  # [B * N, V] float32 next-token logits of the running beams
    cache: KVCache  # batch B * N
    prompt_valid: jax.Array  # [B, S] bool: real prompt slots
    prompt_lengths: jax.Array  # [B]
    step: jax.Array  # [] tokens generated so far
    limit: jax.Array  # [] max new tokens
    prompt_len: int = flax.struct.field(pytree_node=False)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, M, ...] gathered along axis 1 by idx [B, K] -> [B, K, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _text_valid(state: BeamState, end) -> jax.Array:
    """[B, S] real text before slot `end`: the prompt plus the generated slots."""
    slots = jnp.arange(state.prompt_valid.shape[1])[None]
    return state.prompt_valid | ((slots >= state.prompt_len) & (slots < end))


def _candidates(state: BeamState, beam: sampling.BeamSearch, processors, k: int):
    """Steps 1-2: the top-k continuations -> (log-probs [B, K], source beam [B, K], seqs [B, K, S])."""
    b, n, s = state.running.shape
    end = state.prompt_len + state.step
    valid = jnp.repeat(_text_valid(state, end), n, axis=0)  # [B*N, S]
    log_probs = jax.nn.log_softmax(state.logits, axis=-1)
    log_probs = sampling.process(log_probs, state.running.reshape(b * n, s), valid, end, processors)
    v = log_probs.shape[-1]
    log_probs = log_probs.reshape(b, n, v) + state.running_scores[:, :, None]
    top_lp, top_idx = jax.lax.top_k(log_probs.reshape(b, n * v), k)  # [B, K]
    src = top_idx // v
    seqs = _gather(state.running, src)
    seqs = jax.lax.dynamic_update_slice(seqs, (top_idx % v)[:, :, None].astype(jnp.int32), (0, 0, end))
    return top_lp, src, seqs


def _hits(state: BeamState, seqs: jax.Array, stopping: sampling.Stopping):
    """Step 3's stopping criteria for candidates [B, K, S] -> (hit [B, K], code [B, K], dropped [B, K])."""
    b, k, s = seqs.shape
    end = state.prompt_len + state.step + 1
    token = seqs[:, :, end - 1]
    eos = jnp.isin(token, jnp.asarray(stopping.eos_ids or (-1,), jnp.int32))
    code = jnp.where(eos, EOS, 0)
    dropped = jnp.zeros((b, k), jnp.int32)  # stop-sequence tokens removed from the completion
    flat = seqs.reshape(b * k, s)
    valid = jnp.repeat(_text_valid(state, end), k, axis=0)
    for seq in stopping.stop:
        hit = sampling.ends_with(flat, valid, end, seq).reshape(b, k) & (code == 0)
        code, dropped = jnp.where(hit, STOP, code), jnp.where(hit, len(seq), dropped)
    code = jnp.where((code == 0) & (state.step + 1 >= state.limit), LENGTH, code)
    return code != 0, code, dropped


def _select(state: BeamState, beam: sampling.BeamSearch, stopping, processors) -> BeamState:
    """One HF beam step on the current logits (steps 1-5 of the module docstring)."""
    n = beam.num_beams
    k = max(2, 1 + len(stopping.eos_ids)) * n
    top_lp, src, seqs = _candidates(state, beam, processors, k)
    hit, code, dropped = _hits(state, seqs, stopping)

    # Running beams: the best continuations that did not stop.
    run_lp = top_lp + hit * NEG
    keep = jax.lax.top_k(run_lp, n)[1]
    running, running_scores, running_src = _gather(seqs, keep), _gather(run_lp, keep), _gather(src, keep)

    # Finished beams: only the top `n` continuations may finish (the rest are spares).
    just = hit & (jnp.arange(k) < n)[None]
    length = (state.step + 1).astype(jnp.float32)
    score = top_lp / length**beam.length_penalty
    full = jnp.all(state.finished, axis=-1, keepdims=True) & (beam.early_stopping is True)
    score = score + full * NEG + (~state.improvable[:, None]) * NEG + (~just) * NEG
    merged = (
        jnp.concatenate([state.seqs, seqs], axis=1),
        jnp.concatenate([state.scores, score], axis=1),
        jnp.concatenate([state.seq_len, jnp.broadcast_to(state.step + 1 - dropped, dropped.shape)], axis=1),
        jnp.concatenate([state.seq_reason, code], axis=1),
        jnp.concatenate([state.finished, just], axis=1),
    )
    best = jax.lax.top_k(merged[1], n)[1]
    seqs, scores, seq_len, seq_reason, finished = (_gather(x, best) for x in merged)

    step = state.step + 1
    improvable = state.improvable & _may_improve(running_scores, scores, finished, step, state.limit, beam)
    return state.replace(
        running=running, running_scores=running_scores, seqs=seqs, scores=scores, seq_len=seq_len,
        seq_reason=seq_reason, finished=finished, improvable=improvable, all_hit=jnp.all(hit), step=step,
        cache=_reorder(state.cache, running_src),
    )  # fmt: skip


def _may_improve(running_scores, scores, finished, step, limit, beam: sampling.BeamSearch) -> jax.Array:
    """HF's early-stop heuristic: can the best running beam still beat a finished one? -> [B]."""
    if beam.early_stopping == "never" and beam.length_penalty > 0:
        best_len = limit  # a positive penalty favours the longest possible continuation
    else:
        best_len = step
    best_running = running_scores[:, :1] / best_len.astype(jnp.float32) ** beam.length_penalty
    worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    return jnp.any(best_running > worst_finished, axis=-1)


def _reorder(cache: KVCache, src: jax.Array) -> KVCache:
    """Moves each running beam's cache rows to follow its source beam (src [B, N])."""
    b, n = src.shape
    rows = (src + jnp.arange(b)[:, None] * n).reshape(-1)  # [B*N] source row per new row
    return cache.replace(k=cache.k[:, rows], v=cache.v[:, rows], segment=cache.segment[rows])


def _init(model, params, prompt, lengths, limit, spec: DecodeSpec) -> BeamState:
    b, p = prompt.shape
    n, s = spec.strategy.num_beams, p + spec.buffer
    logits, cache = prefill(model, params, prompt, lengths, new_cache(model.config, b, s))
    # All beams start as copies of the prompt; only beam 0 counts at first (score 0 vs -1e9).
    cache = _reorder(cache, jnp.zeros((b, n), jnp.int32))
    running = jnp.zeros((b, n, s), jnp.int32).at[:, :, :p].set(prompt[:, None])
    return BeamState(
        running=running,
        running_scores=jnp.zeros((b, n)).at[:, 1:].set(NEG),
        seqs=running,
        scores=jnp.full((b, n), NEG),
        seq_len=jnp.zeros((b, n), jnp.int32),
        seq_reason=jnp.zeros((b, n), jnp.int32),
        finished=jnp.zeros((b, n), bool),
        improvable=jnp.ones((b,), bool),
        all_hit=jnp.zeros((), bool),
        logits=jnp.repeat(logits, n, axis=0),
        cache=cache,
        prompt_valid=jnp.arange(s)[None] >= (p - lengths)[:, None],
        prompt_lengths=lengths,
        step=jnp.zeros((), jnp.int32),
        limit=jnp.minimum(limit, spec.buffer).astype(jnp.int32),
        prompt_len=p,
    )


def search(model, params, prompt, lengths, limit, spec: DecodeSpec) -> BeamState:
    """The whole beam search: prefill, then HF beam steps until it stops."""
    beam = spec.strategy

    def cond(s: BeamState):
        open_beams = ~(jnp.all(s.finished) & (beam.early_stopping is True))
        return jnp.any(s.improvable) & open_beams & ~s.all_hit & (s.step < s.limit)

    def body(s: BeamState):
        s = _select(s, beam, spec.stopping, spec.processors)
        # Feed the running beams' new tokens; after the final step this call is wasted
        # work (one step in `limit`), kept so the loop body has a single shape.
        b, n, _ = s.running.shape
        last = jax.lax.dynamic_index_in_dim(s.running, s.prompt_len + s.step - 1, axis=2, keepdims=False)
        positions = jnp.repeat(s.prompt_lengths, n) + s.step - 1
        logits, cache = decode_step(model, params, last.reshape(b * n), positions, s.cache)
        return s.replace(logits=logits, cache=cache)

    return jax.lax.while_loop(cond, body, _init(model, params, prompt, lengths, limit, spec))


@functools.lru_cache(maxsize=32)
def compiled(config, spec: DecodeSpec):
    """`run(params, prompt, lengths, limit) -> (seqs [B, R, buffer], scores, lengths, reasons [B, R])`.

    `params` in either layout (stacked ones are unstacked inside, once, before the loop).
    """
    model = ServingTransformer(config)
    r = spec.strategy.num_return_sequences

    def run(params, prompt, lengths, limit):
        s = search(model, unstack_layers(params, config), prompt, lengths, limit, spec)
        return s.seqs[:, :r, s.prompt_len :], s.scores[:, :r], s.seq_len[:, :r], s.seq_reason[:, :r]

    return jax.jit(run)


def beam_ids(
    config, params, prompts, spec: DecodeSpec, *, max_new_tokens, mesh=None, buckets=()
) -> list[list[Completion]]:
    """Beam search for token-id prompts; per prompt, `num_return_sequences` completions, best first.

    Completion tokens exclude a final eos token and a stop sequence; `score` is HF's
    `sequences_scores` (eos included in the length, as HF counts it).
    """
    batch = prepare_batch(config, spec, prompts, max_new_tokens, None, mesh, buckets)
    with mesh_context(mesh):
        prompt, lengths, _, _, limit, _ = device_args(batch, 0, max_new_tokens, mesh, spec.strategy)
        seqs, scores, seq_len, reasons = (
            np.asarray(x) for x in compiled(config, spec)(params, prompt, lengths, limit)
        )
    results = []
    for i in range(batch.count):
        row = []
        for j in range(seqs.shape[1]):
            kept = int(seq_len[i, j]) - int(reasons[i, j] == EOS)
            row.append(
                Completion(seqs[i, j, :kept].tolist(), FINISH_REASONS[reasons[i, j]], float(scores[i, j]))
            )
        results.append(row)
    return results
