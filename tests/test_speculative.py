"""Speculative decoding (decode/speculative.py): greedy is plain greedy token for token;
sampling keeps the target's distribution; bad settings are one clear line."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import GenerateConfig
from jaxgen.decode import loop, request, sampling
from jaxgen.decode import speculative as sp
from jaxgen.errors import JaxgenError
from jaxgen.model.transformer import init_params

# Ragged on purpose; rows 0 and 2 repeat themselves so prompt lookup finds matches.
PROMPTS = [[5, 17, 9, 33, 2, 101, 7, 5, 17, 9], [44], [250, 3, 8, 61, 250, 3], [12, 12, 90]]
MAX_NEW = 21  # odd: the length limit falls inside a drafted block


def _params(cfg, seed):
    """Params x4, so greedy text of the random model is not one repeated token."""
    return jax.tree.map(lambda x: x * 4.0, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, tiny_config, tiny_llama_config):
    cfg = (tiny_config if request.param == "gpt2" else tiny_llama_config).model
    return cfg, _params(cfg, 1)


def _stopping(cfg, params):
    """A stop sequence (row 0) and an eos (row 2) from the plain greedy text, so that both fire
    mid-text, the eos chosen to leave rows 1 and 3 running to the length limit."""
    free = [
        r.tokens
        for r in loop.generate_ids(cfg, params, PROMPTS, loop.DecodeSpec(buffer=32), max_new_tokens=MAX_NEW)
    ]
    stop = tuple(free[0][6:8])
    eos = next(t for t in free[2][5:] if t not in free[0][:8] + free[1] + free[3])
    return sampling.Stopping(eos_ids=(eos,), stop=(stop,))


def _speculations(cfg, params):
    draft_cfg = cfg.model_copy(update={"num_layers": 1})
    return [
        (sp.PromptLookup(1, 1), None),
        (sp.PromptLookup(4, 3), None),
        (sp.DraftModel(cfg, 3), params),  # the model as its own draft: every draft is kept
        (sp.DraftModel(draft_cfg, 4), _params(draft_cfg, 2)),  # an unrelated draft: most are rejected
    ]


def test_greedy_speculative_equals_plain_greedy(family):
    cfg, params = family
    spec = loop.DecodeSpec(sampling.Greedy(), stopping=_stopping(cfg, params), buffer=32)
    plain = loop.generate_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW)
    assert [c.finish_reason for c in plain] == ["stop", "length", "eos", "length"]
    for speculation, draft_params in _speculations(cfg, params):
        rows, stats = sp.generate_ids(
            cfg, params, PROMPTS, spec, speculation, max_new_tokens=MAX_NEW, draft_params=draft_params
        )
        assert [(r.tokens, r.finish_reason) for r in rows] == [(r.tokens, r.finish_reason) for r in plain]
        np.testing.assert_allclose([r.score for r in rows], [r.score for r in plain], rtol=1e-5, atol=1e-5)
        if isinstance(speculation, sp.DraftModel) and speculation.config == cfg:
            assert stats.acceptance == 1.0, stats


def test_prompts_narrower_than_the_longest_ngram(tiny_config):
    # Alone, a 2-token prompt pads to a bucket of 2: the prefill's lookup for drafts had
    # no 3-gram start slot there and failed (a max over no slots) before it was bounded.
    cfg = tiny_config.model
    params = _params(cfg, 1)
    spec = loop.DecodeSpec(buffer=32)
    for prompt in ([44], [44, 7], [44, 7, 44]):
        plain = loop.generate_ids(cfg, params, [prompt], spec, max_new_tokens=9)
        rows, _ = sp.generate_ids(cfg, params, [prompt], spec, sp.PromptLookup(4, 3), max_new_tokens=9)
        assert [r.tokens for r in rows] == [r.tokens for r in plain]


def test_self_draft_keeps_every_token_and_saves_passes(tiny_config):
    cfg = tiny_config.model
    params = _params(cfg, 1)
    spec = loop.DecodeSpec(buffer=32)
    [row], stats = sp.generate_ids(
        cfg, params, [PROMPTS[0]], spec, sp.DraftModel(cfg, 4), max_new_tokens=26, draft_params=params
    )
    assert len(row.tokens) == 26
    # The prefill gives token 1; each pass then keeps 4 drafts + 1 target token.
    assert stats.passes == 5 and stats.tokens_per_pass == 26 / 6


def test_prompt_lookup_copies_the_prompt():
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 1, 2, 0, 0, 0], [7, 8, 9, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    end = jnp.asarray([7, 3])
    valid = jnp.arange(10)[None] < end[:, None]
    drafts, found, start = sp.lookup(tokens, valid, end, 3, 2)
    # Row 0 ends "1 2", seen at slot 0: its continuation is "3 4 5". Row 1 repeats nothing.
    assert found.tolist() == [True, False]
    assert drafts[0].tolist() == [3, 4, 5] and int(start[0]) == 2


def test_prompt_lookup_resumes_its_copy_past_a_swapped_token():
    # A source "10 11 12 13 14 15", then the copy "10 11" and a token of the target's own
    # (99, in the place of 12), which occurs nowhere before: no n-gram matches, and the
    # copy resumes after the swapped token, at slot 3 ("13 14 15").
    tokens = jnp.asarray([[10, 11, 12, 13, 14, 15, 10, 11, 99, 0, 0, 0]], jnp.int32)
    end = jnp.asarray([9])
    valid = jnp.arange(12)[None] < end[:, None]
    drafts, found, _ = sp.lookup(tokens, valid, end, 3, 3)
    assert found.tolist() == [False]
    drafts, found, start = sp.lookup(tokens, valid, end, 3, 3, resume=jnp.asarray([3]))
    assert found.tolist() == [True] and drafts[0].tolist() == [13, 14, 15] and int(start[0]) == 3
    # A match wins over resuming; a slot past the text resumes nothing.
    drafts, _, _ = sp.lookup(tokens, valid, jnp.asarray([8]), 3, 3, resume=jnp.asarray([4]))
    assert drafts[0].tolist() == [12, 13, 14]
    _, found, _ = sp.lookup(tokens, valid, end, 3, 3, resume=jnp.asarray([9]))
    assert found.tolist() == [False]


class _ScriptedModel:
    """A stand-in target whose greedy next token after slot p is script[p + 1], whatever
    the cache holds: the rounds of a known text can then be counted."""

    def __init__(self, config, script):
        self.config = config
        self.script = jnp.asarray(script + [0] * config.max_len, jnp.int32)

    def project(self, variables, hidden):
        return hidden  # `apply`'s "hidden states" are its logits already

    def apply(self, variables, inputs, positions, segment, cache=None, logits_at=None, return_hidden=False):
        if logits_at is not None:
            at = logits_at if logits_at.ndim == 2 else logits_at[:, None]
            positions = jnp.take_along_axis(positions, at, axis=1)
        return jax.nn.one_hot(self.script[positions + 1], self.config.vocab_size) * 9.0, cache


def _scripted_passes(cfg, prompt, completion, k, padding=0, bos_id=None, drafted=False):
    model = _ScriptedModel(cfg, prompt + completion)
    spec = loop.DecodeSpec(buffer=32, stopping=sampling.Stopping(eos_ids=(3,)))
    args = (  # prompt (with `padding` free slots after it), lengths, row ids, seed, max new tokens
        jnp.asarray([prompt + [0] * padding], jnp.int32),
        jnp.asarray([len(prompt)], jnp.int32),
        jnp.zeros((1,), jnp.int32),
        0,
        32,
    )
    knobs = sampling.knobs(spec.strategy, 1)
    (tokens, num, _, _), (passes, offered, *_) = jax.jit(
        lambda: sp.generate(model, None, None, *args, knobs, sp.PromptLookup(k, 3, bos_id), spec)
    )()
    assert tokens[0, : int(num[0])].tolist() == completion[:-1]  # the eos ends the text
    return (int(passes), int(offered[0])) if drafted else int(passes)  # one row


def test_prompt_lookup_rounds_resume_the_copy_after_a_swapped_token(tiny_config):
    # The target copies its prompt's passage 10 .. 25 but writes 99 in the place of 12.
    # Prefill: 10. Round 1: "10" drafts 11 12 13 14, keeps 11, then 99. Round 2: nothing
    # matches "99"; the copy resumes past 12: 13 14 15 16 kept, then 17. Round 3: "15 16
    # 17" drafts 18 19 20 21, all kept, then 22. Round 4: 23 24 25 and the prompt's 1 are
    # drafted, 23 24 25 kept, then eos. Without resuming, round 2 drafts from slot 0 and
    # keeps only the target's 13, and round 3 copies 14 .. 17: five passes, not four.
    source = list(range(10, 26))
    prompt = [2, *source, 1]
    completion = [10, 11, 99, *source[3:], 3]
    assert _scripted_passes(tiny_config.model, prompt, completion, 4) == 4


def test_prefill_checks_drafts_of_the_prompts_text_in_its_padding(tiny_config):
    # The same text, the prompt now in a bucket with 16 free slots and starting with bos
    # (2). The prefill drafts the prompt's text from after the bos (10 11 12 ..), keeps 10
    # 11, then 99. Round 1 resumes past 12: 13 .. 16 kept, then 17; round 2: 18 .. 21, then
    # 22; round 3: 23 24 25, then eos. Drafting from the bos instead (no bos_id given), the
    # prefill keeps nothing and the rounds are those of the test above.
    source = list(range(10, 26))
    prompt = [2, *source, 1]
    completion = [10, 11, 99, *source[3:], 3]
    assert _scripted_passes(tiny_config.model, prompt, completion, 4, padding=16, bos_id=2) == 3
    # The bos drafted first is not the target's first token: the drafts' logits are never
    # computed, and none of the 16 that fit counts as offered (4 rounds of 4 drafts).
    assert _scripted_passes(tiny_config.model, prompt, completion, 4, padding=16, drafted=True) == (4, 16)


def test_prefill_drafts_kept_leave_the_cache_as_plain_decoding_does(tiny_config, monkeypatch):
    """Every draft right (an oracle drafter): the prefill keeps all that fit in the bucket's
    padding, and the rounds after it decode from that cache to plain greedy's very ids."""
    cfg = tiny_config.model
    params = _params(cfg, 1)
    spec = loop.DecodeSpec(buffer=32)
    prompt, n = [5, 6, 7], 20
    plain = loop.generate_ids(cfg, params, [prompt], spec, max_new_tokens=n)[0].tokens
    text = jnp.asarray([prompt + plain + [0] * 64], jnp.int32)

    def oracle(tokens, valid, end, k, max_ngram, resume=None, min_ngram=1):
        drafts = jnp.take_along_axis(text, end[:, None] + jnp.arange(k), axis=1)
        return drafts, jnp.ones(end.shape, bool), end

    monkeypatch.setattr(sp, "lookup", oracle)
    rows, stats = sp.generate_ids(
        cfg, params, [prompt], spec, sp.PromptLookup(4, 3), max_new_tokens=n, buckets=(16,)
    )
    assert rows[0].tokens == plain
    # The prefill keeps the 13 drafts its padding holds and adds a token: 14 of 20; the
    # other 6 take 2 rounds of up to 5. Without the prefill's drafts: 19 in 4 rounds.
    assert (stats.passes, stats.drafted, stats.accepted) == (2, 13 + 8, 13 + 5)


