"""Import and export Hugging Face GPT-2 / Llama safetensors checkpoints.

- `load_hf(hf_dir)`: an HF directory -> (Config, params, tokenizer) in memory.
- `import_hf(hf_dir, run_dir)`: the same, written as a jaxgen run directory.
- `export_hf(run_dir, out_dir)`: a run directory -> config.json + safetensors that
  transformers' `from_pretrained` loads.

Import keeps host memory near one tensor: each stacked `[L, ...]` parameter is
allocated on the mesh in its final sharding and filled one layer at a time from
tensors read lazily from the (memory-mapped) safetensors files.
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.checkpoint import load_params, save_params
from jaxgen.config import Config, MeshConfig, ModelConfig, config_from_dict
from jaxgen.convert import hf_config, hf_files, hf_params
from jaxgen.errors import JaxgenError
from jaxgen.model.transformer import abstract_variables
from jaxgen.runtime.mesh import make_mesh, param_shardings
from jaxgen.tokenizer import load_tokenizer

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
# Files that make up an HF tokenizer (whichever exist are carried along).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")
_DTYPES = ("float32", "bfloat16", "float16")


def read_config(hf_dir: str | pathlib.Path, dtype: str | None = None) -> Config:
    """The jaxgen Config equivalent to `hf_dir/config.json` (+ generation_config.json).

    Args:
        dtype: parameter dtype; None: the dtype the checkpoint was saved in
            (config.json `dtype`/`torch_dtype`), float32 when it names none. float32
            also computes in float32 everywhere (exact parity with transformers);
            16-bit params compute in `auto` (float32 on CPU, bfloat16 on accelerators).
    """
    path = pathlib.Path(hf_dir) / CONFIG
    hf = hf_config.read_json(path)
    fields = hf_config.model_fields(hf, str(path))
    if dtype is None:
        saved = hf.get("dtype", hf.get("torch_dtype"))
        dtype = saved if saved in _DTYPES else "float32"
    if dtype not in _DTYPES:
        raise JaxgenError(f"dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
    fields.update(dtype="float32" if dtype == "float32" else "auto", param_dtype=dtype)
    gen_path = pathlib.Path(hf_dir) / GENERATION_CONFIG
    gen = hf_config.read_json(gen_path) if gen_path.exists() else {}
    name = pathlib.Path(hf_dir).resolve().name or "hf"
    data = {"name": name, "model": fields, "generate": hf_config.generate_fields(gen)}
    return config_from_dict(data, where=f"{hf_dir}: ")


def default_mesh() -> Mesh:
    """One device: a model converted without a mesh is placed on the first device."""

    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def load_hf(
    hf_dir: str | pathlib.Path, *, dtype: str | None = None, mesh: Mesh | None = None, serving: bool = False
):
    """Converts an HF directory in memory.

    Args:
        hf_dir: holds config.json and model.safetensors (or a sharded index).
        dtype: "float32" / "bfloat16" / "float16"; None: the checkpoint's own dtype.
        mesh: where to place the params (their shardings follow LOGICAL_RULES);
            None: the first device.
        serving: return the serving layout (one array per layer, what `LanguageModel`
            keeps) instead of the stacked one.
    Returns:
        (Config, params, tokenizer or None): params is the unboxed jaxgen tree.
    """
    config = read_config(hf_dir, dtype)
    params = read_params(hf_dir, config.model, mesh or default_mesh(), serving=serving)
    return config, params, find_tokenizer(hf_dir)


def find_tokenizer(directory: str | pathlib.Path):
    """The tokenizer stored in an HF (or run) directory, or None when it has none."""

    directory = pathlib.Path(directory)
    if any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return load_tokenizer(directory)
    return None


# ----------------------------------------------------------------------------- params in


def read_params(hf_dir: str | pathlib.Path, model: ModelConfig, mesh: Mesh, *, serving: bool = False):
    """Reads every tensor the mapping needs, checked first, placed on `mesh`.

    Names and shapes are all checked from the file headers before any tensor is
    read, so a wrong checkpoint fails at once with the offending tensor named.
    With `serving`, layer weights stay one array per layer (the layout of
    jaxgen/model/serving.py): no stacking programs to compile and no unstacking copy.
    """

    shardings = param_shardings(mesh, abstract_variables(model))["params"]
    reader = hf_files.SafetensorsReader(hf_dir)
    names = reader.names()
    rule_list = hf_params.rules(model, hf_params.hf_prefix(model, names))
    found = {n: reader.shape(n) for n in names}
    hf_params.check_tensors(model, rule_list, found, str(reader.dir))
    shapes = hf_params.leaf_shapes(model)
    params: dict = {}
    layers: list[dict] = [{} for _ in range(model.num_layers)]  # serving: each layer's tree
    for rule in rule_list:
        leaf = shapes[rule.path]
        sharding = _lookup(shardings, rule.path)
        if serving and rule.stacked:
            assert rule.path[0] == "layers", rule.path  # stacked leaves live under "layers"
            blocks = _layer_blocks(reader, rule, leaf, sharding, model.num_layers)
            for tree, block in zip(layers, blocks, strict=True):
                _insert(tree, rule.path[1:], block)
        else:
            _insert(params, rule.path, _read_leaf(reader, rule, leaf, sharding, model.num_layers))
    if serving:
        params["layers"] = tuple(layers)
    return params


def _lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _insert(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _read_block(reader, rule: hf_params.Rule, leaf, name: str) -> np.ndarray:
    """One HF tensor in the leaf's (per-layer) shape and dtype."""
    block = rule.to_jax(reader.read(name, rule.part, rule.parts), leaf.shape[rule.stacked :])
    return block.astype(np.dtype(leaf.dtype), copy=False)  # no second copy when the dtype matches


