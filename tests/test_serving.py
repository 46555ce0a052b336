"""The serving layout: unstacked params through `apply_unstacked` == stacked `Transformer.apply`
(both families; no cache, prefill into a cache, decode steps; ragged left-padded rows)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import MeshConfig
from jaxgen.decode import loop as gen
from jaxgen.model import serving
from jaxgen.model.transformer import Transformer, abstract_variables, init_params
from jaxgen.runtime.mesh import activate, make_mesh, param_shardings

PROMPTS = [[5, 17, 9, 33, 2, 101, 7], [44], [250, 3, 8, 61]]  # ragged: left-padded to 8
STEPS = 3


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, tiny_config, tiny_llama_config):
    """(model config, stacked params, serving params) per family."""
    cfg = (tiny_config if request.param == "gpt2" else tiny_llama_config).model
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(3))
    return cfg, params, serving.unstack_layers(params, cfg)


@functools.lru_cache
def _runners(cfg):
    """Jitted (stacked, unstacked) applies with the same arguments."""
    model = Transformer(cfg)

    def stacked(params, tokens, positions, segment_ids, cache, return_hidden):
        return model.apply(
            {"params": params}, tokens, positions, segment_ids, cache, return_hidden=return_hidden
        )

    def unstacked(params, tokens, positions, segment_ids, cache, return_hidden):
        return serving.apply_unstacked(
            cfg, params, tokens, positions, segment_ids, cache, return_hidden=return_hidden
        )

    return tuple(jax.jit(f, static_argnums=5) for f in (stacked, unstacked))


def _close(got, want):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=0), got, want)


def test_unstack_layers_splits_the_layer_axis(family):
    cfg, params, unstacked = family
    assert serving.is_unstacked(unstacked) and not serving.is_unstacked(params)
    assert len(unstacked["layers"]) == cfg.num_layers
    for i, layer in enumerate(unstacked["layers"]):
        jax.tree.map(lambda s, u, i=i: np.testing.assert_array_equal(s[i], u), params["layers"], layer)
    assert unstacked["embed"]["embedding"] is params["embed"]["embedding"]  # only the layers are copied
    assert serving.unstack_layers(unstacked, cfg) is unstacked


@pytest.mark.parametrize("return_hidden", [False, True], ids=["logits", "hidden"])
def test_no_cache_equals_stacked_apply(family, return_hidden):
    cfg, params, unstacked = family
    stacked, apply = _runners(cfg)
    batch = gen.make_batch(PROMPTS, range(len(PROMPTS)))
    b, p = batch.prompt.shape
    segment = (np.arange(p)[None] >= (p - batch.lengths)[:, None]).astype(np.int32)  # 0 = left padding
    positions = np.maximum(np.arange(p)[None] - (p - batch.lengths)[:, None], 0).astype(np.int32)
    want = stacked(params, batch.prompt, positions, segment, None, return_hidden)
    _close(apply(unstacked, batch.prompt, positions, segment, None, return_hidden), want)
    _close(apply(params, batch.prompt, positions, segment, None, return_hidden), want)  # stacked input too


def test_prefill_and_decode_with_cache_equal_stacked_apply(family):
    cfg, params, unstacked = family
    stacked, apply = _runners(cfg)
    batch = gen.make_batch(PROMPTS, range(len(PROMPTS)))
    b, p = batch.prompt.shape
    segment = (np.arange(p)[None] >= (p - batch.lengths)[:, None]).astype(np.int32)
    positions = np.maximum(np.arange(p)[None] - (p - batch.lengths)[:, None], 0).astype(np.int32)
    empty = gen.init_cache(cfg, b, p + STEPS)
    (want, want_cache), (got, cache) = (
        run(w, batch.prompt, positions, segment, empty, False)
        for run, w in ((stacked, params), (apply, unstacked))
    )
    _close((got, cache), (want, want_cache))
    assert float(jnp.max(jnp.abs(want_cache.k))) > 0  # the prefill did write the cache
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, STEPS)).astype(np.int32)
    for t in range(STEPS):
        step = (tokens[:, t : t + 1], (batch.lengths + t)[:, None], np.ones((b, 1), np.int32))
        want, want_cache = stacked(params, *step, want_cache, False)
        got, cache = apply(unstacked, *step, cache, False)
        _close((got, cache), (want, want_cache))
    assert int(cache.index) == p + STEPS


def test_logits_at_one_position_per_row_equal_the_full_logits_there(family):
    """A prefill's head over each row's last position only (`logits_at`) gives exactly
    those rows of the full [B, T, V] logits, stacked and unstacked."""
    cfg, params, unstacked = family
    batch = gen.make_batch(PROMPTS, range(len(PROMPTS)))
    b, p = batch.prompt.shape
    positions = np.broadcast_to(np.arange(p, dtype=np.int32), (b, p))
    at = ((np.arange(b) * 3 + 2) % p).astype(np.int32)  # a different position per row
    full, _ = Transformer(cfg).apply({"params": params}, batch.prompt, positions)
    want = np.asarray(full)[np.arange(b), at][:, None]
    got, _ = Transformer(cfg).apply({"params": params}, batch.prompt, positions, logits_at=jnp.asarray(at))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    got, _ = serving.ServingTransformer(cfg).apply(
        {"params": unstacked}, batch.prompt, positions, logits_at=jnp.asarray(at)
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_unstacking_keeps_shardings(tiny_llama_config):
    cfg = tiny_llama_config.model
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with activate(mesh):
        shardings = param_shardings(mesh, abstract_variables(cfg))["params"]
    params = jax.device_put(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), shardings)
    unstacked = serving.unstack_layers(params, cfg)
    for layer in unstacked["layers"]:
        for s, u in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(layer), strict=True):
            assert s.sharding.spec[0] is None  # the layers axis is never sharded
            assert u.sharding.is_equivalent_to(s.sharding.update(spec=s.sharding.spec[1:]), u.ndim)