def _accept_rows(b, v, seed):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(b))
    knobs = sampling.knobs(sampling.Sample(1.0), b)
    return types.SimpleNamespace(keys=keys, step=jnp.zeros((b,), jnp.int32), knobs=knobs)


@pytest.mark.parametrize(
    "point_mass, offered",
    [(False, None), (True, None), (True, 0)],
    ids=["draft_model", "prompt_lookup", "prompt_lookup_not_offered"],
)
def test_sampled_tokens_follow_the_target_distribution(point_mass, offered):
    """The first token of a round (draft kept or resampled) is distributed as softmax(target),
    also where the draft was not offered (it did not fit in a prefill's padding)."""
    b, v = 40000, 5
    p_logits = jnp.log(jnp.asarray([0.05, 0.4, 0.3, 0.15, 0.1]))
    q = jnp.asarray([0.5, 0.1, 0.1, 0.2, 0.1])
    rows = _accept_rows(b, v, 0)
    u = jax.random.uniform(jax.random.key(1), (b,))
    drafts = (
        jnp.full((b, 1), 0, jnp.int32)
        if point_mass
        else sampling.inverse_cdf(jnp.tile(q, (b, 1)), u)[:, None]
    )
    qs = None if point_mass else jnp.tile(q, (b, 1, 1))
    scores = jnp.tile(p_logits, (b, 2, 1))  # [B, k + 1 = 2, V]
    spec = loop.DecodeSpec(sampling.Sample(1.0))
    tokens, logp, kept = sp._accept(
        scores, drafts, qs, rows, spec, None if offered is None else jnp.zeros(b, jnp.int32)
    )
    freq = np.bincount(np.asarray(tokens[:, 0]), minlength=v) / b
    # 40,000 draws: the standard error of each frequency is <= 0.0025; 4.5 sigma.
    np.testing.assert_allclose(freq, np.exp(p_logits), atol=0.0115)
    np.testing.assert_allclose(np.exp(logp[:, 0]), np.exp(p_logits)[np.asarray(tokens[:, 0])], rtol=1e-5)
    if point_mass:  # token 0 is kept with probability p(0) = 0.05, or never if not offered
        assert abs(float(jnp.mean(kept)) - (0.05 if offered is None else 0.0)) < 0.005


