"""When a program does not fit: the knobs that lower per-device memory, and by how much.

Each knob is a set of config overrides with a rough estimate from the plan's own
figures. Knobs are then compiled, cheapest change first, while the time budget lasts,
and a compiled total replaces the estimate. Estimates (what moves, not exact):

- more fsdp (`mesh.data` folded into `mesh.fsdp`): parameters and optimizer state are
  split over `data` times more devices;
- `train.grad_accum` times k (the smallest power of two whose estimate fits): the same
  global batch in micro-batches of 1/k the rows, so activations (most of the
  temporaries) shrink about k-fold;
- `model.remat`: recompute activations in the backward pass instead of keeping them
  (no estimate: how much is kept depends on the program);
- generation: half the batch halves the KV cache.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from jaxgen.config import Config, apply_overrides, config_from_dict
from jaxgen.errors import JaxgenError
from jaxgen.plan.report import Advice, Plan

_REMAT_NEXT = {"none": "dots_saveable", "dots_saveable": "full"}


def candidates(plan: Plan, config: Config) -> list[Advice]:
    """The knobs that apply to this plan, with estimated totals (None: no estimate)."""
    mem, total = plan.memory, plan.total_bytes
    data, fsdp = plan.mesh["data"], plan.mesh["fsdp"]
    out = []
    if data > 1:
        sharded = mem.get("parameters", 0) + mem.get("optimizer state", 0)
        out.append(
            Advice(
                ("mesh.data=1", f"mesh.fsdp={data * fsdp}"),
                "shards parameters and optimizer state over the data devices too (more all-gathers)",
                int(total - sharded * (1 - 1 / data)),
                compiled=False,
            )
        )
    if plan.kind == "generate":
        b = config.generate.batch_size
        if b > 1:
            cache = mem.get("kv cache (in temporaries)", 0)
            out.append(
                Advice(
                    (f"generate.batch_size={b // 2}",),
                    "half the prompts per batch",
                    total - cache // 2,
                    False,
                )
            )
        return out
    grad_accum = _grad_accum(plan, config)
    if grad_accum is not None:
        out.append(grad_accum)
    remat = _REMAT_NEXT.get(config.model.remat)
    if remat:
        out.append(
            Advice(
                (f"model.remat={remat}",),
                "recomputes activations in the backward pass (about a third more compute with full)",
                None,
                compiled=False,
            )
        )
    return out


def _grad_accum(plan: Plan, config: Config) -> Advice | None:
    """The smallest doubling of `train.grad_accum` whose estimate fits (else the largest
    the batch allows): micro-batches of 1/k the rows keep about 1/k of the activations."""
    t, dp = config.train, plan.mesh["data"] * plan.mesh["fsdp"]
    temps = plan.memory.get("temporaries", plan.memory.get("temporaries and outputs", 0))
    best = None
    factor = 2
    while t.batch_size % (t.grad_accum * factor * dp) == 0:
        estimate = int(plan.total_bytes - temps * (1 - 1 / factor))
        best = Advice(
            (f"train.grad_accum={t.grad_accum * factor}",),
            f"the same batch in {factor}x smaller micro-batches (same result, less parallel work per pass)",
            estimate,
            compiled=False,
        )
        if estimate <= plan.capacity_bytes:
            break
        factor *= 2
    return best


def with_overrides(config: Config, overrides: tuple[str, ...]) -> Config:
    """`config` with dotted overrides applied, validated like a loaded config."""
    data = config.model_dump(mode="json", exclude={"model": {"preset"}})
    return config_from_dict(apply_overrides(data, overrides))


def advise(plan: Plan, config: Config, total_of: Callable[[Config], int], budget_seconds: float) -> Plan:
    """`plan` with its advice: every candidate knob, compiled while `budget_seconds` lasts.

    Args:
        plan: a plan that does not fit.
        config: the config it was compiled from (resolved for the target).
        total_of: compiles a changed config and returns its per-device total.
        budget_seconds: no new compile starts after this much time (0: estimates only).
    """
    started = time.perf_counter()
    out = []
    for advice in candidates(plan, config):
        if time.perf_counter() - started < budget_seconds:
            try:
                total = total_of(with_overrides(config, advice.overrides))
            except JaxgenError as e:  # the knob does not apply to this config after all
                advice = dataclasses.replace(advice, why=f"{advice.why} (does not compile: {e})")
            else:
                advice = dataclasses.replace(advice, total_bytes=total, compiled=True)
        out.append(advice)
    return dataclasses.replace(plan, advice=tuple(out))
