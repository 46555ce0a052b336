"""Reading and writing Hugging Face safetensors checkpoints, one tensor at a time.

A checkpoint is either `model.safetensors` or `model.safetensors.index.json` naming
several shard files. Reading goes through `safetensors.safe_open` (memory-mapped,
numpy, no torch): only the header is parsed up front, and each tensor is read when
asked for, so the host never holds more than the tensor being converted.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import safetensors
import safetensors.numpy

from jaxgen.convert.hf_config import read_json
from jaxgen.errors import JaxgenError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# safetensors dtype strings -> numpy dtypes (bfloat16 through ml_dtypes, which jax ships).
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class SafetensorsReader:
    """The tensors of one HF checkpoint directory, read lazily by name.

    Headers (names, shapes, dtypes) are read once; each `read` maps the file only
    for as long as it copies one tensor out, so pages already converted do not stay
    resident (a file kept mapped would grow the process by the whole checkpoint).
    """

    def __init__(self, hf_dir: str | pathlib.Path):
        self.dir = pathlib.Path(hf_dir)
        self._files = _weight_map(self.dir)  # tensor name -> file name
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, stored dtype)
        for file in sorted(set(self._files.values())):
            with self._open(file) as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    self._info[name] = (tuple(view.get_shape()), view.get_dtype())
        absent = sorted(n for n in self._files if n not in self._info)
        if absent:
            raise JaxgenError(f"{self.dir / INDEX}: {absent[0]} is not in {self._files[absent[0]]}")

    def _open(self, file: str):
        return open_safetensors(self.dir / file)

    def names(self) -> list[str]:
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> str:
        """The stored dtype as a numpy dtype name (float32, bfloat16, ...)."""
        stored = self._info[name][1]
        if stored not in _DTYPES:
            raise JaxgenError(f"{self.dir / self._files[name]}: {name}: unsupported dtype {stored}")
        return _DTYPES[stored]

    def read(self, name: str, part: int = 0, parts: int = 1) -> np.ndarray:
        """One tensor, or block `part` of `parts` equal blocks of its last axis."""
        self.dtype(name)  # rejects integer/bool tensors with a clear line
        shape = self.shape(name)
        with self._open(self._files[name]) as f:
            if parts == 1:
                return f.get_tensor(name)
            width = shape[-1] // parts
            index = (slice(None),) * (len(shape) - 1) + (slice(part * width, (part + 1) * width),)
            return f.get_slice(name)[index]


@contextlib.contextmanager
def open_safetensors(path: pathlib.Path):
    """`safe_open` (numpy) with a one-line error naming the file when it is not safetensors."""
    try:
        handle = safetensors.safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises several types for a bad header
        raise JaxgenError(f"{path}: cannot read safetensors ({e})") from None
    with handle as f:
        yield f


def _weight_map(hf_dir: pathlib.Path) -> dict[str, str]:
    if (hf_dir / INDEX).exists():
        index = read_json(hf_dir / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise JaxgenError(f"{hf_dir / INDEX}: weight_map: missing or empty")
        for file in weight_map.values():
            # A shard is a file of this directory: a path in the index ("../x", "/x") could
            # make a downloaded model read any file of the machine.
            if not isinstance(file, str) or pathlib.PurePath(file).name != file or file in (".", ".."):
                raise JaxgenError(f"{hf_dir / INDEX}: weight_map: {file!r} is not a file name in {hf_dir}")
        for file in sorted(set(weight_map.values())):
            if not (hf_dir / file).is_file():
                raise JaxgenError(f"{hf_dir / INDEX}: shard {file} not found in {hf_dir}")
        return dict(weight_map)
    if (hf_dir / SINGLE).exists():
        with open_safetensors(hf_dir / SINGLE) as f:
            return dict.fromkeys(f.keys(), SINGLE)
    if not hf_dir.is_dir():
        raise JaxgenError(f"{hf_dir}: not a directory")
    hint = (
        " (pytorch_model.bin is a pickle and is not read: resave with safetensors)"
        if any(hf_dir.glob("pytorch_model*.bin"))
        else ""
    )
    raise JaxgenError(f"{hf_dir}: no {SINGLE} or {INDEX}{hint}")


# ----------------------------------------------------------------------------- writing


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Groups tensors (in the given order) into files of at most `max_shard_bytes`.

    A tensor larger than the limit gets a file of its own (as transformers does).
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_checkpoint(
    out_dir: pathlib.Path,
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
    tensor: Callable[[str], np.ndarray],
    max_shard_bytes: int,
) -> list[str]:
    """Writes `model.safetensors`, or numbered shards plus the index above the limit.

    Args:
        out_dir: an existing directory (the caller renames it into place when done).
        shapes: HF tensor name -> (shape, dtype), in file order.
        tensor: makes one tensor by name; called once per name, one shard at a time.
        max_shard_bytes: the largest shard file wanted.
    Returns:
        the files written.
    """
    sizes = [(n, math.prod(s) * np.dtype(d).itemsize) for n, (s, d) in shapes.items()]
    shards = plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        files = [SINGLE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards, strict=True):
        # transformers refuses safetensors files whose metadata lacks format=pt.
        safetensors.numpy.save_file({n: tensor(n) for n in names}, out_dir / file, metadata={"format": "pt"})
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(size for _, size in sizes)},
            "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
        }
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        files.append(INDEX)
    return files


@contextlib.contextmanager
def staged_dir(out_dir: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary sibling of `out_dir`, renamed to it only when the block succeeds.

    `out_dir` must not exist or be empty, so no half-written or mixed output remains.
    """

    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JaxgenError(f"{out}: already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
