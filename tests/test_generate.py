"""Decoding loop: cached decoding == full forward, greedy == argmax of the full forward,
sampling limits, row independence, stopping, streaming, sharded == single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import GenerateConfig, MeshConfig
from jaxgen.decode import loop as gen
from jaxgen.decode import sampling
from jaxgen.model.transformer import Transformer, abstract_variables, init_params
from jaxgen.runtime.mesh import activate, make_mesh, param_shardings

PROMPTS = [[5, 17, 9, 33, 2, 101, 7], [44], [250, 3, 8, 61], [12, 12, 90]]  # ragged on purpose
MAX_NEW = 12


def _scaled_params(cfg, seed=1):
    """Params x4, so greedy text of the random model is not one repeated token."""
    return jax.tree.map(lambda x: x * 4.0, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, tiny_config, tiny_llama_config):
    """(model config, params) per family."""
    cfg = (tiny_config if request.param == "gpt2" else tiny_llama_config).model
    return cfg, _scaled_params(cfg)


@pytest.fixture(scope="module")
def llama(tiny_llama_config):
    """One family is enough for what does not depend on the architecture."""
    cfg = tiny_llama_config.model
    return cfg, _scaled_params(cfg)


@functools.lru_cache
def _full_forward(cfg):
    model = Transformer(cfg)

    @jax.jit
    def run(params, tokens):  # right-padded [B, T]: causal attention ignores the padding after
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.apply({"params": params}, tokens, positions)[0].astype(jnp.float32)

    return run


def _right_padded(rows, width):
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_prefill_then_decode_equals_full_forward(family):
    # The fixture's params as initialised (logits ~0.5): the x4 params give logits ~9, where
    # the full forward alone already differs by 3e-5 between batch shapes (float32 matmul
    # blocking), which would measure XLA's rounding rather than the cache.
    cfg, params = family
    params = jax.tree.map(lambda x: x / 4.0, params)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    steps = 5
    cont = rng.integers(0, cfg.vocab_size, (len(PROMPTS), steps)).astype(np.int32)
    batch = gen.make_batch(PROMPTS, range(len(PROMPTS)))
    cache = gen.init_cache(cfg, batch.prompt.shape[0], batch.prompt.shape[1] + steps)
    prefill = jax.jit(functools.partial(gen.prefill, model))
    decode_step = jax.jit(functools.partial(gen.decode_step, model))
    logits, cache = prefill(params, batch.prompt, batch.lengths, cache)
    got = [logits[: len(PROMPTS)]]
    for t in range(steps):
        tok = np.zeros(batch.prompt.shape[0], np.int32)
        tok[: len(PROMPTS)] = cont[:, t]
        logits, cache = decode_step(params, tok, batch.lengths + t, cache)
        got.append(logits[: len(PROMPTS)])
    got = np.stack(got, axis=1)  # [B, steps + 1, V]

    full_rows = [list(p) + list(c) for p, c in zip(PROMPTS, cont, strict=True)]
    full = np.asarray(_full_forward(cfg)(params, _right_padded(full_rows, 16)))
    want = np.stack([full[i, len(p) - 1 : len(p) + steps] for i, p in enumerate(PROMPTS)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _greedy_reference(cfg, params, prompts, n):
    rows = [list(p) for p in prompts]
    run = _full_forward(cfg)
    for _ in range(n):
        logits = np.asarray(run(params, _right_padded(rows, 32)))
        for i, r in enumerate(rows):
            r.append(int(np.argmax(logits[i, len(r) - 1])))
    return [r[len(p) :] for r, p in zip(rows, prompts, strict=True)]


def test_greedy_equals_repeated_full_forward_argmax(family):
    cfg, params = family
    out = gen.generate_ids(cfg, params, PROMPTS, gen.DecodeSpec(buffer=16), max_new_tokens=MAX_NEW)
    want = _greedy_reference(cfg, params, PROMPTS, MAX_NEW)
    assert [c.tokens for c in out] == want
    assert all(c.finish_reason == "length" for c in out)
    assert all(len(set(w)) > 2 for w in want)  # the test model does not just repeat one token


@pytest.mark.parametrize(
    "strategy",
    [
        sampling.Sample(temperature=1e-7),
        sampling.Sample(temperature=0.8, top_k=1),
        sampling.Sample(top_p=1e-6),
    ],
    ids=["temperature->0", "top_k=1", "top_p->0"],
)
def test_limits_of_sampling_equal_greedy(llama, strategy):
    cfg, params = llama
    greedy = gen.generate_ids(cfg, params, PROMPTS, gen.DecodeSpec(buffer=16), max_new_tokens=MAX_NEW)
    spec = gen.DecodeSpec(strategy=strategy, buffer=16)
    sampled = gen.generate_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW, seed=3)
    assert [c.tokens for c in sampled] == [c.tokens for c in greedy]


def test_sampling_values_share_one_compiled_loop(llama):
    cfg, params = llama
    a = gen.DecodeSpec(strategy=sampling.Sample(temperature=0.7, top_p=0.9, min_p=0.05), buffer=16)
    b = gen.DecodeSpec(strategy=sampling.Sample(temperature=1.6, top_p=0.6, min_p=0.01), buffer=16)
    whole = gen.compiled(cfg, a)[0]
    assert gen.compiled(cfg, b)[0] is whole

    def run(spec):
        out = gen.generate_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW, seed=5)
        return [c.tokens for c in out]

    first = run(a)
    programs = whole._cache_size()
    assert run(b) != first  # b's values reached the loop
    assert run(a) == first
    assert whole._cache_size() == programs  # and neither call compiled again


def test_temperature_zero_is_greedy():
    assert sampling.make_strategy(GenerateConfig(temperature=0.0)) == sampling.Greedy()


def test_row_output_independent_of_batch_composition(llama):
    cfg, params = llama
    spec = gen.DecodeSpec(strategy=sampling.Sample(temperature=1.0, top_k=40), buffer=16)
    a = gen.generate_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW, seed=7, row_ids=[10, 11, 12, 13])
    others = [PROMPTS[0], [400, 401, 402, 403, 404], [1], [99, 98]]
    b = gen.generate_ids(cfg, params, others, spec, max_new_tokens=MAX_NEW, seed=7, row_ids=[10, 21, 22, 23])
    assert a[0].tokens == b[0].tokens
    assert a[1].tokens != b[1].tokens  # different rows do sample different text
    c = gen.generate_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW, seed=8, row_ids=[10, 11, 12, 13])
    assert a[0].tokens != c[0].tokens  # and the seed matters


def test_eos_and_stop_sequences_end_rows_with_their_reason(llama):
    cfg, params = llama
    free = gen.generate_ids(cfg, params, PROMPTS, gen.DecodeSpec(buffer=16), max_new_tokens=MAX_NEW)
    row0 = free[0].tokens
    eos = row0[3]
    first = row0.index(eos)
    stop = tuple(row0[5:7])
    stopping = sampling.Stopping(eos_ids=(eos,), stop=(stop,))
    out = gen.generate_ids(
        cfg, params, PROMPTS, gen.DecodeSpec(stopping=stopping, buffer=16), max_new_tokens=MAX_NEW
    )
    assert out[0].tokens == row0[:first] and out[0].finish_reason == "eos"
    stopping = sampling.Stopping(stop=(stop,))
    out = gen.generate_ids(
        cfg, params, PROMPTS, gen.DecodeSpec(stopping=stopping, buffer=16), max_new_tokens=MAX_NEW
    )
    where = next(i for i in range(len(row0)) if tuple(row0[i : i + 2]) == stop)
    assert out[0].tokens == row0[:where] and out[0].finish_reason == "stop"
    short = gen.generate_ids(cfg, params, PROMPTS, gen.DecodeSpec(buffer=16), max_new_tokens=3)
    assert [c.tokens for c in short] == [c.tokens[:3] for c in free]


def _drain(stream) -> tuple[list[list[int]], list, int]:
    """Runs a stream_ids generator: (each row's pieces joined, the final Completions, chunks)."""
    pieces, chunks = None, 0
    try:
        while True:
            new = next(stream)
            pieces = [[] for _ in new] if pieces is None else pieces
            for i, tokens in enumerate(new):
                pieces[i] += tokens
            chunks += 1
    except StopIteration as stop:
        return pieces, stop.value, chunks


def test_streaming_chunks_equal_whole_generation(llama):
    cfg, params = llama
    spec = gen.DecodeSpec(strategy=sampling.Sample(top_k=50), buffer=16)
    whole = gen.generate_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW, seed=1)
    stream = gen.stream_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW, chunk=5, seed=1)
    pieces, final, chunks = _drain(stream)
    assert chunks == 4  # first token, then 5 + 5 + 1 steps
    assert pieces == [c.tokens for c in whole] == [c.tokens for c in final]


