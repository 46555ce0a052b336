"""Beam search == exhaustive search on a tiny vocabulary and short length."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.decode import beam, sampling
from jaxgen.decode.loop import DecodeSpec
from jaxgen.model.transformer import Transformer, init_params

V, NEW = 5, 3
EOS = 4
PROMPTS = [[1, 2, 3, 0, 2], [3]]


@pytest.fixture(scope="module")
def model(tiny_config):
    cfg = tiny_config.model.model_copy(update={"vocab_size": V})
    params = jax.tree.map(lambda x: x * 4.0, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(3)))
    return cfg, params


@functools.lru_cache
def _log_probs_fn(cfg):
    transformer = Transformer(cfg)

    @jax.jit
    def run(params, tokens):  # right-padded rows [B, T]
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return jax.nn.log_softmax(transformer.apply({"params": params}, tokens, positions)[0], axis=-1)

    return run


def _exhaustive(cfg, params, prompt, eos, length_penalty):
    """Every completion of up to NEW tokens (ending at eos or at NEW) with HF's score, best first."""
    seqs = [c[: c.index(eos) + 1] if eos in c else c for c in itertools.product(range(V), repeat=NEW)]
    seqs = sorted(set(seqs))
    rows = np.zeros((len(seqs), 16), np.int32)
    for i, s in enumerate(seqs):
        rows[i, : len(prompt) + len(s)] = list(prompt) + list(s)
    lp = np.asarray(_log_probs_fn(cfg)(params, rows))
    out = []
    for i, s in enumerate(seqs):
        total = sum(lp[i, len(prompt) - 1 + t, tok] for t, tok in enumerate(s))
        out.append((total / len(s) ** length_penalty, [t for t in s if t != eos]))
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize(
    "eos, length_penalty, early_stopping",
    [(None, 1.0, True), (EOS, 1.0, "never"), (EOS, 0.0, False)],
    ids=["no-eos", "eos-lp1-never", "eos-lp0"],
)
def test_beam_search_equals_exhaustive_search(model, eos, length_penalty, early_stopping):
    cfg, params = model
    # num_beams = V ** NEW: every prefix fits, so beam search is exact (HF's heuristics included).
    strategy = sampling.BeamSearch(V**NEW, 4, length_penalty, early_stopping)
    stopping = sampling.Stopping(eos_ids=() if eos is None else (eos,))
    spec = DecodeSpec(strategy=strategy, stopping=stopping, buffer=4)
    got = beam.beam_ids(cfg, params, PROMPTS, spec, max_new_tokens=NEW)
    for prompt, completions in zip(PROMPTS, got, strict=True):
        want = _exhaustive(cfg, params, prompt, eos, length_penalty)[:4]
        assert [c.tokens for c in completions] == [w[1] for w in want]
        np.testing.assert_allclose([c.score for c in completions], [w[0] for w in want], atol=1e-5, rtol=0)
    if eos is not None:  # the test only means something if eos is sometimes chosen
        assert any(c.finish_reason == "eos" for row in got for c in row)


def test_hf_setting_scores_are_mean_log_probs(model):
    """num_beams 4, 2 returned, length_penalty 1, early stopping, no eos: score = sum / new tokens."""
    cfg, params = model
    spec = DecodeSpec(strategy=sampling.BeamSearch(4, 2, 1.0, True), buffer=4)
    got = beam.beam_ids(cfg, params, PROMPTS, spec, max_new_tokens=NEW)
    for prompt, completions in zip(PROMPTS, got, strict=True):
        for c in completions:
            rows = np.zeros((1, 16), np.int32)
            rows[0, : len(prompt) + NEW] = list(prompt) + c.tokens
            lp = np.asarray(_log_probs_fn(cfg)(params, rows))[0]
            total = sum(lp[len(prompt) - 1 + t, tok] for t, tok in enumerate(c.tokens))
            assert c.finish_reason == "length" and len(c.tokens) == NEW
            assert abs(c.score - total / NEW) < 1e-5
        assert completions[0].score >= completions[1].score
