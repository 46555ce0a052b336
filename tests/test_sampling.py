"""Logits processors and warpers against brute-force references (no model involved)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import GenerateConfig
from jaxgen.decode import request, sampling
from jaxgen.errors import JaxgenError

V = 12


def _history(rows, width=10):
    """Left-pads token lists into (tokens [B, S], valid [B, S]) ending at slot `width`."""
    tokens = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = r
        valid[i, width - len(r) :] = True
    return jnp.asarray(tokens), jnp.asarray(valid), jnp.int32(width)


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    rng = np.random.default_rng(0)
    for _ in range(40):
        logits = rng.normal(size=(1, 8)) * 2
        probs = np.exp(logits) / np.exp(logits).sum()
        p = rng.uniform(0.05, 0.99)
        order = np.argsort(-probs[0])
        cum = np.cumsum(probs[0][order])
        if np.min(np.abs(cum - p)) < 1e-4:  # too close to a boundary for float32
            continue
        want = set(order[: int(np.searchsorted(cum, p) + 1)].tolist())
        # brute force: no smaller set of tokens has mass >= p
        smaller = len(want) - 1
        assert smaller == 0 or max(sum(c) for c in itertools.combinations(probs[0], smaller)) < p
        kept = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits, jnp.float32), p)))[0]
        assert set(np.flatnonzero(kept).tolist()) == want


def _top_p_reference(probs: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """Kept mask by the rank rule (stable sort: ties by id) and the margin to the boundary."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order], dtype=np.float64) - probs[order]
    kept = np.zeros(probs.shape, bool)
    kept[order[before < p]] = True
    return kept, float(np.min(np.abs(before - p)))


def test_top_p_with_ties_and_a_large_vocabulary_matches_the_rank_rule():
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(30):
        # Logits rounded to a coarse grid: many exact ties, some of them at the cut.
        logits = np.round(rng.normal(size=(3, 4096)) * (0.5 + trial / 10), 1).astype(np.float32)
        logits[0, :100] = -np.inf  # masked tokens are never kept
        p = float(rng.uniform(0.05, 0.98))
        got = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits), p)))
        for row, kept_row in zip(logits, got, strict=True):
            probs = np.asarray(jax.nn.softmax(jnp.asarray(row)))
            want, margin = _top_p_reference(probs, p)
            if margin < 1e-5:  # float32 sums in another order may round across p
                continue
            np.testing.assert_array_equal(kept_row, want)
            checked += 1
    assert checked > 60


def test_top_p_breaks_ties_by_token_id():
    logits = jnp.zeros((1, 10))  # ten tokens of probability 0.1
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.25)))[0]
    assert kept.tolist() == [True] * 3 + [False] * 7  # mass before the third is 0.2 < 0.25


def test_top_k_and_min_p():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    assert np.isfinite(sampling.top_k_filter(logits, 2)).tolist() == [[True, True, False, False, False]]
    # min_p = 0.2: threshold 0.08 of the top probability 0.4
    assert np.isfinite(sampling.min_p_filter(logits, 0.2)).tolist() == [[True, True, True, False, False]]


def test_warp_applies_each_rows_own_settings():
    logits = jax.random.normal(jax.random.key(0), (3, 64))
    rows = [(0.5, 0.9, 0.1), (1.0, 0.6, 0.02), (2.0, 0.95, 0.01)]  # (temperature, top_p, min_p)
    knobs = sampling.SampleKnobs(*(np.array(col, np.float32) for col in zip(*rows, strict=True)))
    program = sampling.program(sampling.Sample(top_k=20, top_p=0.9, min_p=0.1))
    got = np.asarray(sampling.warp(logits, program, knobs))
    for i, (temperature, top_p, min_p) in enumerate(rows):  # the filters one by one, scalar settings
        want = sampling.top_k_filter(logits[i : i + 1] / temperature, 20)
        want = sampling.min_p_filter(sampling.top_p_filter(want, top_p), min_p)
        np.testing.assert_array_equal(got[i : i + 1], np.asarray(want))
    assert len({int(np.isfinite(row).sum()) for row in got}) == 3  # the rows' settings did differ


