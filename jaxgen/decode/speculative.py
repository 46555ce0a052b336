"""Speculative decoding: cheap guesses of the next k tokens, checked by one target pass.

At batch 1 a decode step reads every weight to produce one token; a forward pass over
k + 1 tokens reads them once too. Each round here (one iteration of the jitted
`lax.while_loop`):

1. a drafter proposes k tokens per row: `PromptLookup` copies what followed the latest
   earlier occurrence of the row's last n tokens (n = max_ngram .. 1) in its prompt or
   its text so far, and where none occurs, resumes the span it copied last one token
   further on (the target kept a token of its own there: an edit that swapped one token
   for another, after which the text follows its source again); `DraftModel` runs a
   small model k passes (decode/draft_model.py);
2. the target model runs once over [newest token, d_1 .. d_k] (decode/ragged.py: rows at
   their own cache slots) and gives distributions p_0 .. p_k;
3. greedy keeps the drafts that equal the target's argmax and then the target's own next
   token, so the text is plain greedy decoding's token for token. Sampling keeps d_j with
   probability min(1, p_j(d_j) / q_j(d_j)) and, at the first rejection, draws from
   normalise(max(0, p_j - q_j)) (Leviathan et al. 2023, Chen et al. 2023), so each token
   has the target's distribution; q is the draft model's distribution, or a point mass
   for prompt lookup;
4. the kept tokens (1 .. k + 1) go through the plain loop's `append`, one at a time, so
   eos, stop sequences and max lengths that fall inside a block stop a row at exactly the
   same token as plain decoding; each row's cache index moves past only what it kept.

The prefill checks drafts too (`_start`): a prompt right-padded to its bucket leaves
free slots in a pass that computes them all, and prompt lookup's guesses of how the
completion begins go there.

Every round runs the k + 1 token pass, also where prompt lookup found nothing (a row's
drafts are then the tokens from slot 0: guesses like any other). A `lax.cond` that ran a
one-token step in such rounds made XLA copy both halves of the KV cache into and out of
the cond on every round; since lookup resumes its last copy, nearly every round has
drafts (1 round in 200 had none on the edit benchmark), and without the cond a round of
the 6 x 512 edit model takes 0.4-0.9 ms less (2.8-3.0 ms against 3.5-3.8; RESULTS.md).

Processors that read the text (repetition penalty, no-repeat n-grams, banned sequences)
would need each drafted position's history and are refused.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.decode import loop, ragged, sampling
from jaxgen.decode.draft_model import draft_tokens, warped
from jaxgen.decode.lookup import lookup
from jaxgen.errors import JaxgenError
from jaxgen.model.kvcache import KVCache
from jaxgen.model.serving import ServingTransformer, unstack_layers
from jaxgen.runtime.mesh import mesh_context

MAX_SPECULATIVE_TOKENS = 16
MAX_NGRAM = 8
PREFILL_DRAFTS = 16  # at most, where a prompt's padding has room (`_start`)


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Draft by copying the continuation of the row's last n-gram from earlier text."""

    # k: tokens drafted per round. 5: a verify pass of k + 1 = 6 rows fills one 6-row register
    # tile of the CPU kernel (runtime/weight_matmul.cc), and on the edit benchmark k = 5 beat
    # k = 4 on both CPUs measured (RESULTS.md).
    num_tokens: int = 5
    max_ngram: int = 3  # longest n-gram looked up (then shorter ones)
    # The tokenizer's bos token: a prompt's leading bos is not text, so the prefill's guess
    # of a completion that restates the prompt starts after it (`_start`).
    bos_id: int | None = None


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """Draft with a smaller model of the same tokenizer (its config; params come separately)."""

    config: ModelConfig
    num_tokens: int = 4  # as measured with draft models (RESULTS.md); prompt lookup takes 5


Speculation = PromptLookup | DraftModel


