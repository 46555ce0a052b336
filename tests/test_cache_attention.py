"""The CPU decoding attention over the KV cache (runtime/cache_attention.cc) against XLA's
path (`model.attention.cached_attention`), and where the model uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.decode import loop
from jaxgen.model.attention import KERNEL_QUERIES, attention_mask, cached_attention, reads_cache_in_place
from jaxgen.model.serving import ServingTransformer, unstack_layers
from jaxgen.model.transformer import init_params
from jaxgen.runtime import cpu_kernels

# Where a compiler is found the kernels must build (test_cpu_kernels.py), so this only
# skips on a machine without one.
pytestmark = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler")

L, B, K, S, H = 3, 3, 2, 40, 16
kernel = jax.jit(cpu_kernels.cache_attention)


def _case(t: int, n: int, seed: int = 0, h: int = H):
    """q [B, T, N, h]; a stacked cache whose rows hold 17, 30 and 9 slots of text (the
    first after 5 slots of another segment), the new tokens from there; the mask [B, T, S]."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, n, h)).astype(np.float32)
    keys, values = (rng.normal(size=(L, B, K, S, h)).astype(np.float32) for _ in range(2))
    index = np.array([22, 30, 9], np.int32)  # [B]: each row's first new slot
    kv_segment = np.where(np.arange(S) < index[:, None] + t, 1, 0).astype(np.int32)
    kv_segment[0, :5] = 2
    mask = attention_mask(jnp.ones((B, t), jnp.int32), jnp.asarray(kv_segment), jnp.asarray(index))[:, 0]
    return q, keys, values, mask, index


@pytest.mark.parametrize("t, n", [(1, 2), (1, 4), (5, 4), (16, 2)])  # n = 4: two queries per kv head
def test_the_kernel_equals_xla_s_attention_over_each_layer(t, n):
    q, keys, values, mask, _ = _case(t, n)
    for layer in range(L):
        want = cached_attention(
            jnp.asarray(q), jnp.asarray(keys[layer]), jnp.asarray(values[layer]), mask[:, None]
        )
        got = kernel(q, keys, values, mask, layer)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h", [32, 24])
def test_other_head_sizes(h):
    # AVX-512 builds take 16 slots at a time for head sizes 16, 32, 64 and 128 (32: the
    # edit benchmark's model), one slot at a time for the rest (24); so does every other build.
    q, keys, values, mask, _ = _case(5, 4, seed=1, h=h)
    want = cached_attention(jnp.asarray(q), jnp.asarray(keys[1]), jnp.asarray(values[1]), mask[:, None])
    np.testing.assert_allclose(
        np.asarray(kernel(q, keys, values, mask, 1)), np.asarray(want), rtol=1e-5, atol=1e-6
    )


def test_slots_no_query_sees_are_never_read():
    # Stale slots after each row's new tokens, and slots of another segment: NaN there
    # must not reach any output (XLA's dots would read them and give 0 * NaN = NaN).
    q, keys, values, mask, _ = _case(3, 4)
    hidden = ~np.asarray(mask).any(axis=1)  # [B, S]: slots no query of the row sees
    assert hidden[0, :5].all() and hidden[1, 33:].all()
    poisoned = [
        np.where(hidden[None, :, None, :, None], np.nan, a).astype(np.float32) for a in (keys, values)
    ]
    got = kernel(q, *poisoned, mask, 1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(kernel(q, keys, values, mask, 1)))


def test_a_query_gets_the_same_bits_alone_in_its_row_batch_and_tokens():
    # What refill and speculative decoding rely on: one row alone, and one new token at a
    # time, give the bits of the whole batch's verify pass.
    q, keys, values, mask, _ = _case(5, 4)
    whole = np.asarray(kernel(q, keys, values, mask, 2))
    for row in range(B):
        for t in range(5):
            one = kernel(q[row : row + 1, t : t + 1], keys[:, row : row + 1], values[:, row : row + 1],
                         mask[row : row + 1, t : t + 1], 2)  # fmt: skip
            np.testing.assert_array_equal(np.asarray(one)[0, 0], whole[row, t])


def test_a_query_that_sees_nothing_gets_xla_s_uniform_mix():
    # Never made by the model (a new token always sees its own slot), but a masked softmax
    # over nothing is uniform in XLA's path: the mean of all S values.
    q, keys, values, mask, _ = _case(1, 2)
    mask = mask.at[1].set(False)
    want = cached_attention(jnp.asarray(q), jnp.asarray(keys[0]), jnp.asarray(values[0]), mask[:, None])
    got = kernel(q, keys, values, mask, 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[1, 0, 0], values[0, 1, 0].mean(0), rtol=1e-5, atol=1e-6)


def test_decoding_on_cpu_attends_through_the_kernel(tiny_llama_config):
    # Steps, verify passes and prefills up to KERNEL_QUERIES tokens take the kernel; a longer prefill
    # and narrower compute dtypes keep XLA's dots.
    cfg = tiny_llama_config.model
    params = unstack_layers(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), cfg)
    cache = loop.new_cache(cfg, 1, 32)
    step = jax.jit(lambda p, c: loop.decode_step(ServingTransformer(cfg), p, jnp.ones((1,), jnp.int32),
                                                 jnp.zeros((1,), jnp.int32), c))  # fmt: skip
    assert "JaxgenCacheAttention" in step.lower(params, cache).as_text()
    q = jnp.zeros((1, KERNEL_QUERIES + 1, 4, 8), jnp.float32)
    assert reads_cache_in_place(q[:, :KERNEL_QUERIES], cache.k) and not reads_cache_in_place(q, cache.k)
    assert not reads_cache_in_place(q[:, :1].astype(jnp.bfloat16), cache.k.astype(jnp.bfloat16))
    # Where the kernel takes 16 slots at a time (AVX-512; head sizes 16-128), prefills of
    # any length take it too.
    long32 = jnp.zeros((1, 4 * KERNEL_QUERIES, 4, 32), jnp.float32)
    assert reads_cache_in_place(long32, long32) == cpu_kernels.attends_in_blocks(32)
    assert not cpu_kernels.attends_in_blocks(24)
