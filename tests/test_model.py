"""Model: published param counts (no allocation), FLOPs, scan == unrolled, cache == full."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import load_config
from jaxgen.model.kvcache import init_cache
from jaxgen.model.transformer import Transformer, init_params, model_flops_per_token, param_count


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("gpt2-124m", 124_439_808),
        ("gpt2-350m", 354_823_168),
        ("gpt2-774m", 774_030_080),
        ("gpt2-1.5b", 1_557_611_200),
        ("llama-1.1b", 1_100_048_384),
        ("llama2-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
    ],
)
def test_param_counts_match_published_figures(preset, expected):
    # jax.eval_shape inside param_count: nothing is allocated, even for 8B.
    assert param_count(load_config(None, [f"model.preset={preset}"]).model) == expected


def test_flops_per_token_gpt2_124m_by_hand():
    config = load_config(None, ["model.preset=gpt2-124m"]).model
    n = 124_439_808 - 1024 * 768  # position embeddings are a lookup, not a matmul
    attention = 12 * 12 * 12 * 64 * 1024  # 12 * layers * heads * head_dim * seq
    assert model_flops_per_token(config, 1024) == 6 * n + attention == 855_166_464


def _forward(config):
    """Jitted full forward (eager linen application re-traces every op: slow in tests)."""
    return jax.jit(lambda p, t, s, seg=None: Transformer(config).apply({"params": p}, t, s, seg)[0])


def _inputs(batch=2, length=12, vocab=512):
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return tokens, positions


@pytest.mark.parametrize("family", ["tiny_config", "tiny_llama_config"])
def test_scanned_and_unrolled_layers_share_params_and_outputs(family, request):
    config = request.getfixturevalue(family).model.model_copy(update={"scan_layers": True})
    params = init_params(config, jax.random.key(0))
    tokens, positions = _inputs()
    scanned = _forward(config)(params, tokens, positions)
    unrolled_cfg = config.model_copy(update={"scan_layers": False})
    unrolled = _forward(unrolled_cfg)(params, tokens, positions)
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=0)
    # init_params always rolls the loop to compile faster; that must not change a value.
    unrolled_init = nn.unbox(Transformer(unrolled_cfg).init(jax.random.key(0), tokens, positions))["params"]
    jax.tree.map(np.testing.assert_array_equal, unrolled_init, params)
    remat_cfg = config.model_copy(update={"remat": "full"})

    def loss(p, cfg):  # mean next-token cross-entropy, as training differentiates it
        logits = Transformer(cfg).apply({"params": p}, tokens, positions)[0]
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1 = grad(params, config)
    g2 = grad(params, remat_cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g1, g2)


def test_llama_has_rope_rmsnorm_swiglu_gqa_and_untied_head(tiny_llama_config):
    params = init_params(tiny_llama_config.model, jax.random.key(0))
    assert "pos_embed" not in params and "bias" not in params["final_norm"]
    assert params["layers"]["attn"]["key"]["kernel"].shape == (2, 64, 2, 16)  # 2 kv heads
    assert set(params["layers"]["mlp"]) == {"gate", "up", "down"}
    assert params["lm_head"].shape == (64, 512)


def test_segment_ids_block_attention_across_documents(tiny_config):
    # Two documents packed in one row must give the same logits as each alone.
    config = tiny_config.model
    params = init_params(config, jax.random.key(0))
    forward = _forward(config)
    tokens, _ = _inputs(1, 12)
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segments = jnp.array([[1] * 5 + [2] * 7])
    packed = forward(params, tokens, positions, segments)
    first = forward(params, tokens[:, :5], positions[:, :5])
    second = forward(params, tokens[:, 5:], positions[:, 5:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["tiny_config", "tiny_llama_config"])
def test_prefix_segments_as_lengths_equal_the_segment_mask(family, request):
    # Pretraining rows (one text, then padding; a row of padding only) through sequence
    # lengths must give the segment mask's logits on every real position, and the same
    # gradients of a loss over real positions (padding's outputs count nowhere).
    config = request.getfixturevalue(family).model
    params = init_params(config, jax.random.key(0))
    tokens, positions = _inputs(3, 12)
    segments = (jnp.arange(12)[None] < jnp.array([[12], [7], [0]])).astype(jnp.int32)
    real = segments[..., None] > 0

    def loss(p, prefix):
        logits = Transformer(config, prefix_segments=prefix).apply(
            {"params": p}, tokens, positions, segments
        )[0]
        return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)[..., 0]), logits

    (mask_loss, mask_logits), mask_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, False
    )
    (len_loss, len_logits), len_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, True
    )
    np.testing.assert_allclose(
        jnp.where(real, len_logits, 0), jnp.where(real, mask_logits, 0), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(len_loss, mask_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), len_grads, mask_grads)
    # The row of padding is what the lengths path treats differently (length clamped to 1).
    assert not np.allclose(len_logits[2], mask_logits[2], atol=1e-3)


@pytest.mark.parametrize("family", ["tiny_config", "tiny_llama_config"])
def test_cached_prefill_and_decode_equal_full_forward(family, request):
    config = request.getfixturevalue(family).model
    params = init_params(config, jax.random.key(0))
    step = jax.jit(lambda p, t, s, c: Transformer(config).apply({"params": p}, t, s, cache=c))
    tokens, positions = _inputs(2, 10)
    full = _forward(config)(params, tokens, positions)
    cache = init_cache(config, batch=2, max_len=16)
    logits, cache = step(params, tokens[:, :6], positions[:, :6], cache)
    steps = [logits]
    for t in range(6, 10):
        logits, cache = step(params, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
    assert int(cache.index) == 10 and list(np.asarray(cache.lengths)) == [10, 10]


@pytest.mark.parametrize(
    "eq, x_shape, kernel_shape",
    [
        ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 6)),  # attention output: two contracted dims
        ("BTD,DNH->BTNH", (2, 3, 6), (6, 4, 5)),
        ("BTD,VD->BTV", (2, 3, 6), (7, 6)),  # tied head: contracts the kernel's last dim
        ("BKMH,BKSH->BKMS", (2, 3, 4, 5), (2, 3, 6, 5)),  # batch dims, output reordered
    ],
)
def test_kernel_einsum_equals_einsum_and_contracts_in_kernel_order(eq, x_shape, kernel_shape):
    from jaxgen.model.layers import kernel_einsum

    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)
    np.testing.assert_allclose(kernel_einsum(eq, x, kernel), jnp.einsum(eq, x, kernel), rtol=1e-5, atol=1e-5)
    # The contracted dims are listed in the kernel's own order (ascending), so XLA never
    # has to copy the kernel into another order (jnp.einsum lists "NH" as H, N).
    (dot,) = [
        e
        for e in jax.make_jaxpr(lambda a, b: kernel_einsum(eq, a, b))(x, kernel).eqns
        if "dot" in str(e.primitive)
    ]
    (_, rhs_contract), _ = dot.params["dimension_numbers"]
    assert list(rhs_contract) == sorted(rhs_contract)


def test_kernel_einsum_rejects_a_dim_summed_from_one_operand():
    from jaxgen.model.layers import kernel_einsum

    with pytest.raises(ValueError, match="sums a dim of one operand"):
        kernel_einsum("BTX,DV->BTV", jnp.ones((1, 2, 3)), jnp.ones((4, 5)))