def _layer_blocks(reader, rule: hf_params.Rule, leaf, sharding: NamedSharding, num_layers: int):
    """Yields a stacked leaf's layers one at a time, each placed on the mesh (the host holds
    one layer at a time)."""
    layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    for name in rule.names(num_layers):
        yield jax.device_put(_read_block(reader, rule, leaf, name), layer_sharding).block_until_ready()


def _read_leaf(reader, rule: hf_params.Rule, leaf, sharding: NamedSharding, num_layers: int) -> jax.Array:
    if not rule.stacked:
        return jax.device_put(_read_block(reader, rule, leaf, rule.name), sharding).block_until_ready()
    # The stacked leaf lives only on the mesh.
    stacked = jnp.zeros(leaf.shape, np.dtype(leaf.dtype), device=sharding)
    set_layer = _layer_setter(sharding)
    for i, layer in enumerate(_layer_blocks(reader, rule, leaf, sharding, num_layers)):
        # Dispatch is asynchronous: without waiting, the loop runs ahead and keeps
        # several layers' host buffers alive at once.
        stacked = set_layer(stacked, layer, i).block_until_ready()
    return stacked


@functools.cache
def _layer_setter(sharding: NamedSharding):
    """`stacked[i] = layer` in place (the stacked buffer is donated, never copied)."""

    def set_layer(stacked: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)

    return jax.jit(set_layer, out_shardings=sharding, donate_argnums=0)


# ----------------------------------------------------------------------------- run dirs


def import_hf(
    hf_dir: str | pathlib.Path,
    out_run_dir: str | pathlib.Path,
    *,
    dtype: str = "float32",
    mesh: Mesh | None = None,
) -> Config:
    """Writes a jaxgen run directory (config, checkpoint, tokenizer) from an HF directory.

    Returns:
        the Config written to the run directory.
    """

    hf_dir = pathlib.Path(hf_dir)
    config, params, _ = load_hf(hf_dir, dtype=dtype, mesh=mesh)
    with hf_files.staged_dir(out_run_dir) as tmp:
        _copy_tokenizer(hf_dir, tmp)
        if (hf_dir / GENERATION_CONFIG).exists():
            shutil.copy2(hf_dir / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        save_params(tmp, config, params, step=0)
    return config


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
    """Copies whichever HF tokenizer files `src` has; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def export_hf(
    run_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    step: int | None = None,
    load=load_params,
) -> list[str]:
    """Writes an HF directory that `transformers` `from_pretrained` loads.

    Args:
        load: `(run_dir, step=) -> (Config, params)`; the CLI passes the fine-tuning
            reader that merges a LoRA run's adapters (train/ sits above this package).
    Returns:
        the names of the files written.
    """

    run_dir = pathlib.Path(run_dir)
    config, params = load(run_dir, step=step)
    bos, eos = _special_ids(run_dir)
    return write_hf(
        out_dir,
        config.model,
        params,
        bos_id=bos,
        eos_id=eos,
        max_shard_bytes=max_shard_bytes,
        extra_from=run_dir,
    )


def write_hf(
    out_dir,
    model: ModelConfig,
    params,
    *,
    bos_id=None,
    eos_id=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_from: pathlib.Path | None = None,
) -> list[str]:
    """Writes config.json, generation_config.json and the safetensors for `params`."""
    if model.family == "gpt2" and not (model.use_attention_bias and model.use_mlp_bias):
        raise JaxgenError(
            "model: GPT2LMHeadModel always has biases; attention_bias/mlp_bias=false cannot be exported"
        )
    hf = hf_config.hf_config(model, bos_id=bos_id, eos_id=eos_id)
    rule_list = hf_params.rules(model)
    by_name = _rules_by_name(model, rule_list)
    dtype = np.dtype(jnp.dtype(model.param_dtype))
    shapes = {name: (group[0][1].full_shape, dtype) for name, group in by_name.items()}

    def tensor(name: str) -> np.ndarray:
        blocks = [rule.to_hf(_host(_lookup(params, rule.path), i)) for i, rule in by_name[name]]
        return np.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]

    with hf_files.staged_dir(out_dir) as tmp:
        files = hf_files.write_checkpoint(tmp, shapes, tensor, max_shard_bytes) + [CONFIG, GENERATION_CONFIG]
        _write_json(tmp / CONFIG, hf)
        _write_json(tmp / GENERATION_CONFIG, {"bos_token_id": bos_id, "eos_token_id": eos_id})
        if extra_from is not None:
            files += _copy_tokenizer(extra_from, tmp)
    return sorted(files)


def _rules_by_name(model: ModelConfig, rule_list: list[hf_params.Rule]) -> dict[str, list]:
    """HF tensor name -> [(layer index or None, rule), ...] with fused parts in order."""
    by_name: dict[str, list] = {}
    for rule in rule_list:
        for i, name in enumerate(rule.names(model.num_layers)):
            by_name.setdefault(name, []).append((i if rule.stacked else None, rule))
    for group in by_name.values():
        group.sort(key=lambda item: item[1].part)
    return dict(sorted(by_name.items()))


def _host(leaf: jax.Array, layer: int | None) -> np.ndarray:
    return np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))


def _special_ids(run_dir: pathlib.Path) -> tuple[int | None, int | None]:
    """bos/eos ids: from an imported generation_config.json, else the run's tokenizer."""
    if (run_dir / GENERATION_CONFIG).exists():
        gen = hf_config.read_json(run_dir / GENERATION_CONFIG)
        return gen.get("bos_token_id"), gen.get("eos_token_id")
    tokenizer = find_tokenizer(run_dir)
    if tokenizer is None:
        return None, None
    valid = lambda i: i if isinstance(i, int) and i >= 0 else None
    return valid(tokenizer.bos_id), valid(tokenizer.eos_id)


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
