"""Decoding strategies (small frozen dataclasses) and logits processors (pure functions).

A strategy is chosen once per `generate` call and shapes the jitted loop, so nothing is
decided per token on the host. Which warpers run (and top-k's k) is static; a sampling
strategy's float settings (temperature, top-p, min-p) enter the loop as per-row arrays
(`SampleKnobs`), so changing them reuses the compiled loop (a new loop costs seconds at
GPT-2 size). Processors follow Hugging Face's semantics so outputs can be
compared with it:

- repetition penalty: a token already in the prompt or the generated text has its
  score divided by the penalty when positive and multiplied when negative;
- no-repeat n-gram: a token that would complete an n-gram already present is banned;
- banned sequences: the last token of a banned sequence is banned when the text ends
  with the rest of it (single-token sequences are always banned);
- top-p keeps the smallest set of most probable tokens whose mass reaches p;
- min-p drops tokens whose probability is below `min_p` times the top probability.

Histories are the token buffer `tokens [B, S]` with `valid [B, S]` marking real
tokens. In the plain loop every row's text ends at the same slot `end` (left padding),
so "the last n tokens" is one slice for the whole batch; rows that advance separately
(decode/ragged.py) pass one `end` per row and read it with a gather.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import GenerateConfig
from jaxgen.errors import JaxgenError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most probable token (after the processors)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """Ancestral sampling with the usual warpers, applied in Hugging Face's order."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """Hugging Face beam search: score = sum of log-probs / generated_len ** length_penalty."""

    num_beams: int = 4
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (as in Hugging Face)


Strategy = Greedy | Sample | BeamSearch

# A filter's value in a strategy's program form (`program`): any value in (0, 1) marks
# the filter as on; the loop reads the actual value from its SampleKnobs.
_ON = 0.5


@flax.struct.dataclass
class SampleKnobs:
    """A sampling strategy's float settings, one per row: inputs of the compiled loop."""

    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32


def knobs(strategy: Strategy, batch: int) -> SampleKnobs:
    """The settings of `strategy` for `batch` rows (neutral values for non-sampling ones)."""
    s = strategy if isinstance(strategy, Sample) else Sample()
    return SampleKnobs(*(np.full((batch,), v, np.float32) for v in (s.temperature, s.top_p, s.min_p)))


def program(strategy: Strategy) -> Strategy:
    """`strategy` as its compiled loop sees it: which warpers run, not their values.

    Strategies that differ only in temperature, top-p or min-p values share one program.
    """
    if not isinstance(strategy, Sample):
        return strategy
    return Sample(
        temperature=1.0,  # always divided by: x / 1.0 == x exactly
        top_k=strategy.top_k,
        top_p=_ON if strategy.top_p < 1.0 else 1.0,
        min_p=_ON if strategy.min_p > 0.0 else 0.0,
    )


@dataclasses.dataclass(frozen=True)
class Processors:
    """Score processors applied before the strategy picks tokens."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    banned: tuple[tuple[int, ...], ...] = ()  # token sequences that must not be produced
    # Ids >= this are never produced: the model's vocab is the tokenizer's rounded up
    # (padding ids the tokenizer cannot decode). None: every id is allowed.
    vocab_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class Stopping:
    """Per-row stopping: any of `eos_ids`, or the text ending with a `stop` sequence."""

    eos_ids: tuple[int, ...] = ()
    stop: tuple[tuple[int, ...], ...] = ()


def make_strategy(opts: GenerateConfig) -> Strategy:
    """The strategy validated options describe (ranges are the schema's: config/schema.py).

    `num_return_sequences` is not part of it: beams carry it (one search returns them),
    samples are separate rows of the batch (decode/request.py: `sequence_key`).

    Raises:
        JaxgenError: for several greedy sequences (the schema cannot tell greedy from sampling).
    """
    if opts.num_return_sequences > 1 and opts.num_beams == 1 and opts.temperature == 0:
        raise JaxgenError(
            f"num_return_sequences: {opts.num_return_sequences} greedy sequences would all be equal"
            " (sample with temperature > 0, or search with num_beams > 1)"
        )
    if opts.num_beams > 1:
        return BeamSearch(
            opts.num_beams, opts.num_return_sequences, float(opts.length_penalty), opts.early_stopping
        )
    if opts.temperature == 0:
        return Greedy()
    return Sample(float(opts.temperature), int(opts.top_k), float(opts.top_p), float(opts.min_p))


def check_processors(processors: Processors, vocab_size: int) -> None:
    if not processors.repetition_penalty > 0:
        raise JaxgenError(f"repetition_penalty: {processors.repetition_penalty} must be > 0")
    if processors.no_repeat_ngram_size < 0:
        raise JaxgenError(f"no_repeat_ngram_size: {processors.no_repeat_ngram_size} must be >= 0")
    for seq in processors.banned:
        if not seq or not all(0 <= t < vocab_size for t in seq):
            raise JaxgenError(f"banned: token sequence {list(seq)} is empty or outside the vocabulary")


# ----------------------------------------------------------------------------- processors


def last_tokens(tokens: jax.Array, valid: jax.Array, end: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The last `n` slots before `end` ([] or one per row [B]): tokens [B, n] and whether
    all of them are real [B]."""
    b = tokens.shape[0]
    start = end - n
    safe = jnp.maximum(start, 0)  # n > end only early in short rows: masked by `ok`
    if jnp.ndim(end) == 0:
        last = jax.lax.dynamic_slice(tokens, (0, safe), (b, n))
        real = jax.lax.dynamic_slice(valid, (0, safe), (b, n))
    else:
        slots = safe[:, None] + jnp.arange(n)  # [B, n]
        last = jnp.take_along_axis(tokens, slots, axis=1)
        real = jnp.take_along_axis(valid, slots, axis=1)
    return last, jnp.all(real, axis=-1) & (start >= 0)


def before(width: int, end: jax.Array) -> jax.Array:
    """[1 or B, width] bool: slots before `end` ([] or [B])."""
    return jnp.arange(width)[None] < jnp.reshape(end, (-1, 1))


def ends_with(tokens: jax.Array, valid: jax.Array, end: jax.Array, seq: tuple[int, ...]) -> jax.Array:
    """[B] bool: the text before slot `end` ends with the token sequence `seq`."""
    last, ok = last_tokens(tokens, valid, end, len(seq))
    return ok & jnp.all(last == jnp.asarray(seq, jnp.int32)[None], axis=-1)


def repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's penalty on every token in `seen [B, V]`: positive / penalty, negative * penalty."""
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalised, scores)


