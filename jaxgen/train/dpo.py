"""Direct preference optimisation: the loss on (prompt, chosen, rejected) pairs.

For a pair, with policy log-probabilities `pc`, `pr` of the chosen and rejected
completions (summed over their loss-masked tokens) and the frozen reference model's
`rc`, `rr`, let `h = (pc - rc) - (pr - rr)` (how much more the policy prefers the chosen
completion than the reference does). Per pair (as TRL computes them):

    sigmoid (DPO, Rafailov et al. 2023): -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
                                         (ls: label smoothing, the cDPO noise rate)
    ipo     (Azar et al. 2023):          (h - 1 / (2 beta))^2
    hinge   (SLiC, Zhao et al. 2023):    max(0, 1 - beta h)

At policy == reference, h = 0: the sigmoid loss is log 2 and its gradient with respect to
`pc` is -beta / 2 (and +beta / 2 for `pr`), for ls = 0. The implicit rewards are
`beta (pc - rc)` and `beta (pr - rr)`; reward accuracy counts pairs whose chosen reward is
higher (a tie counts half).

Batches (jaxgen/data/preference.py) hold both sequences of a pair in one row: segment
2k-1 is the k-th pair's chosen sequence and segment 2k its rejected one, so one forward
pass scores both and per-segment sums give the pair's log-probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.config import DpoConfig

# The per-pair figures summed into a step's metrics (each divided by the pair count).
METRICS = ("accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logps", "rejected_logps")


def pair_losses(h: jax.Array, config: DpoConfig) -> jax.Array:
    """Per-pair loss of the log-ratio difference `h` (any shape, float32)."""
    beta = config.beta
    if config.loss == "sigmoid":
        ls = config.label_smoothing
        return -(1 - ls) * jax.nn.log_sigmoid(beta * h) - ls * jax.nn.log_sigmoid(-beta * h)
    if config.loss == "ipo":
        return jnp.square(h - 1 / (2 * beta))
    return jax.nn.relu(1 - beta * h)


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[B, T] values summed per (row, segment id): [B, num_segments] (ids >= it are dropped)."""
    b = values.shape[0]
    index = jnp.arange(b)[:, None] * num_segments + segment_ids  # [B, T]
    index = jnp.where(segment_ids < num_segments, index, b * num_segments)  # out of range: dropped
    sums = jax.ops.segment_sum(values.reshape(-1), index.reshape(-1), num_segments=b * num_segments)
    return sums.reshape(b, num_segments)


def pair_logps(logps: jax.Array, mask: jax.Array, segment_ids: jax.Array):
    """Per-pair summed log-probs: (chosen [B, P], rejected [B, P], valid [B, P] bool).

    Args:
        logps: [B, T] float32 log-probability of each target; mask: [B, T] float32 loss
            mask (completion targets); segment_ids: [B, T] int (2k-1 chosen, 2k rejected).
    """
    t = logps.shape[1]
    pairs = t // 2 + 1  # a sequence takes at least one position, so <= T sequences per row
    sums = segment_sums(logps * mask, segment_ids, 2 * pairs + 1)  # [B, 2P+1], id 0 = padding
    counts = segment_sums(mask, segment_ids, 2 * pairs + 1)
    chosen, rejected = sums[:, 1::2], sums[:, 2::2]  # ids 1, 3, ... and 2, 4, ...
    valid = (counts[:, 1::2] > 0) & (counts[:, 2::2] > 0)
    return chosen, rejected, valid


def dpo_sums(policy, reference, mask, segment_ids, config: DpoConfig) -> tuple[jax.Array, dict]:
    """The summed loss over a batch's pairs and its metrics' sums (with "count", the pairs).

    Args:
        policy, reference: [B, T] float32 target log-probs under the trained and the
            frozen reference model.
    """
    pc, pr, valid = pair_logps(policy, mask, segment_ids)
    rc, rr, _ = pair_logps(jax.lax.stop_gradient(reference), mask, segment_ids)
    h = (pc - rc) - (pr - rr)
    w = valid.astype(jnp.float32)
    loss = jnp.sum(pair_losses(h, config) * w)
    chosen_reward, rejected_reward = config.beta * (pc - rc), config.beta * (pr - rr)
    figures = {
        # A tie counts half, as a coin flip would: at the start (policy == reference)
        # every reward is 0 and accuracy reads 0.5, not 0.
        "accuracy": jnp.where(chosen_reward == rejected_reward, 0.5, (chosen_reward > rejected_reward) * 1.0),
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "margin": chosen_reward - rejected_reward,
        "chosen_logps": pc,
        "rejected_logps": pr,
    }
    aux = {name: jax.lax.stop_gradient(jnp.sum(value * w)) for name, value in figures.items()}
    return loss, {**aux, "count": jnp.sum(w)}
