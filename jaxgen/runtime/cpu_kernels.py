"""CPU kernels XLA lacks, as FFI custom calls: the weight-streaming matmul of weight_matmul.cc
and the decoding attention over the KV cache of cache_attention.cc.

XLA:CPU multiplies by int8 or bfloat16 weights by converting them at ~1-1.5 GB/s inside
its dots, so narrow weights decode no faster than float32 (benchmarks/RESULTS.md).
`weight_matmul` reads each weight byte once instead. `cache_attention` reads a layer of
the stacked KV cache in place, where XLA's dots copy it out first. The C++ sources ship
with the package and are compiled into one library on first use with the machine's C++
compiler (`CXX`, default g++, then c++ and clang++) against jaxlib's FFI headers, tuned for this CPU
(`-march=native`), into a cache directory (`JAXGEN_CACHE_DIR`, default
~/.cache/jaxgen): one compile of ~10 s per jaxlib version and CPU, shared by every
later process. Without a compiler `available()` is False and callers keep XLA's dots.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_SOURCES = tuple(
    pathlib.Path(__file__).with_name(name) for name in ("weight_matmul.cc", "cache_attention.cc")
)
_HEADERS = (pathlib.Path(__file__).with_name("parallel.h"),)
_ATTENTION = "JaxgenCacheAttention"  # cache_attention.cc
_TARGETS = {  # (layout, weight dtype) -> FFI symbol in weight_matmul.cc
    ("kn", "int8"): "JaxgenMatmulKnS8",
    ("nk", "int8"): "JaxgenMatmulNkS8",
    ("kn_tiles", "int8"): "JaxgenMatmulKnTilesS8",
    ("kn", "bfloat16"): "JaxgenMatmulKnBF16",
    ("nk", "bfloat16"): "JaxgenMatmulNkBF16",
    ("kn_tiles", "bfloat16"): "JaxgenMatmulKnTilesBF16",
    ("kn", "float32"): "JaxgenMatmulKnF32",
    ("nk", "float32"): "JaxgenMatmulNkF32",
    ("kn_tiles", "float32"): "JaxgenMatmulKnTilesF32",
}
# The "kn_tiles" layout of a [K, N] weight: its 16 x 128 tiles, each row-major, the tiles
# row-major (weight_matmul.cc's kTileRows, kTileCols). The AVX-512 kernels then read a block
# of 16 rows as one stream (a 768-wide int8 weight: 9-10 -> 17-18 GB/s on one core there).
TILE = (16, 128)
_registered = False  # whether this process has handed the kernels to XLA
_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp-simd", "-w"]


def _cpu_signature() -> str:
    """What `-march=native` compiled for: a cache shared between machines must not hand
    one CPU's instructions to another."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("JAXGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxgen")
    return pathlib.Path(root) / "kernels"