def seen_tokens(tokens: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: which vocabulary entries occur among the real tokens of each row."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    return jnp.zeros((tokens.shape[0], vocab_size), bool).at[rows, tokens].max(valid)


def no_repeat_ngram_banned(tokens: jax.Array, valid: jax.Array, end: jax.Array, n: int, vocab_size: int):
    """[B, V] bool: tokens that would repeat an n-gram already in the row's text.

    An n-gram starting at slot j is (tokens[j .. j+n-1]); it bans tokens[j+n-1] when its
    first n-1 tokens equal the row's last n-1 tokens and all n slots are real text.
    """
    b, s = tokens.shape
    if n == 1:  # every token already present is banned (HF: the empty prefix always matches)
        return seen_tokens(tokens, valid & before(s, end), vocab_size)
    prefix, prefix_ok = last_tokens(tokens, valid, end, n - 1)  # [B, n-1]
    width = s - n + 1  # number of n-gram start slots
    match = prefix_ok[:, None] & before(width, end - n + 1)  # [B, W]
    for i in range(n):  # n is small and static
        match &= valid[:, i : i + width]
        if i < n - 1:
            match &= tokens[:, i : i + width] == prefix[:, i : i + 1]
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, vocab_size), bool).at[rows, tokens[:, n - 1 :]].max(match)


def banned_sequences(tokens: jax.Array, valid: jax.Array, end: jax.Array, banned, vocab_size: int):
    """[B, V] bool: last tokens of banned sequences whose prefix ends the row's text."""
    mask = jnp.zeros((tokens.shape[0], vocab_size), bool)
    for seq in banned:
        hit = jnp.ones(tokens.shape[0], bool) if len(seq) == 1 else ends_with(tokens, valid, end, seq[:-1])
        mask = mask.at[:, seq[-1]].set(mask[:, seq[-1]] | hit)
    return mask


def limit_vocab(scores: jax.Array, limit: int | None) -> jax.Array:
    """Scores [..., V] with ids >= `limit` (the tokenizer's padding ids) at -inf."""
    v = scores.shape[-1]
    if limit is None or limit >= v:
        return scores
    return jnp.where(jnp.arange(v) >= limit, NEG_INF, scores)


def uses_history(processors: Processors) -> bool:
    """Whether any processor reads the text so far (all but the vocabulary limit do)."""
    return (
        processors.repetition_penalty != 1.0 or processors.no_repeat_ngram_size > 0 or bool(processors.banned)
    )


def process(scores, tokens, valid, end, processors: Processors) -> jax.Array:
    """Applies the processors to `scores [B, V]` given the history before slot `end`."""
    v = scores.shape[-1]
    scores = limit_vocab(scores, processors.vocab_limit)
    if processors.repetition_penalty != 1.0:
        seen = seen_tokens(tokens, valid & before(tokens.shape[1], end), v)
        scores = repetition_penalty(scores, seen, processors.repetition_penalty)
    if processors.no_repeat_ngram_size > 0:
        banned = no_repeat_ngram_banned(tokens, valid, end, processors.no_repeat_ngram_size, v)
        scores = jnp.where(banned, NEG_INF, scores)
    if processors.banned:
        scores = jnp.where(banned_sequences(tokens, valid, end, processors.banned, v), NEG_INF, scores)
    return scores


# ----------------------------------------------------------------------------- warpers