def check(speculation: Speculation, spec: loop.DecodeSpec, target: ModelConfig) -> None:
    """One clear line for settings the speculative loop cannot run."""
    k = speculation.num_tokens
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise JaxgenError(f"num_speculative_tokens: {k} must be in [1, {MAX_SPECULATIVE_TOKENS}]")
    if isinstance(speculation, PromptLookup) and not 1 <= speculation.max_ngram <= MAX_NGRAM:
        raise JaxgenError(f"max_ngram: {speculation.max_ngram} must be in [1, {MAX_NGRAM}]")
    if isinstance(spec.strategy, sampling.BeamSearch):
        raise JaxgenError("speculative: beam search cannot be speculative (use greedy or sampling)")
    if sampling.uses_history(spec.processors):
        raise JaxgenError(
            "speculative: repetition_penalty, no_repeat_ngram_size and banned are not supported"
            " with speculative decoding (set speculative: none)"
        )
    if isinstance(speculation, DraftModel) and speculation.config.vocab_size != target.vocab_size:
        raise JaxgenError(
            f"draft_run: the draft model's vocabulary ({speculation.config.vocab_size}) differs from"
            f" the target's ({target.vocab_size}); the draft must share the target's tokenizer"
        )


@flax.struct.dataclass
class SpecState:
    rows: ragged.RowState
    draft_cache: KVCache | None  # the draft model's, at the same per-row slots
    resume: jax.Array  # [B] int32: where prompt lookup resumes its last copy (-1: none yet)
    passes: jax.Array  # [] target forward passes after the prefill
    # Per row (padding rows are left out of `Stats`): drafts offered while it ran, the
    # ones it kept, and the passes after the prefill that it ran in.
    drafted: jax.Array  # [B] int32
    accepted: jax.Array  # [B] int32
    row_passes: jax.Array  # [B] int32


# ----------------------------------------------------------------------------- verification


def _accept(scores, drafts, q, rows: ragged.RowState, spec: loop.DecodeSpec, offered=None):
    """Which drafts to keep and the token after them.

    Args:
        scores: the target's float32 logits [B, T, V] (T = k + 1) at [newest, d_1 .. d_k].
        drafts: [B, k]; q: the draft's distributions [B, k, V], or None (a point mass).
        offered: [B], how many of the drafts the pass saw (None: all k); the others are
            neither kept nor rejected, and the token after the offered ones comes from p.
    Returns:
        tokens [B, T] (d_1 .. d_a, then the target's token; the rest unused), their log-probs
        [B, T], and a [B]: how many drafts were kept.
    """
    b, t, _ = scores.shape
    k = t - 1
    seen = jnp.ones((b, k), bool) if offered is None else jnp.arange(k) < offered[:, None]  # [B, k]
    if isinstance(spec.strategy, sampling.Greedy):
        scores = sampling.limit_vocab(scores, spec.processors.vocab_limit)
        target = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B, T]
        kept = jnp.cumprod(seen & (drafts == target[:, :k]), axis=1).sum(axis=1)  # leading agreements
        logp = jax.nn.log_softmax(scores, axis=-1)
        return target, jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0], kept
    p = warped(scores, spec, rows.knobs)  # [B, T, V]
    if q is None:
        q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype)
    q = jnp.where(seen[..., None], q, 0.0)  # no draft where none was offered: the residual is p
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = (
        jnp.zeros((b, 0))
        if k == 0
        else jnp.stack([sampling.uniforms(rows.keys, rows.step, salt=2000 + j) for j in range(k)], axis=1)
    )
    kept = jnp.cumprod(seen & (u * q_draft < p_draft), axis=1).sum(axis=1)  # [B]
    # The token after the kept drafts: from the residual max(0, p - q) after a rejection,
    # from p itself when all k were kept (q is zero past the drafts).
    q_full = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)
    at = lambda x: jnp.take_along_axis(x, kept[:, None, None], axis=1)[:, 0]  # noqa: E731
    residual = jnp.maximum(at(p) - at(q_full), 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, at(p))
    last = sampling.inverse_cdf(residual, sampling.uniforms(rows.keys, rows.step, salt=3000))
    padded = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    tokens = jnp.where(jnp.arange(t) == kept[:, None], last[:, None], padded)
    logp = jnp.log(jnp.take_along_axis(p, tokens[..., None], axis=-1)[..., 0])
    return tokens, logp, kept


