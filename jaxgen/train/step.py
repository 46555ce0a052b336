"""The pure core of training: train state, loss, and the sharded jitted step.

Everything here is a function of pytrees; files, signals and logging live in
jaxgen/train/loop.py.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.config import Config, ModelConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from jaxgen.model.loss import projector, token_logps, token_nll
from jaxgen.model.transformer import Transformer, init_params
from jaxgen.runtime.mesh import batch_sharding
from jaxgen.train import dpo
from jaxgen.train.optim import make_optimizer, make_schedule
from jaxgen.train.tuning import Tuning


@flax.struct.dataclass
class TrainState:
    params: Any  # the trainable tree (train/tuning.py): the model's params unless LoRA
    opt_state: Any
    step: jax.Array  # [] int32, number of updates applied
    rng: jax.Array  # dropout key; folded with the step, so resume is exact


@flax.struct.dataclass
class StepMetrics:
    loss: jax.Array  # mean token NLL over the (global) batch
    z_loss: jax.Array
    grad_norm: jax.Array
    learning_rate: jax.Array
    tokens: jax.Array  # tokens that counted in the loss (DPO: preference pairs)
    finite: jax.Array  # False: NaN/Inf loss or gradient, the update was not applied
    extra: dict  # the objective's own figures, per token or pair (DPO: train/dpo.py METRICS)


class TrainStep:
    """The jitted functions of one run (init, step, eval sums) with their shardings.

    Takes the config sections it uses, so a change to another section cannot touch it.
    `tuning` says what trains (train/tuning.py; default: every parameter). A fine-tuning
    run starts from base params (`init(rng, base)`) instead of a random init; under LoRA
    the base stays beside the state as the frozen argument of every jitted function.
    `prefix_segments`: every batch row is one text then padding, as pretraining windows are
    (data.prefix_segments), so attention needs no segment mask (model/attention.py).
    """

    def __init__(
        self,
        model: ModelConfig,
        optimizer: OptimizerConfig,
        schedule: ScheduleConfig,
        train: TrainConfig,
        mesh: Mesh,
        tuning: Tuning | None = None,
        prefix_segments: bool = False,
    ):
        self.model_config, self.train_config, self.mesh = model, train, mesh
        self.tuning = tuning = tuning or Tuning()
        lora = tuning.lora
        dropout = model.dropout > 0 or (lora is not None and lora.dropout > 0)
        prefix = dict(prefix_segments=prefix_segments)
        self.model = Transformer(model, deterministic=not dropout, lora=lora, **prefix)
        self.eval_model = Transformer(model, deterministic=True, lora=lora, **prefix)
        self.reference_model = Transformer(model, deterministic=True, **prefix)  # DPO: adapters off
        self.schedule = make_schedule(schedule, optimizer.learning_rate, train.steps)
        self.param_shardings = tuning.trainable_shardings(mesh, model)
        self.frozen_shardings = tuning.frozen_shardings(mesh, model)
        self.abstract_params = tuning.abstract_trainable(model)
        groups = (
            (tuning.labels(model), tuning.trainable_masks(model)) if tuning.needs_groups() else (None, None)
        )
        self.tx = make_optimizer(optimizer, self.schedule, self.abstract_params, *groups)
        self.state_shardings = self._state_shardings()
        self.batch_sharding = batch_sharding(mesh)
        # The frozen tree every jitted function takes ({} unless LoRA); set by `init`.
        self.frozen = {}
        self._init_random = jax.jit(self._init, out_shardings=self.state_shardings)
        base_shardings = self.frozen_shardings if tuning.has_frozen_base else self.param_shardings
        self._init_base = jax.jit(
            self._init_from_base,
            in_shardings=(base_shardings, None),
            out_shardings=self.state_shardings,
            # Full and freeze: the state's params are the base, so take its buffers over.
            donate_argnums=() if tuning.has_frozen_base else 0,
        )
        self.jit_step = jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self._eval = jax.jit(
            self._eval_sums, in_shardings=(self.param_shardings, self.frozen_shardings, self.batch_sharding)
        )
        self._model_params = jax.jit(
            lambda params, frozen: self.tuning.model_params(params, frozen, self.model_config)
        )

    @classmethod
    def from_config(
        cls, config: Config, mesh: Mesh, tuning: Tuning | None = None, prefix_segments: bool = False
    ) -> TrainStep:
        return cls(
            config.model, config.optimizer, config.schedule, config.train, mesh, tuning, prefix_segments
        )

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, StepMetrics]:
        """One update (the state is donated)."""
        return self.jit_step(state, self.frozen, batch)

    def eval_sums(self, params, batch: dict) -> dict:
        """The objective's sums over one evaluation batch, dropout off: {"loss", "count", ...}."""
        return self._eval(params, self.frozen, batch)

    def model_params(self, params):
        """The plain model params of a trainable tree (adapters merged), for sampling."""
        if not self.tuning.has_frozen_base:
            return params
        return self._model_params(params, self.frozen)

    # -- state ---------------------------------------------------------------------------

    def init(self, rng: jax.Array, base=None) -> TrainState:
        """Step 0: from `base` params when given (fine-tuning; donated unless LoRA keeps
        it as the frozen tree), else a random init."""
        if base is None:
            return self._init_random(rng)
        self.set_frozen(base)
        return self._init_base(base, rng)

    def set_frozen(self, base) -> None:
        """Keeps `base` as the frozen tree under LoRA (a resumed run calls this, not `init`)."""
        if self.tuning.has_frozen_base:
            self.frozen = base

    def _init(self, rng: jax.Array) -> TrainState:
        param_rng, dropout_rng = jax.random.split(rng)
        params = init_params(self.model_config, param_rng)
        return self.state_from_params(params, dropout_rng)

    def _init_from_base(self, base, rng: jax.Array) -> TrainState:
        param_rng, dropout_rng = jax.random.split(rng)
        trainable = self.tuning.initial(base, self.model_config, param_rng)
        return self.state_from_params(trainable, dropout_rng)

    def state_from_params(self, params, rng: jax.Array) -> TrainState:
        return TrainState(
            params=params, opt_state=self.tx.init(params), step=jnp.zeros((), jnp.int32), rng=rng
        )

    def _state_shardings(self) -> TrainState:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)

        # Optimizer moments have their param's shape and take its sharding; anything
        # else (counts, Adafactor's factored rows/cols) is small and replicated.
        def like_param(leaf, param, sharding):
            if isinstance(leaf, optax.MaskedNode):  # a leaf another group of multi_transform owns
                return leaf
            return sharding if leaf.shape == param.shape else replicated

        opt = optax.tree_map_params(
            self.tx,
            like_param,
            abstract_opt,
            self.abstract_params,
            self.param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct | optax.MaskedNode),
        )
        return TrainState(params=self.param_shardings, opt_state=opt, step=replicated, rng=replicated)

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(self.state_from_params, self.abstract_params, jax.random.key(0))

    # -- loss ----------------------------------------------------------------------------

    def loss_sums(
        self, params, batch: dict, rng: jax.Array, model=None, frozen=None
    ) -> tuple[jax.Array, dict]:
        """The summed (not averaged) objective over a (micro-)batch, and its figures' sums.

        Sums make gradient accumulation exact: the step divides once by the global count
        (`aux["count"]`: loss-masked tokens, or preference pairs for DPO). `params` is the
        trainable tree; `frozen` the LoRA base or the DPO reference ({} otherwise).
        """
        model = model or self.model
        variables = self.tuning.variables(params, frozen, self.model_config)
        hidden = self._hidden(model, variables, batch, rng)  # [B, T, D]
        project = projector(model.config, variables["params"])
        mask = batch["loss_mask"].astype(jnp.float32)
        chunk = self.train_config.loss_chunk
        if self.tuning.dpo is None:
            nll, z = token_nll(project, hidden, batch["targets"], mask, chunk)
            return nll + self.train_config.z_loss * z, {"loss": nll, "z_loss": z, "count": mask.sum()}
        # The reference is the frozen starting model: the LoRA base with its adapters off,
        # or the copy of the weights full fine-tuning started from.
        reference = {"params": frozen}
        ref_hidden = self._hidden(self.reference_model, reference, batch, rng)
        ref_project = projector(model.config, frozen)
        policy = token_logps(project, hidden, batch["targets"], chunk)  # [B, T]
        ref = token_logps(ref_project, ref_hidden, batch["targets"], chunk)
        loss, aux = dpo.dpo_sums(policy, ref, mask, batch["segment_ids"], self.tuning.dpo)
        return loss, {"loss": loss, "z_loss": jnp.zeros(()), **aux}

    @staticmethod
    def _hidden(model, variables, batch: dict, rng: jax.Array) -> jax.Array:
        hidden, _ = model.apply(
            variables,
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            return_hidden=True,
            rngs={"dropout": rng},
        )
        return hidden

    def _eval_sums(self, params, frozen, batch: dict) -> dict:
        return self.loss_sums(params, batch, jax.random.key(0), self.eval_model, frozen)[1]

    # -- step ----------------------------------------------------------------------------

    def _step(self, state: TrainState, frozen, batch: dict) -> tuple[TrainState, StepMetrics]:
        accum = self.train_config.grad_accum
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_sums(params, batch, rng):
            return self.loss_sums(params, batch, rng, frozen=frozen)

        grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
        if accum == 1:
            (_, aux), grads = grad_fn(state.params, batch, rng)
        else:
            grads, aux = accumulate(grad_fn, state.params, batch, rng, accum)
        count = jnp.maximum(aux["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss, z = aux["loss"] / count, aux["z_loss"] / count
        extra = {k: v / count for k, v in aux.items() if k not in ("loss", "z_loss", "count")}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A NaN/Inf step leaves the state untouched; the loop skips or stops (train.nan_policy).
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = TrainState(
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            step=state.step + finite.astype(jnp.int32),
            rng=state.rng,
        )
        metrics = StepMetrics(
            loss=loss,
            z_loss=z,
            grad_norm=grad_norm,
            learning_rate=jnp.asarray(self.schedule(state.step), jnp.float32),
            tokens=aux["count"],
            finite=finite,
            extra=extra,
        )
        return new_state, metrics


def accumulate(grad_fn, params, batch: dict, rng: jax.Array, accum: int):
    """Sums gradients and the loss's figures over `accum` micro-batches with lax.scan
    (memory flat in `accum`): (grads, aux sums).

    Micro-batch i takes rows i, i+accum, i+2*accum, ... so every data shard
    contributes equally to each micro-batch and no rows move between devices.
    """

    def split(x):  # [B, T] -> [A, B/A, T]
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.tree.map(lambda x: x[0], micro)
    aux_zeros = jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(grad_fn, params, first, rng)[0][1]
    )

    def body(carry, inputs):
        grads, aux = carry
        i, mb = inputs
        (_, mb_aux), mb_grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, mb_grads)
        return (grads, jax.tree.map(jnp.add, aux, mb_aux)), None

    (grads, aux), _ = jax.lax.scan(body, (zeros, aux_zeros), (jnp.arange(accum), micro))
    return grads, aux