def top_k_filter(scores: jax.Array, k: int) -> jax.Array:
    # The k-th largest as the min of the top k: XLA rewrote `top_k(...)[0][:, -1:]` (the
    # last value alone) into a full sort of the vocabulary (~50x slower on CPU at 50k).
    kth = jnp.min(jax.lax.top_k(scores, k)[0], axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(scores < kth, NEG_INF, scores)


def top_p_filter(scores: jax.Array, p: float | jax.Array) -> jax.Array:
    """Keeps the smallest set of most probable tokens whose probability mass reaches `p`
    (a number, or one per row: [B, 1]).

    A token is kept when the mass of the tokens ranked above it is still below p; ties
    are ranked by token id, so exactly one such set is kept (at least one token).

    Without sorting the vocabulary (a stable argsort of 50k scores cost ~16 ms per step
    on CPU): with `above(t)` the mass of the tokens more probable than t, a token of
    probability q is kept when above(q) < p (plus the ties ranked before it), so the
    least probable kept token has the smallest probability c with above(c) < p, found by
    bisection over float32 bit patterns (ordered like the values for q >= 0).
    """
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # [B, V]

    def above(level):  # [B, 1] float32 -> [B, 1]: mass strictly above the level
        return jnp.sum(jnp.where(probs > level, probs, 0.0), axis=-1, keepdims=True)

    def halve(_, bounds):  # invariant: above(level(hi)) < p; the answer lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = above(jax.lax.bitcast_convert_type(mid, jnp.float32)) < p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    top = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1, keepdims=True), jnp.int32)
    _, cut = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(top), top))  # 31 halvings reach 1
    cut = jax.lax.bitcast_convert_type(cut, jnp.float32)  # [B, 1] least kept probability
    # Tokens tied at the cut: the j-th (by id) has above(cut) + j * cut ranked before it.
    tie = jnp.where(probs == cut, probs, 0.0)
    tied_before = jnp.cumsum(tie, axis=-1) - tie
    keep = (probs > cut) | ((probs == cut) & (above(cut) + tied_before < p))
    return jnp.where(keep, scores, NEG_INF)


def min_p_filter(scores: jax.Array, min_p: float | jax.Array) -> jax.Array:  # min_p: number or [B, 1]
    probs = jax.nn.softmax(scores, axis=-1)
    threshold = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, NEG_INF, scores)


def warp(scores: jax.Array, strategy: Sample, knobs: SampleKnobs) -> jax.Array:
    """Temperature, top-k, top-p, min-p: Hugging Face's warper order.

    `strategy` says which warpers run (its program form will do); `knobs` their values.
    """
    scores = scores / knobs.temperature[:, None]
    if strategy.top_k > 0:
        scores = top_k_filter(scores, min(strategy.top_k, scores.shape[-1]))
    if strategy.top_p < 1.0:
        scores = top_p_filter(scores, knobs.top_p[:, None])
    if strategy.min_p > 0.0:
        scores = min_p_filter(scores, knobs.min_p[:, None])
    return scores


def row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
    """[B] PRNG keys that depend only on the seed and each row's identity (its prompt id),
    so a row samples the same text whatever else shares its batch."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(row_ids)


def choose(
    scores: jax.Array, strategy: Greedy | Sample, knobs: SampleKnobs, keys: jax.Array, step: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row from processed float32 scores [B, V].

    Returns:
        tokens [B] int32, and each token's float32 log-probability [B] under the distribution
        it was drawn from: softmax of the processed scores, warped when sampling (Hugging
        Face's `compute_transition_scores(..., normalize_logits=True)` of its processed
        `scores`). Greedy ignores the warpers, so its log-probabilities are the processed
        model's.
    """
    if isinstance(strategy, Greedy):
        token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    else:
        scores = warp(scores, strategy, knobs)
        token = sample(scores, keys, step)
    chosen = jnp.take_along_axis(scores, token[:, None], axis=-1)[:, 0]
    return token, chosen - jax.nn.logsumexp(scores, axis=-1)


def sample(scores: jax.Array, keys: jax.Array, step: jax.Array) -> jax.Array:
    """One token per row from softmax(scores [B, V]) by inverting its CDF -> [B] int32.

    One uniform per row (from the row's key and the step, [] or [B]) where
    `jax.random.categorical` draws V Gumbel variables: 3 ms of random bits per row and
    step on CPU at V = 50k.
    """
    return inverse_cdf(jax.nn.softmax(scores.astype(jnp.float32), axis=-1), uniforms(keys, step))


def uniforms(keys: jax.Array, step: jax.Array, salt: int | None = None) -> jax.Array:
    """[B] uniforms in [0, 1) from each row's key and its step ([] or [B]); `salt` draws
    another independent set for the same step."""

    def one(key, t):
        key = jax.random.fold_in(key, t)
        return jax.random.uniform(key if salt is None else jax.random.fold_in(key, salt))

    return jax.vmap(one)(keys, jnp.broadcast_to(step, keys.shape))


def inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """The token whose CDF interval holds `u` [B] under (unnormalised) `probs` [B, V] -> [B] int32.

    Tokens of probability zero (masked: -inf) are never drawn: the CDF does not rise there.
    """
    cdf = jnp.cumsum(probs, axis=-1)  # [B, V]
    return jnp.argmax(cdf > u[:, None] * cdf[:, -1:], axis=-1).astype(jnp.int32)
