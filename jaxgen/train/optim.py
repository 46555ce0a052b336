"""Optimizers and learning-rate schedules from the config, all built from optax parts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.config import OptimizerConfig, ScheduleConfig


def make_schedule(config: ScheduleConfig, peak_lr: float, total_steps: int) -> optax.Schedule:
    """Learning rate per step. `decay_steps` defaults to the run's total steps.

    - cosine / linear: warmup from 0 to the peak, then decay to `min_lr_ratio * peak`.
    - constant: warmup, then the peak.
    - wsd (warmup-stable-decay): warmup, hold the peak, then a linear decay over the
      last `decay_fraction` of the steps.
    - rsqrt: warmup, then peak * sqrt(warmup / step) (inverse square root).
    """
    warmup = config.warmup_steps
    total = config.decay_steps or total_steps
    floor = peak_lr * config.min_lr_ratio
    warm = optax.linear_schedule(0.0, peak_lr, warmup) if warmup else optax.constant_schedule(peak_lr)
    after = max(total - warmup, 1)
    if config.name == "cosine":
        main = optax.cosine_decay_schedule(peak_lr, after, alpha=config.min_lr_ratio)
    elif config.name == "linear":
        main = optax.linear_schedule(peak_lr, floor, after)
    elif config.name == "constant":
        main = optax.constant_schedule(peak_lr)
    elif config.name == "wsd":
        decay = max(int(round(total * config.decay_fraction)), 1)
        stable = max(after - decay, 0)
        main = optax.join_schedules(
            [optax.constant_schedule(peak_lr), optax.linear_schedule(peak_lr, floor, decay)], [stable]
        )
    else:  # rsqrt
        ref = max(warmup, 1)
        main = lambda step: peak_lr * jax.lax.rsqrt((step + ref) / ref)  # noqa: E731
    return optax.join_schedules([warm, main], [warmup]) if warmup else main


def decay_mask(config: OptimizerConfig, params) -> dict:
    """True where weight decay applies: matmul kernels always; norms, biases and
    embeddings only when configured (decaying them mostly hurts, as in GPT-2/nanoGPT)."""

    def rule(path, _leaf) -> bool:
        names = [getattr(k, "key", str(k)) for k in path]
        if any("norm" in n for n in names):
            return config.decay_norms
        if names[-1] == "bias":
            return config.decay_biases
        if names[0] in ("embed", "pos_embed", "rows"):  # rows: embedding rows a fine-tune adds
            return config.decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(
    config: OptimizerConfig, schedule: optax.Schedule, params, groups=None, update_masks=None
) -> optax.GradientTransformation:
    """Clipping + the chosen optimizer with the decay mask; `params` only shapes the mask.

    Args:
        groups: optional tree of labels over `params` (train/tuning.py): "frozen" leaves
            get `set_to_zero` (no optimizer state), "x<f>" leaves the schedule times f.
            Clipping sees the whole gradient, before the groups split it.
        update_masks: optional tree of True / 0-1 arrays multiplying the final updates
            (leaves frozen in part).
    """
    if groups is None:
        opt = _optimizer(config, schedule, lambda p: decay_mask(config, p))
    else:
        transforms = {}
        for label in set(jax.tree.leaves(groups)):
            if label == "frozen":
                transforms[label] = optax.set_to_zero()
            else:
                factor = float(label[1:])
                scaled = lambda step, f=factor: schedule(step) * f  # noqa: E731
                transforms[label] = _optimizer(config, scaled, lambda p: decay_mask(config, p))
        opt = optax.multi_transform(transforms, groups)
        if update_masks is not None:
            opt = optax.chain(opt, _mask_updates(update_masks))
    if config.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt


def _mask_updates(masks) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        masked = jax.tree.map(
            lambda u, m: u if m is True else u * jnp.asarray(m, u.dtype),
            updates,
            masks,
            is_leaf=lambda x: isinstance(x, bool | np.ndarray),
        )
        return masked, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _optimizer(config: OptimizerConfig, schedule, mask) -> optax.GradientTransformation:
    """The configured optimizer alone (no clipping); `mask(params)` says where decay applies."""
    if config.name == "adamw":
        opt = optax.adamw(
            schedule, config.b1, config.b2, config.eps, weight_decay=config.weight_decay, mask=mask
        )
    elif config.name == "lion":
        opt = optax.lion(schedule, config.b1, config.b2, weight_decay=config.weight_decay, mask=mask)
    elif config.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None, weight_decay_mask=mask)
    else:  # sgd with momentum; weight decay added to the gradient (classic L2 SGD)
        opt = optax.chain(
            optax.masked(optax.add_decayed_weights(config.weight_decay), mask),
            optax.sgd(schedule, momentum=config.momentum),
        )
    return opt
