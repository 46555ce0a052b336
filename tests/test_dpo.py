"""DPO: the loss against hand-computed values, its gradient at the reference, pairing by
segment, and LoRA-DPO's one copy of the base."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import DpoConfig, load_config
from jaxgen.model.loss import projector, token_logps
from jaxgen.model.transformer import Transformer, abstract_variables, init_params
from jaxgen.runtime.mesh import activate, make_mesh, param_shardings
from jaxgen.train import dpo
from jaxgen.train.step import TrainStep
from jaxgen.train.tuning import Tuning


def _reference_loss(pc, pr, rc, rr, beta, kind, ls=0.0):
    """The formulas written out in plain Python, pair by pair."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        h = (a - c) - (b - d)
        if kind == "sigmoid":
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
            out.append(-(1 - ls) * math.log(sig(beta * h)) - ls * math.log(sig(-beta * h)))
        elif kind == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * h))
    return out


def _batch(pc, pr, rc, rr):
    """Rows holding one pair each: chosen on positions 0-1 (segment 1), rejected on 2-3
    (segment 2); each sequence's log-prob split over its two masked targets."""
    n = len(pc)
    policy = np.zeros((n, 6), np.float32)
    ref = np.zeros((n, 6), np.float32)
    for i in range(n):
        policy[i, :4] = [pc[i] * 0.25, pc[i] * 0.75, pr[i] * 0.5, pr[i] * 0.5]
        ref[i, :4] = [rc[i] * 0.5, rc[i] * 0.5, rr[i] * 0.1, rr[i] * 0.9]
        policy[i, 4:] = ref[i, 4:] = -7.0  # padding: segment 0, never counted
    mask = np.ones((n, 6), np.float32)
    segments = np.tile(np.array([1, 1, 2, 2, 0, 0], np.int32), (n, 1))
    return policy, ref, mask, segments


@pytest.mark.parametrize("kind, ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_loss_equals_the_formula(kind, ls):
    pc, pr = [-3.0, -10.5, -2.25], [-4.0, -9.0, -8.0]
    rc, rr = [-3.5, -10.0, -3.0], [-3.0, -9.5, -7.5]
    beta = 0.3
    config = DpoConfig(beta=beta, label_smoothing=ls, loss=kind)
    loss, aux = dpo.dpo_sums(*map(jnp.asarray, _batch(pc, pr, rc, rr)), config)
    want = _reference_loss(pc, pr, rc, rr, beta, kind, ls)
    assert float(aux["count"]) == 3
    np.testing.assert_allclose(float(loss), sum(want), atol=1e-6, rtol=0)
    rewards = [beta * (a - c) > beta * (b - d) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]
    assert float(aux["accuracy"]) == sum(rewards)
    at_reference = dpo.dpo_sums(*map(jnp.asarray, _batch(pc, pr, pc, pr)), config)[1]
    assert float(at_reference["accuracy"]) == 1.5  # three ties, each counted half
    np.testing.assert_allclose(float(aux["chosen_logps"]), sum(pc), atol=1e-5)


def test_at_the_reference_the_loss_is_log2_with_gradient_beta_over_two():
    beta = 0.25
    config = DpoConfig(beta=beta)
    pc, pr = jnp.asarray([-3.0, -5.0]), jnp.asarray([-4.0, -2.0])

    _, ref, mask, seg = _batch(pc.tolist(), pr.tolist(), pc.tolist(), pr.tolist())

    def loss(pc, pr):
        pad = jnp.full_like(pc, -7.0)
        policy = jnp.stack([pc * 0.25, pc * 0.75, pr * 0.5, pr * 0.5, pad, pad], axis=1)
        return dpo.dpo_sums(policy, jnp.asarray(ref), mask, seg, config)[0]

    # policy == reference: the reference values equal the policy's (they are spread over
    # the tokens differently; only sums matter).
    value = dpo.dpo_sums(*map(jnp.asarray, _batch(pc, pr, pc, pr)), config)[0]
    np.testing.assert_allclose(float(value), 2 * math.log(2), atol=1e-6)
    grad_c, grad_r = jax.grad(loss, argnums=(0, 1))(pc, pr)
    # d/d pc of -log sigmoid(beta h) at h = 0 is -beta/2 (and +beta/2 for pr), per pair
    # (the reference's own dependence is cut by stop_gradient).
    np.testing.assert_allclose(grad_c, [-beta / 2] * 2, atol=1e-6)
    np.testing.assert_allclose(grad_r, [beta / 2] * 2, atol=1e-6)


def test_pairs_are_odd_and_even_segments_of_a_row():
    # Row 0: two pairs (segments 1-2, 3-4); row 1: one pair and a chosen without its rejected.
    logps = jnp.asarray([[-1, -2, -3, -4, -5, -6, 0, 0], [-1, -1, -2, -2, -9, 0, 0, 0]], jnp.float32)
    seg = jnp.asarray([[1, 1, 2, 3, 4, 4, 0, 0], [1, 1, 2, 2, 3, 0, 0, 0]], jnp.int32)
    mask = jnp.ones_like(logps)
    chosen, rejected, valid = dpo.pair_logps(logps, mask, seg)
    np.testing.assert_array_equal(chosen[0, :2], [-3, -4])
    np.testing.assert_array_equal(rejected[0, :2], [-3, -11])
    np.testing.assert_array_equal(valid[0], [True, True] + [False] * (valid.shape[1] - 2))
    np.testing.assert_array_equal(valid[1], [True] + [False] * (valid.shape[1] - 1))


def test_lora_dpo_keeps_one_base_and_its_reference_is_the_base(tiny_config):
    config = load_config(
        None,
        ["model.preset=tiny", "model.dtype=float32", "finetune.method=lora", "finetune.objective=dpo"],
    )
    m = config.model
    mesh = make_mesh(config.mesh)
    with activate(mesh):
        shardings = param_shardings(mesh, abstract_variables(m))["params"]
        base = jax.jit(lambda r: init_params(m, r), out_shardings=shardings)(jax.random.key(0))
        base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
        before = {id(x) for x in jax.live_arrays()}
        step = TrainStep.from_config(config, mesh, Tuning.from_config(config.finetune))
        state = step.init(jax.random.key(1), base)
        added = [x for x in jax.live_arrays() if id(x) not in before]
        # The state holds adapters and their moments; the base is the one frozen tree.
        assert sum(x.nbytes for x in added) < base_bytes / 4
        assert step.frozen is base
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, m.vocab_size, (8, 16), dtype=np.int32)
        batch = {
            "tokens": tokens,
            "targets": np.roll(tokens, -1, axis=1),
            "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
            "segment_ids": np.ones((8, 16), np.int32),
            "loss_mask": np.ones((8, 16), np.float32),
        }
        hidden = step._hidden(step.reference_model, {"params": step.frozen}, batch, jax.random.key(0))
        ref = token_logps(projector(m, step.frozen), hidden, jnp.asarray(batch["targets"]), 16)
        logits = Transformer(m).apply({"params": base}, tokens, batch["positions"], batch["segment_ids"])[0]
        want = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        want = jnp.take_along_axis(want, jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
        np.testing.assert_allclose(ref, want, atol=1e-6, rtol=0)
        del state