def _verify(model, params, rows: ragged.RowState, drafts, q, spec: loop.DecodeSpec):
    """One target pass over [newest token, drafts [B, k]] -> (tokens, log-probs [B, k + 1], kept, cache)."""
    inputs = jnp.concatenate([rows.last_token()[:, None], drafts], axis=1)  # [B, T]
    logits, cache = ragged.forward_rows(model, params, inputs, rows.slot - 1, rows.cache)
    tokens, logp, kept = _accept(logits.astype(jnp.float32), drafts, q, rows, spec)
    return tokens, logp, kept, cache


def _round(model, params, draft, state: SpecState, speculation: Speculation, spec: loop.DecodeSpec):
    """One draft + verify + append round."""
    rows = state.rows
    k = speculation.num_tokens
    running = ~rows.done
    if isinstance(speculation, DraftModel):
        drafts, q, draft_cache = draft_tokens(*draft, rows, state.draft_cache, k, spec)
    else:
        drafts, found, start = lookup(
            rows.tokens, rows.valid, rows.slot, k, speculation.max_ngram, state.resume
        )
        q = draft_cache = None
    tokens, logp, kept, cache = _verify(model, params, rows, drafts, q, spec)
    resume = state.resume
    if isinstance(speculation, PromptLookup):
        resume = jnp.where(running & found, _resumed(start, kept), state.resume)
    new_rows = _keep(rows, cache, tokens, logp, kept, running, spec)
    return SpecState(
        rows=new_rows,
        draft_cache=draft_cache,
        resume=resume,
        passes=state.passes + 1,
        drafted=state.drafted + jnp.where(running, k, 0),
        accepted=state.accepted + jnp.where(running, kept, 0),
        row_passes=state.row_passes + running,
    )


def _resumed(start, kept):
    # The copy went on for `kept` tokens, then the target's own token took the place of the
    # source's next one: the source resumes after that.
    return start + kept + 1


def _keep(rows: ragged.RowState, cache: KVCache, tokens, logp, kept, running, spec: loop.DecodeSpec):
    """`rows` after a pass that wrote [newest, d_1 .. ] into `cache`: the kept drafts and
    the target's token appended, each running row's cache rolled back past what it kept."""
    new_rows = rows.replace(cache=cache)
    for j in range(tokens.shape[1]):  # the plain loop's stopping rules, token by token
        new_rows = loop.append(new_rows, tokens[:, j], logp[:, j], spec.stopping, active=j <= kept)
    # Each running row's cache keeps [newest, d_1 .. d_kept]: its index moves to its slot - 1.
    index = jnp.where(running, rows.slot + kept, rows.cache.index)
    return new_rows.replace(cache=new_rows.cache.replace(index=index))