def test_streaming_never_shows_a_stop_sequence(llama):
    cfg, params = llama
    free = gen.generate_ids(cfg, params, PROMPTS, gen.DecodeSpec(buffer=16), max_new_tokens=MAX_NEW)
    row0 = free[0].tokens
    stop = tuple(row0[5:8])  # three tokens: the first two are held back until the third decides
    spec = gen.DecodeSpec(stopping=sampling.Stopping(stop=(stop,)), buffer=16)
    pieces, final, _ = _drain(gen.stream_ids(cfg, params, PROMPTS, spec, max_new_tokens=MAX_NEW, chunk=1))
    where = next(i for i in range(len(row0)) if tuple(row0[i : i + 3]) == stop)
    assert final[0].tokens == row0[:where] and final[0].finish_reason == "stop"
    assert pieces == [c.tokens for c in final]


def test_sharded_generation_equals_single_device(llama):
    cfg, params = llama
    specs = [gen.DecodeSpec(strategy=sampling.Sample(top_k=50), buffer=16)]
    single = [gen.generate_ids(cfg, params, PROMPTS, s, max_new_tokens=MAX_NEW, seed=4) for s in specs]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with activate(mesh):
        shardings = param_shardings(mesh, abstract_variables(cfg))["params"]
    sharded_params = jax.device_put(params, shardings)
    sharded = [
        gen.generate_ids(cfg, sharded_params, PROMPTS, s, max_new_tokens=MAX_NEW, seed=4, mesh=mesh)
        for s in specs
    ]
    assert [[c.tokens for c in out] for out in sharded] == [[c.tokens for c in out] for out in single]


def test_bucket_sizes():
    assert [gen.bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert gen.bucket(5, (8, 32)) == 8 and gen.bucket(9, (8, 32)) == 32 and gen.bucket(40, (8, 32)) == 64
    assert gen.bucket(50, cap=60) == 60


def test_empty_prompt_and_overflow_are_user_errors(tiny_config):
    from jaxgen.errors import JaxgenError

    cfg = tiny_config.model
    params = None  # both errors are raised before the model runs
    with pytest.raises(JaxgenError, match="prompt 1: empty"):
        gen.generate_ids(cfg, params, [[1], []], gen.DecodeSpec(), max_new_tokens=4)
    with pytest.raises(JaxgenError, match="max_len=64"):
        gen.generate_ids(cfg, params, [[1] * 60], gen.DecodeSpec(), max_new_tokens=8)