def _writable(folder: pathlib.Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _build(compiler: str) -> pathlib.Path:
    """The compiled library, built once per (source, jaxlib, CPU); raises on failure."""
    key = hashlib.sha256(
        b"\0".join(
            [
                *(path.read_bytes() for path in _SOURCES + _HEADERS),
                importlib.metadata.version("jaxlib").encode(),
                _cpu_signature().encode(),
                compiler.encode(),
            ]
        )
    ).hexdigest()[:16]
    name = f"weight_matmul-{key}.so"
    # The cache, or the temp dir where it cannot be written (a read-only home: per boot
    # instead of for good).
    folders = (_cache_dir(), pathlib.Path(tempfile.gettempdir()) / "jaxgen-kernels")
    built = next((folder / name for folder in folders if (folder / name).exists()), None)
    if built is not None:
        return built
    target = next((folder / name for folder in folders if _writable(folder)), None)
    if target is None:
        raise RuntimeError(f"no writable folder for the library ({', '.join(map(str, folders))})")
    # Built under a temporary name and renamed: concurrent first uses (test workers, the
    # processes of one job) never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        base = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp]
        done = subprocess.run([*base[:1], "-march=native", *base[1:]], capture_output=True, text=True)
        if done.returncode != 0:  # a compiler without -march=native (some clang builds)
            done = subprocess.run(base, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, registered with XLA, or None; why not when it is None)."""
    if os.environ.get("JAXGEN_CPU_KERNELS", "1") == "0":
        return None, "turned off (JAXGEN_CPU_KERNELS=0)"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"the CPU kernels did not build: {e}"
    global _registered
    if not _registered:  # XLA keeps a process's first registration (a second one is an error)
        for symbol in (*_TARGETS.values(), _ATTENTION):
            jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _registered = True
    return library, ""


def available() -> bool:
    """Whether `weight_matmul` runs the compiled kernel (CPU backend, compiler present)."""
    return jax.default_backend() == "cpu" and _load()[0] is not None


def reads_tiles() -> bool:
    """Whether the kernel has register tiles (the AVX-512 build; float32 and bfloat16 on the
    AVX2 build): serving then stores weights in "kn_tiles", which they read as one stream,
    and a float32 head scoring a few rows goes through the kernel, faster there than XLA's
    dot (the portable loops were slower at every row count: benchmarks/cpu_head_rows.py).
    (The portable loops read tiles too, the same sums as the plain layout, so that tiled
    weights run anywhere.)"""
    return available() and bool(_load()[0].JaxgenTiledKernels())


def attends_in_blocks(head_dim: int) -> bool:
    """Whether `cache_attention` takes 16 slots at a time for this head size (the AVX-512
    build, head sizes 16, 32, 64 and 128), rather than one slot at a time."""
    return available() and bool(_load()[0].JaxgenAttentionBlocks(head_dim))


def rounds_activations(layout: str) -> bool:
    """Whether int8 weights in `layout` ("kn", "kn_tiles", "nk") multiply activation rows
    rounded to int16, each by its own max|x| / 32767, in this build: the AVX2 build for
    every layout, the AVX-512 build for the [N, K] head (its dot-product instructions).
    Results then differ from float32 arithmetic by at most half a step per activation,
    times the weights' absolute sum."""
    bit = 2 if layout == "nk" else 1
    return available() and bool(_load()[0].JaxgenInt16Activations() & bit)


def int16_rows(x):
    """x [M, K] float32 as the kernel rounds it for `rounds_activations` layouts: (q, s),
    int16-valued float32 q [M, K] and a scale s [M, 1] with x ~ q * s, computed with the
    same float32 operations as weight_matmul.cc's MakeNarrowRows (numpy, for tests)."""
    x = np.asarray(x, np.float32)
    top = np.abs(x).max(-1, keepdims=True)
    s = np.where(top > 0, top / np.float32(32767), np.float32(1)).astype(np.float32)
    return np.clip(np.rint(x * (np.float32(1) / s)), -32767, 32767).astype(np.float32), s


def tileable(k: int, n: int) -> bool:
    """Whether a [K, N] weight has whole tiles."""
    return k % TILE[0] == 0 and n % TILE[1] == 0


def to_tiles(w: jax.Array, k: int | None = None) -> jax.Array:
    """`w` read as [K, N] (K: the size of its leading input dims, default its first dim) ->
    the same shape holding the "kn_tiles" order (see TILE)."""
    k = w.shape[0] if k is None else k
    (r, c), n = TILE, w.size // k
    return w.reshape(k // r, r, n // c, c).transpose(0, 2, 1, 3).reshape(w.shape)


def from_tiles(w: jax.Array, k: int | None = None) -> jax.Array:
    """The inverse of `to_tiles`."""
    k = w.shape[0] if k is None else k
    (r, c), n = TILE, w.size // k
    return w.reshape(k // r, n // c, r, c).transpose(0, 2, 1, 3).reshape(w.shape)


def unavailable_reason() -> str:
    return "" if available() else (_load()[1] or f"backend is {jax.default_backend()}, not cpu")


def weight_matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None, layout: str) -> jax.Array:
    """x [M, K] float32 @ w (int8 or bfloat16; [K, N] for layout "kn", the same in tiles for
    "kn_tiles" (`to_tiles`), [N, K] for "nk"; or float32 in any of them), times `scale`
    [N] (None: 1), as float32 [M, N], where `available()`."""
    if not available():  # also what hands the kernels to XLA in this process
        raise RuntimeError(f"weight_matmul: {unavailable_reason()}")
    dtype = jnp.dtype(w.dtype).name
    if (layout, dtype) not in _TARGETS:
        raise ValueError(f"weight_matmul: no kernel for {layout} {dtype} weights")
    n = w.shape[0] if layout == "nk" else w.shape[1]
    scale = jnp.ones((n,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS[layout, dtype], out)(x.astype(jnp.float32), w, scale)


def cache_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, layer: jax.Array | int
) -> jax.Array:
    """Attention of q [B, T, N, H] over layer `layer` of the stacked cache `keys`, `values`
    [L, B, K, S, H] (N = K * G), where mask [B, T, S] (bool) lets a query see a slot: float32
    [B, T, N, H], as `jaxgen.model.attention.cached_attention` computes from that layer's
    slices (scores scaled by 1/sqrt(H), softmax, masked slots weighing nothing), where
    `available()`. All of q, keys and values float32."""
    if not available():
        raise RuntimeError(f"cache_attention: {unavailable_reason()}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    layer = jnp.asarray(layer, jnp.int32)
    return jax.ffi.ffi_call(_ATTENTION, out)(q, keys, values, mask.astype(bool), layer)
