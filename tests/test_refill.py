"""Continuous refill (decode/refill.py): each prompt gets exactly the completion decoding it
alone gives, whatever rows it shared the batch with and when it entered."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxgen.decode import loop, refill, sampling
from jaxgen.model.transformer import init_params


@pytest.fixture(scope="module")
def llama(tiny_llama_config):
    cfg = tiny_llama_config.model
    params = jax.tree.map(lambda x: x * 4.0, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1)))
    return cfg, params


@pytest.mark.parametrize(
    "strategy", [sampling.Greedy(), sampling.Sample(0.8, top_k=40)], ids=["greedy", "sample"]
)
def test_every_prompt_gets_its_own_completion(llama, strategy):
    cfg, params = llama
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 500, int(rng.integers(1, 12))).tolist() for _ in range(11)]
    limits = rng.integers(2, 30, 11).tolist()  # 15x apart: rows finish at very different steps
    alone = [
        loop.generate_ids(cfg, params, [p], loop.DecodeSpec(strategy, buffer=32), max_new_tokens=n, seed=5,
                          row_ids=[i])[0]
        for i, (p, n) in enumerate(zip(prompts, limits, strict=True))
    ]  # fmt: skip
    stop = tuple(alone[0].tokens[3:5])  # fires mid-text in row 0, perhaps elsewhere too
    spec = loop.DecodeSpec(strategy, stopping=sampling.Stopping(stop=(stop,)), buffer=32)
    want = [
        loop.generate_ids(cfg, params, [p], spec, max_new_tokens=n, seed=5, row_ids=[i])[0]
        for i, (p, n) in enumerate(zip(prompts, limits, strict=True))
    ]
    got = list(refill.refill_ids(cfg, params, prompts, limits, spec, batch_size=4, seed=5, chunk=8))
    assert sorted(i for i, _ in got) == list(range(11))  # each prompt exactly once
    assert [i for i, _ in got] != list(range(11))  # short ones overtook long ones
    got = dict(got)
    assert want[0].finish_reason == "stop"
    for i, w in enumerate(want):
        assert (got[i].tokens, got[i].finish_reason) == (w.tokens, w.finish_reason), i
        np.testing.assert_allclose(got[i].score, w.score, rtol=1e-5, atol=1e-5)