def test_program_keeps_which_filters_run_and_drops_their_values():
    a = sampling.Sample(temperature=0.7, top_k=5, top_p=0.9)
    assert sampling.program(a) == sampling.program(sampling.Sample(temperature=1.3, top_k=5, top_p=0.5))
    assert sampling.program(a) != sampling.program(sampling.Sample(temperature=0.7, top_k=5))  # top-p off
    assert sampling.program(a) != sampling.program(sampling.Sample(temperature=0.7, top_k=6, top_p=0.9))
    assert sampling.program(a) != sampling.program(dataclasses.replace(a, min_p=0.1))
    assert sampling.program(sampling.Greedy()) == sampling.Greedy()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    scores = jnp.asarray([[2.0, -2.0, 1.0, -1.0]])
    tokens, valid, end = _history([[0, 1]], width=3)
    seen = sampling.seen_tokens(tokens, valid, 4)
    out = sampling.process(scores, tokens, valid, end, sampling.Processors(repetition_penalty=2.0))
    assert seen.tolist() == [[True, True, False, False]]
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def _ngram_reference(row, n):
    """Hugging Face's rule: tokens that follow an earlier occurrence of the last n-1 tokens."""
    if len(row) + 1 < n:
        return set()
    prefix = tuple(row[len(row) - n + 1 :])
    return {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i : i + n - 1]) == prefix}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_reference(n):
    rng = np.random.default_rng(n)
    rows = [list(rng.integers(0, 4, size=k)) for k in (9, 5, 2, 1)]
    tokens, valid, end = _history(rows)
    banned = np.asarray(sampling.no_repeat_ngram_banned(tokens, valid, end, n, V))
    for i, row in enumerate(rows):
        assert set(np.flatnonzero(banned[i]).tolist()) == _ngram_reference(row, n), (row, n)


def test_banned_sequences():
    tokens, valid, end = _history([[4, 5, 6], [4, 6], [7]])
    banned = ((9,), (5, 6, 2), (6, 3))
    mask = np.asarray(sampling.banned_sequences(tokens, valid, end, banned, V))
    assert [set(np.flatnonzero(m).tolist()) for m in mask] == [{9, 2, 3}, {9, 3}, {9}]


def test_ends_with_ignores_padding():
    tokens, valid, end = _history([[1, 2], [0, 1, 2]], width=4)
    assert sampling.ends_with(tokens, valid, end, (0, 1, 2)).tolist() == [False, True]


def test_row_keys_depend_only_on_seed_and_row_id():
    a = sampling.row_keys(jnp.int32(3), jnp.asarray([7, 8]))
    b = sampling.row_keys(jnp.int32(3), jnp.asarray([9, 7]))
    assert (jax.random.key_data(a[0]) == jax.random.key_data(b[1])).all()
    assert not (jax.random.key_data(a[0]) == jax.random.key_data(a[1])).all()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2, temperature=0.0), "greedy sequences would all be equal"),
    ],
)
def test_invalid_sampling_options_are_user_errors(options, message):
    with pytest.raises(JaxgenError, match=message):
        sampling.make_strategy(request.validate(GenerateConfig(), **options))


def test_make_strategy_picks_the_strategy():
    def make(**options):
        return sampling.make_strategy(GenerateConfig(**options))

    assert make(temperature=0) == sampling.Greedy()
    assert make(top_k=5) == sampling.Sample(top_k=5)
    assert make(num_beams=3, num_return_sequences=2) == sampling.BeamSearch(3, 2)


def test_sample_draws_from_the_softmax():
    probs = np.array([0.5, 0.0, 0.25, 0.125, 0.0625, 0.0625])
    scores = jnp.log(jnp.asarray(np.tile(probs, (4, 1)), jnp.float32))  # log(0) = -inf: masked
    keys = sampling.row_keys(jnp.int32(0), jnp.arange(4))
    n = 4000
    draws = np.asarray(jax.jit(jax.vmap(lambda step: sampling.sample(scores, keys, step)))(jnp.arange(n)))
    counts = np.bincount(draws.ravel(), minlength=len(probs))
    assert counts[1] == 0  # probability zero: never drawn
    expected = probs * draws.size
    # Each count within 5 standard deviations of its expectation (binomial).
    np.testing.assert_array_less(np.abs(counts - expected), 5 * np.sqrt(expected * (1 - probs)) + 1e-9)
    # The rows (different keys) draw different sequences.
    assert len({tuple(draws[:50, r]) for r in range(4)}) == 4