def _start(model, params, prompt, lengths, row_ids, seed, limit, knobs, speculation: Speculation, spec):
    """Prefill and the first new token; with prompt lookup the prefill also checks drafts.

    Prompts are right-padded to their bucket's width, and the prefill computes every slot
    of it: drafts placed in a row's padding (as many as fit, up to PREFILL_DRAFTS) are
    checked by that same pass, for the cost of their logits only (and only where a first
    draft is right, below). They guess how the completion begins: what followed the latest
    earlier match of the prompt's last 2 .. max_ngram tokens (a prompt that repeats
    itself), else the prompt's own text from its start (after a leading bos), since a
    rewrite, an edit or a correction restates its source. The rounds' 1-token matches are
    left out here: a prompt usually ends in a separator (a newline, a colon), and what
    followed its latest occurrence says little.
    On the edit benchmark this took the tokens per target pass from 3.69 to 4.05 and a
    prompt's call from 55.8 to 53.0 ms (k = 5; RESULTS.md, "Drafts in the prefill's
    padding").

    Returns:
        (rows, resume [B], drafts offered [B], drafts kept [B]).
    """
    k = speculation.num_tokens
    b, p = prompt.shape
    none = jnp.full((b,), -1, jnp.int32)
    d = min(PREFILL_DRAFTS, p - 1)  # drafts a row could fit; a row holds at least one prompt token
    if not isinstance(speculation, PromptLookup) or d == 0:
        rows = ragged.start_rows(model, params, prompt, lengths, row_ids, seed, limit, knobs, spec, k + 1)
        return rows, none, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32)
    valid = jnp.arange(p)[None] < lengths[:, None]
    bos = speculation.bos_id
    text = jnp.zeros((b,), jnp.int32) if bos is None else (prompt[:, 0] == bos).astype(jnp.int32)
    drafts, found, start = lookup(prompt, valid, lengths, d, speculation.max_ngram, resume=text, min_ngram=2)
    offered = jnp.clip(p - lengths, 0, d).astype(jnp.int32)  # [B]: the drafts that fit
    # Slot s of a row holds its draft s - length where that fits, else the prompt (padding).
    place = jnp.arange(p)[None] - lengths[:, None]  # [B, P]
    placed = jnp.take_along_axis(drafts, jnp.clip(place, 0, d - 1), axis=1)
    inputs = jnp.where((place >= 0) & (place < offered[:, None]), placed, prompt)
    at = jnp.minimum(lengths[:, None] - 1 + jnp.arange(d + 1), p - 1)  # [B, d + 1]: [last, d_1 .. d_d]
    cache = ragged.rows_cache(model, prompt, spec, k + 1)
    hidden, cache = ragged.prefill_rows(model, params, inputs, lengths, cache, seen=lengths + offered, at=at)
    # The head over the drafts' d slots costs what it costs whether they are kept or not
    # (GPT-2 124M, 16 drafts: a 40-token prefill 66 -> 77 ms; under this cond 70.4 against
    # 70.2 without drafts). So it runs only when some row's first draft is the target's
    # most likely first token; otherwise no draft counts as offered. Which happens depends
    # on the logits alone, not on any sampled value, so sampling still draws each token
    # from the target's distribution.
    rows = ragged.new_rows(prompt, lengths, cache, row_ids, seed, limit, knobs, spec)
    first = model.project({"params": params}, hidden[:, :1]).astype(jnp.float32)  # [B, 1, V]
    hit = jnp.any((offered > 0) & (drafts[:, 0] == jnp.argmax(first[:, 0], axis=-1)))

    def checked():
        rest = model.project({"params": params}, hidden[:, 1:]).astype(jnp.float32)  # [B, d, V]
        return _accept(jnp.concatenate([first, rest], axis=1), drafts, None, rows, spec, offered)

    def unchecked():  # the first token alone, padded to the d + 1 of `checked`
        tokens, logp, kept = _accept(first, drafts[:, :0], None, rows, spec)
        return jnp.pad(tokens, ((0, 0), (0, d))), jnp.pad(logp, ((0, 0), (0, d))), kept

    tokens, logp, kept = jax.lax.cond(hit, checked, unchecked)
    offered = jnp.where(hit, offered, 0)
    running = jnp.ones((b,), bool)
    rows = _keep(rows, cache, tokens, logp, kept, running, spec)
    resume = jnp.where(found, _resumed(start, kept), none)
    return rows, resume, offered, kept


# ----------------------------------------------------------------------------- the loop