def test_sampled_speculative_decoding_runs_and_is_reproducible(llama):
    cfg, params = llama
    spec = loop.DecodeSpec(sampling.Sample(0.9, top_k=50), buffer=16)
    kw = dict(max_new_tokens=12, seed=3, draft_params=params)
    a, stats = sp.generate_ids(cfg, params, PROMPTS, spec, sp.DraftModel(cfg, 3), **kw)
    b, _ = sp.generate_ids(cfg, params, PROMPTS, spec, sp.DraftModel(cfg, 3), **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    # The model drafting for itself samples each draft from q = p at that position, so the
    # rejection rule keeps every one (a q from the wrong slot would reject most).
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    assert all(len(r.tokens) == 12 and all(0 <= t < cfg.vocab_size for t in r.tokens) for r in a)


@pytest.fixture(scope="module")
def llama(tiny_llama_config):
    cfg = tiny_llama_config.model
    return cfg, _params(cfg, 1)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(speculative="prompt_lookup", num_beams=2), "speculative: beam search cannot be speculative"),
        (dict(speculative="prompt_lookup", repetition_penalty=1.2), "speculative: repetition_penalty,"),
        (dict(speculative="draft"), "speculative: draft needs draft_run"),
        (
            dict(speculative="prompt_lookup", num_speculative_tokens=0),
            "num_speculative_tokens: 0 Input should",
        ),
        (
            dict(speculative="prompt_lookup", max_ngram=9),
            "max_ngram: 9 Input should be less than or equal to 8",
        ),
        (dict(speculative="sometimes"), "speculative: 'sometimes' Input should be 'none', 'prompt_lookup'"),
    ],
)
def test_bad_settings_are_one_line(tiny_config, options, message):
    with pytest.raises(JaxgenError, match="^" + message.replace("(", r"\(")):
        request.resolve(GenerateConfig(), tiny_config.model, None, **options)


