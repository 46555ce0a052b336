"""What a run trains: the trainable tree, the frozen one beside it, and the optimizer's groups.

- `full` (and pretraining): the trainable tree is the model's params.
- `freeze`: the same tree, but leaves matched by `finetune.freeze` are frozen: their
  gradient is cut with `stop_gradient` (XLA then never computes it) and
  `optax.multi_transform` gives them `set_to_zero`, which holds no optimizer state.
  A pattern may name layer slices (`layers/0-5`); such leaves are partly frozen and
  their updates are masked along the layers axis.
- `lora`: the trainable tree is `{"lora": adapters, "rows": added rows}` (model/lora.py,
  model/vocab.py) and the base params are a frozen argument of every jitted function,
  never part of the train state or its checkpoints.

Rows of tokens added by this run (`new_rows`) stay trainable under `freeze` and `lora`,
the rest of the embedding frozen.

Parameter paths are "/"-joined keys: `embed/embedding`, `layers/attn/query/kernel`,
`lm_head`, `lora/layers/mlp/up/a`. A pattern matches a path by `fnmatch` or as a prefix
(`embed` matches `embed/embedding`); `layers/A-B[/rest]` matches layers A..B only.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import DpoConfig, FinetuneConfig, LoraConfig, ModelConfig
from jaxgen.errors import JaxgenError
from jaxgen.model import lora as lora_lib
from jaxgen.model import vocab
from jaxgen.model.transformer import abstract_params, abstract_variables
from jaxgen.runtime.mesh import param_shardings

FROZEN = "frozen"
_LAYER_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def matches(pattern: str, path: str) -> bool:
    """fnmatch, or `pattern` names a subtree of `path` (`embed` matches `embed/embedding`)."""
    pattern = pattern.strip("/")
    return fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + "/")


def layer_pattern(pattern: str, num_layers: int, key: str) -> tuple[range, str] | None:
    """`layers/A-B[/rest]` -> (range(A, B + 1), rest); None for any other pattern."""
    parts = pattern.strip("/").split("/")
    if len(parts) < 2 or parts[0] != "layers" or not (m := _LAYER_RANGE.fullmatch(parts[1])):
        return None
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo > hi or hi >= num_layers:
        raise JaxgenError(f"{key}: {pattern!r} names layers {lo}-{hi} but the model has 0-{num_layers - 1}")
    return range(lo, hi + 1), "/".join(parts[2:])


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the trainable tree maps onto the model (pretraining: the default, `full`).

    Attributes:
        method: "full", "freeze" or "lora".
        lora: the adapters' settings (method "lora").
        freeze: frozen parameter patterns (method "freeze").
        lr_multipliers: (pattern, factor) pairs, first match wins.
        new_rows: (first id, count) of the vocabulary rows this run added, or None.
        dpo: the preference loss's settings (objective "dpo"), None for next-token loss.
    """

    method: str = "full"
    lora: LoraConfig | None = None
    freeze: tuple[str, ...] = ()
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    new_rows: tuple[int, int] | None = None
    dpo: DpoConfig | None = None

    @classmethod
    def from_config(
        cls, config: FinetuneConfig, new_rows: tuple[int, int] | None = None, data_format: str | None = None
    ) -> Tuning:
        """The tuning `config` describes; `data_format` (when given) must suit its objective."""
        if config.freeze and config.method != "freeze":
            raise JaxgenError(
                f"finetune.freeze: patterns need finetune.method: freeze (it is {config.method})"
            )
        if config.method == "freeze" and not config.freeze:
            raise JaxgenError(
                "finetune.freeze: method freeze needs at least one pattern (e.g. [embed, layers/0-3])"
            )
        if data_format is not None and (config.objective == "dpo") != (data_format == "preference"):
            raise JaxgenError(
                f"finetune.objective: {config.objective} with data.format: {data_format}"
                " (dpo trains on preference pairs, data.format: preference, and only on them)"
            )
        for pattern in config.lr_multipliers:
            if layer_pattern(pattern, num_layers=sys.maxsize, key="finetune.lr_multipliers") is not None:
                raise JaxgenError(
                    f"finetune.lr_multipliers: {pattern!r}: layer ranges are for finetune.freeze only"
                    " (a multiplier applies to whole parameters)"
                )
        return cls(
            method=config.method,
            lora=config.lora if config.method == "lora" else None,
            freeze=config.freeze,
            lr_multipliers=tuple(config.lr_multipliers.items()),
            new_rows=new_rows if new_rows and new_rows[1] and config.method != "full" else None,
            dpo=config.dpo if config.objective == "dpo" else None,
        )

    @property
    def is_lora(self) -> bool:
        return self.method == "lora"

    @property
    def has_frozen_base(self) -> bool:
        """Whether the starting params are kept as a frozen argument: the LoRA base, or
        DPO's reference model (for full and freeze, a second copy of the weights)."""
        return self.is_lora or self.dpo is not None

    # -- trees ---------------------------------------------------------------------------

    def abstract_trainable(self, config: ModelConfig):
        if not self.is_lora:
            return abstract_params(config)
        return jax.tree.map(lambda x: x.value, self._boxed_lora_tree(config), is_leaf=_is_boxed)

    def _boxed_lora_tree(self, config: ModelConfig) -> dict:
        tree = {"lora": lora_lib.abstract_adapters(config, self.lora)}
        if self.new_rows:
            # Few rows: replicated along the vocab axis, split along embed like the table.
            n, d, dtype = self.new_rows[1], config.d_model, jnp.dtype(config.param_dtype)
            rows = {"embed": nn.Partitioned(jax.ShapeDtypeStruct((n, d), dtype), (None, "embed"))}
            if not config.tie_embeddings:
                rows["lm_head"] = nn.Partitioned(jax.ShapeDtypeStruct((d, n), dtype), ("embed", None))
            tree["rows"] = rows
        return tree

    def trainable_shardings(self, mesh, config: ModelConfig):
        if not self.is_lora:
            return param_shardings(mesh, abstract_variables(config))["params"]
        return param_shardings(mesh, self._boxed_lora_tree(config))

    def frozen_shardings(self, mesh, config: ModelConfig):
        if not self.has_frozen_base:
            return {}
        return param_shardings(mesh, abstract_variables(config))["params"]

    def initial(self, base, config: ModelConfig, rng: jax.Array):
        """The trainable tree at step 0 from the base params (traced inside jit)."""
        if not self.is_lora:
            return base
        tree = {"lora": lora_lib.init_adapters(config, self.lora, rng)}
        if self.new_rows:
            tree["rows"] = vocab.take_rows(base, config, *self.new_rows)
        return tree

    def variables(self, trainable, frozen, config: ModelConfig) -> dict:
        """The model's variables: {"params": ...} (+ {"lora": ...}); frozen parts cut from autodiff."""
        if self.method == "full":
            return {"params": trainable}
        if self.method == "freeze":
            masks = self.trainable_masks(config)
            return {"params": jax.tree.map(_cut_frozen, trainable, masks, is_leaf=_is_mask_leaf)}
        params = frozen
        if "rows" in trainable:
            params = vocab.put_rows(params, trainable["rows"], self.new_rows[0])
        return {"params": params, "lora": trainable["lora"]}

    def model_params(self, trainable, frozen, config: ModelConfig):
        """Plain model params (adapters merged): for samples, merging and export."""
        variables = self.variables(trainable, frozen, config)
        if "lora" not in variables:
            return variables["params"]
        return lora_lib.merge(variables["params"], variables["lora"], self.lora)

    # -- optimizer groups ----------------------------------------------------------------

    def trainable_masks(self, config: ModelConfig):
        """Per leaf of the trainable tree: True (trains), False (frozen) or a 0/1 array
        broadcasting against the leaf (trains in part: layer slices, added rows)."""
        tree = self.abstract_trainable(config)
        if self.method != "freeze":
            return jax.tree.map(lambda _: True, tree)
        num_layers = config.num_layers
        used = set()

        def mask(path, leaf):
            name = path_name(path)
            whole = False
            frozen_layers = np.zeros(leaf.shape[:1], bool) if name.startswith("layers/") else None
            for pattern in self.freeze:
                ranged = layer_pattern(pattern, num_layers, "finetune.freeze")
                if ranged is None:
                    if matches(pattern, name):
                        whole = True
                        used.add(pattern)
                elif frozen_layers is not None and (
                    not ranged[1] or matches(ranged[1], name[len("layers/") :])
                ):
                    frozen_layers[list(ranged[0])] = True
                    used.add(pattern)
            if whole:
                # Frozen, but for the rows of tokens this run added (embedding, untied head).
                rows = self._added_rows(name, leaf)
                return False if rows is None else rows
            if frozen_layers is not None and frozen_layers.any():
                return _along(~frozen_layers, leaf.ndim, 0)
            return True

        masks = jax.tree_util.tree_map_with_path(mask, tree)
        unused = [p for p in self.freeze if p not in used]
        if unused:
            names = ", ".join(path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)[:12])
            raise JaxgenError(f"finetune.freeze: {unused[0]!r} matches no parameter (paths: {names}, ...)")
        return masks

    def _added_rows(self, name: str, leaf) -> np.ndarray | None:
        """The 0/1 mask of this run's added rows in the embedding / untied head, else None."""
        if not self.new_rows or name not in ("embed/embedding", "lm_head"):
            return None
        first, count = self.new_rows
        axis = 0 if name == "embed/embedding" else 1
        rows = np.zeros(leaf.shape[axis], bool)
        rows[first : first + count] = True
        return _along(rows, leaf.ndim, axis)

    def labels(self, config: ModelConfig):
        """The optimizer group of each trainable leaf: FROZEN, or "x<lr factor>"."""
        tree = self.abstract_trainable(config)
        masks = self.trainable_masks(config)
        used = set()

        def label(path, _leaf, mask):
            if mask is False:
                return FROZEN
            name = path_name(path)
            for pattern, factor in self.lr_multipliers:
                if matches(pattern, name):
                    used.add(pattern)
                    return f"x{factor}"
            return "x1.0"

        out = jax.tree_util.tree_map_with_path(label, tree, masks)
        unused = [p for p, _ in self.lr_multipliers if p not in used]
        if unused:
            raise JaxgenError(f"finetune.lr_multipliers: {unused[0]!r} matches no trainable parameter")
        return out

    def needs_groups(self) -> bool:
        return self.method == "freeze" or bool(self.lr_multipliers)


def _along(trains: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A 1-D trains/frozen vector as a float 0/1 mask that broadcasts along `axis` of an ndim leaf."""
    shape = [1] * ndim
    shape[axis] = len(trains)
    return trains.reshape(shape).astype(np.float32)


def _is_boxed(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _is_mask_leaf(x) -> bool:
    return isinstance(x, bool | np.ndarray)


def _cut_frozen(param, mask):
    if mask is True:
        return param
    if mask is False:
        return jax.lax.stop_gradient(param)
    return jnp.where(mask > 0, param, jax.lax.stop_gradient(param))