def generate(model, params, draft, prompt, lengths, row_ids, seed, limit, knobs, speculation, spec):
    """Prefill (target and draft), then rounds until every row is done.

    Args:
        draft: (draft model, its params) for `DraftModel`, else None.
        prompt: [B, P] right-padded (ragged.right_pad); the rest as `loop.compiled`'s generate.
    Returns:
        (tokens [B, buffer], num_tokens, finish, logprob) as the plain loop, and
        (passes, drafted [B], accepted [B], row_passes [B], steps [B]): round statistics.
    """
    rows, resume, offered, kept = _start(
        model, params, prompt, lengths, row_ids, seed, limit, knobs, speculation, spec
    )
    draft_cache = None
    if draft is not None:
        draft_model, draft_params = draft
        empty = loop.new_cache(draft_model.config, *rows.cache.segment.shape)
        draft_cache = ragged.prefill_rows(draft_model, draft_params, prompt, lengths, empty)[1]
    state = SpecState(
        rows, draft_cache, resume, jnp.zeros((), jnp.int32), offered, kept, jnp.zeros_like(kept)
    )
    state = jax.lax.while_loop(
        lambda s: ~jnp.all(s.rows.done),
        lambda s: _round(model, params, draft, s, speculation, spec),
        state,
    )
    counts = (state.passes, state.drafted, state.accepted, state.row_passes, state.rows.step)
    return ragged.completions_of(state.rows, spec.buffer), counts


@functools.lru_cache(maxsize=16)
def compiled(config: ModelConfig, spec: loop.DecodeSpec, speculation: Speculation):
    """`generate(params, draft_params, prompt, lengths, row_ids, seed, limit, knobs)`, jitted
    (params in either layout; draft_params None without a draft model)."""
    model = ServingTransformer(config)
    draft_model = ServingTransformer(speculation.config) if isinstance(speculation, DraftModel) else None

    def run(params, draft_params, *args):
        params = unstack_layers(params, config)
        draft = (
            None if draft_model is None else (draft_model, unstack_layers(draft_params, draft_model.config))
        )
        return generate(model, params, draft, *args, speculation, spec)

    return loop.loop_jit(run)  # one while-loop: a single GPU graph, like plain decoding


@dataclasses.dataclass(frozen=True)
class Stats:
    """What speculative calls did; `a + b` adds up two calls' (or totals').

    Counts are over the prompts' rows (a batch's padding rows are left out), but for
    `passes`, the batch's target passes after the prefill."""

    passes: int = 0
    drafted: int = 0  # drafts offered to running rows
    accepted: int = 0  # of them kept
    tokens: int = 0  # tokens generated (eos and stop sequences included)
    row_passes: int = 0  # target passes each row ran in, its prefill included

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True))
        )

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / max(self.row_passes, 1)

    def summary(self) -> str:
        """One line for people: how much the speculation saved."""
        return (
            f"{self.tokens_per_pass:.2f} tokens per target pass, {self.acceptance:.1%} of"
            f" {self.drafted:,} drafts kept"
        )


def generate_ids(
    config, params, prompts, spec: loop.DecodeSpec, speculation: Speculation, *, max_new_tokens,
    draft_params=None, seed=0, row_ids=None, mesh=None, buckets=(),
) -> tuple[list[loop.Completion], Stats]:  # fmt: skip
    """`loop.generate_ids` decoded speculatively; also returns the round statistics."""
    check(speculation, spec, config)
    batch = loop.prepare_batch(config, spec, prompts, max_new_tokens, row_ids, mesh, buckets)
    # The plain loop's bucketed batch, its left padding moved to the right.
    rows = [row[len(row) - n :] for row, n in zip(batch.prompt, batch.lengths, strict=True)]
    prompt, lengths = ragged.right_pad(rows, batch.prompt.shape[1])
    batch = dataclasses.replace(batch, prompt=prompt, lengths=lengths)
    run = compiled(config, spec.program(), speculation)
    with mesh_context(mesh):
        out, counts = run(
            params, draft_params, *loop.device_args(batch, seed, max_new_tokens, mesh, spec.strategy)
        )
    passes, *per_row = counts
    drafted, accepted, row_passes, tokens = (int(np.sum(np.asarray(x)[: batch.count])) for x in per_row)
    stats = Stats(int(passes), drafted, accepted, tokens, row_passes + batch.count)
    return loop.completions(*out, batch.count), stats