def test_draft_with_another_vocabulary_is_refused(tiny_config):
    cfg = tiny_config.model
    other = cfg.model_copy(update={"vocab_size": cfg.vocab_size * 2})
    with pytest.raises(JaxgenError, match=r"^draft_run: the draft model's vocabulary \(1024\) differs"):
        request.resolve(GenerateConfig(), cfg, None, other, speculative="draft")


def test_drafted_tokens_default_by_mode(tiny_config):
    # Prompt lookup drafts 5 (a 6-row verify pass fills the CPU kernel's register tile), a
    # draft model 4 (what was measured with one); a set value holds for either.
    cfg = tiny_config.model
    assert request._speculation(GenerateConfig(speculative="prompt_lookup"), None).num_tokens == 5
    assert request._speculation(GenerateConfig(speculative="draft"), cfg).num_tokens == 4
    for mode in ("prompt_lookup", "draft"):
        opts = GenerateConfig(speculative=mode, num_speculative_tokens=7)
        assert request._speculation(opts, cfg).num_tokens == 7


def test_stats_add_up_over_calls():
    # Two calls of one row: 9 tokens in 2 passes + the prefill, 7 in 3 + the prefill.
    total = sp.Stats(2, drafted=8, accepted=6, tokens=9, row_passes=3) + sp.Stats(3, 8, 4, 7, 4)
    assert total == sp.Stats(passes=5, drafted=16, accepted=10, tokens=16, row_passes=7)
    assert total.tokens_per_pass == 16 / 7 and total.acceptance == 10 / 16
    assert total.summary() == "2.29 tokens per target pass, 62.5% of 16 drafts kept"
    assert sp.Stats().summary() == "0.00 tokens per target pass, 0.0% of 0 drafts kept"
