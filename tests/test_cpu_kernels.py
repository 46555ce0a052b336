"""The CPU weight-streaming matmul (runtime/weight_matmul.cc) against numpy, and its fallback."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxgen.runtime import cpu_kernels


def test_the_kernel_builds_wherever_a_compiler_is_found():
    # The suite's machines have g++: there the kernel must build, or every quantized test
    # below would silently run XLA's path instead.
    if cpu_kernels._compiler() is None:
        assert not cpu_kernels.available() and "compiler" in cpu_kernels.unavailable_reason()
    else:
        assert cpu_kernels.available(), cpu_kernels.unavailable_reason()


def _check_against_float64(dtype, layout, m, k, n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(m, k)).astype(np.float32)
    if dtype == "int8":
        w = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    else:
        w = rng.normal(size=(k, n)).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    scale = rng.uniform(0.5, 2.0, size=(n,)).astype(np.float32)
    expected = (x.astype(np.float64) @ w.astype(np.float64)) * scale
    stored = w if layout == "kn" else np.ascontiguousarray(w.T)
    got = jax.jit(cpu_kernels.weight_matmul, static_argnums=3)(x, jnp.asarray(stored), scale, layout)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
    if dtype == "int8" and cpu_kernels.rounds_activations(layout):
        check_int16_rows(np.asarray(got), x, w, scale)


def check_int16_rows(got, x, w, scale):
    """Where the build rounds activation rows to int16, its integer sums are exact: the
    result is q @ w (in int64) times the row's and the column's scale, up to float32
    rounding of partial sums (a few ulps of the terms' magnitudes summed)."""
    q, s = cpu_kernels.int16_rows(x)
    q, w, s = q.astype(np.int64), np.asarray(w, np.int64), s.astype(np.float64)
    exact = (q @ w) * s * scale
    size = (np.abs(q) @ np.abs(w)) * s * scale
    assert np.all(np.abs(got - exact) <= 1e-6 * size), np.abs(got - exact).max()


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("m", [1, 5, 11])
def test_weight_matmul_equals_float32_matmul(dtype, layout, m):
    # N = 1100 spans several column tasks and a short last one; K x N int8 is 563 KB, over
    # the size where the thread pool's helpers join; m = 1 and 5 split the [K, N] weights
    # by rows between tasks, m = 11 by columns, in groups of 6 rows.
    _check_against_float64(dtype, layout, m, k=512, n=1100)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("m", [1, 3])
def test_long_rows_and_ragged_tails(dtype, layout, m):
    # K = 2100 ends the [N, K] paths on a partial piece of 32 (masked loads, zero padding);
    # N = 70 ends the [K, N] tiles on a partial 16.
    _check_against_float64(dtype, layout, m, k=2100, n=70)


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_integer_sums_hold_the_worst_case_row(layout):
    # The worst case for the int8 paths that round activations to int16, at the [N, K]
    # kernel's longest row: every activation rounds to 32767 and every weight is 127 (kept
    # below 2^31 only by splitting the sums; [K, N] moves them to float32 every 512 rows).
    k = 16384
    x = np.ones((1, k), np.float32)
    w = np.full((8, k) if layout == "nk" else (k, 8), 127, np.int8)
    got = jax.jit(cpu_kernels.weight_matmul, static_argnums=(2, 3))(x, jnp.asarray(w), None, layout)
    np.testing.assert_allclose(np.asarray(got), np.full((1, 8), 127.0 * k), rtol=1e-6)


def test_infinite_activations_give_infinities_as_xla_does():
    # The [N, K] path rounds activation rows to integers by their largest value; a row with
    # an inf falls back to float arithmetic instead of rounding everything to 0.
    x = np.ones((2, 64), np.float32)
    x[1, 3] = np.inf
    w = np.ones((64, 40), np.int8)
    for layout, stored in (("kn", w), ("nk", np.ascontiguousarray(w.T))):
        got = np.asarray(
            jax.jit(cpu_kernels.weight_matmul, static_argnums=(2, 3))(x, jnp.asarray(stored), None, layout)
        )
        np.testing.assert_array_equal(got[0], np.full(40, 64.0, np.float32))
        assert np.all(np.isposinf(got[1])), (layout, got[1])


def test_no_scale_means_one():
    x = jnp.ones((2, 8), jnp.float32)
    w = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3).astype(jnp.bfloat16)
    got = jax.jit(cpu_kernels.weight_matmul, static_argnums=(2, 3))(x, w, None, "kn")
    np.testing.assert_array_equal(np.asarray(got), np.tile(np.arange(24).reshape(8, 3).sum(0), (2, 1)))


def test_without_a_compiler_the_kernel_is_off_and_says_why(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cpu_kernels._load.cache_clear()
    try:
        assert not cpu_kernels.available()
        assert cpu_kernels.unavailable_reason() == "no C++ compiler found (set CXX)"
    finally:
        monkeypatch.undo()
        cpu_kernels._load.cache_clear()


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("JAXGEN_CPU_KERNELS", "0")
    cpu_kernels._load.cache_clear()
    try:
        assert not cpu_kernels.available() and "JAXGEN_CPU_KERNELS=0" in cpu_kernels.unavailable_reason()
    finally:
        monkeypatch.undo()
        cpu_kernels._load.cache_clear()


def test_an_unwritable_cache_dir_falls_back_to_the_temp_dir(monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE_DIR", "/proc/jaxgen-cache")  # nothing can be created under /proc
    cpu_kernels._load.cache_clear()
    try:
        assert cpu_kernels.available() or cpu_kernels._compiler() is None, cpu_kernels.unavailable_reason()
    finally:
        monkeypatch.undo()
        cpu_kernels._load.cache_clear()


@pytest.mark.parametrize(
    "march, build, rounds", [("x86-64-v3", "tiled", True), ("x86-64-v2", "portable", False)]
)
def test_the_other_builds_match_numpy(tmp_path, march, build, rounds):
    # The suite runs the build of its machine's CPU; the others are built here in a child
    # process by a compiler wrapper that asks for AVX2 (x86-64-v3: int8 with int16
    # activations, float32 and bfloat16 in 8-lane register tiles) or SSE4 only (x86-64-v2:
    # the plain loops), into a cache of its own, and checked against numpy.
    if cpu_kernels._compiler() is None:
        assert not cpu_kernels.available()
        return
    wrapper = tmp_path / "cxx"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"# the machine's compiler with -march=native replaced by {march}\n"
        f'for a in "$@"; do shift; [ "$a" = -march=native ] && a=-march={march}; set -- "$@" "$a"; done\n'
        f'exec {cpu_kernels._compiler()} "$@"\n'
    )
    wrapper.chmod(0o755)
    script = """
import jax, jax.numpy as jnp, numpy as np
from jaxgen.runtime import cpu_kernels
from test_cpu_kernels import check_int16_rows
rng = np.random.default_rng(0)
x = rng.normal(size=(3, 200)).astype(np.float32)
w = rng.integers(-127, 128, size=(200, 70)).astype(np.int8)
matmul = jax.jit(cpu_kernels.weight_matmul, static_argnums=(2, 3))
for layout, stored in (("kn", w), ("nk", np.ascontiguousarray(w.T))):
    got = np.asarray(matmul(x, jnp.asarray(stored), None, layout))
    if cpu_kernels.rounds_activations(layout):
        check_int16_rows(got, x, w, np.float32(1))
    else:
        np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-3)
# Tiles: the plain loops' sums, read from the tiles (a 1024-column task spans 8 tiles).
x = rng.normal(size=(3, 48)).astype(np.float32)
w = jnp.asarray(rng.integers(-127, 128, size=(48, 1280)).astype(np.int8))
for rows in (x[:1], x):
    plain = np.asarray(matmul(rows, w, None, "kn"))
    np.testing.assert_array_equal(np.asarray(matmul(rows, cpu_kernels.to_tiles(w), None, "kn_tiles")), plain)
# float32 and bfloat16: tiles give the plain layout's bits (both in register tiles on
# AVX2; N = 1280 is 16 tiles, N = 200 ends on a ragged 8), and numpy's result to float32
# reordering; 1, 3 and 7 rows take 1 x 8, 3 x 4 and 6 x 2 + 1 x 8 vector tiles, 40 the GEMM
# order; up to 6 rows split the weight rows between threads, more the columns.
for dtype in (np.float32, jnp.bfloat16):
    x = rng.normal(size=(40, 64)).astype(np.float32)
    for n in (1280, 200):
        w = jnp.asarray(rng.normal(size=(64, n)), dtype)
        for rows in (x[:1], x[:3], x[:7], x):
            plain = np.asarray(matmul(rows, w, None, "kn"))
            want = rows.astype(np.float64) @ np.asarray(w, np.float64)
            np.testing.assert_allclose(plain, want, rtol=1e-4, atol=1e-4)
            if n % 128 == 0:
                tiled = matmul(rows, cpu_kernels.to_tiles(w), None, "kn_tiles")
                np.testing.assert_array_equal(np.asarray(tiled), plain)
            for i in range(len(rows) if len(rows) <= 6 else 0):  # nor on its batch, up to 6 rows
                np.testing.assert_array_equal(np.asarray(matmul(rows[i : i + 1], w, None, "kn"))[0], plain[i])
# [N, K] (the head): K = 203 ends each row on a ragged 3 (summed one by one on AVX2);
# numpy's result, and a row's bits in any batch.
for dtype in (np.float32, jnp.bfloat16):
    x = rng.normal(size=(7, 203)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(70, 203)), dtype)
    got = np.asarray(matmul(x, w, None, "nk"))
    np.testing.assert_allclose(got, x.astype(np.float64) @ np.asarray(w, np.float64).T, rtol=1e-4, atol=1e-4)
    for i in range(len(x)):
        np.testing.assert_array_equal(np.asarray(matmul(x[i : i + 1], w, None, "nk"))[0], got[i])
import ctypes, glob, os
(built,) = glob.glob(os.path.join(os.environ["JAXGEN_CACHE_DIR"], "kernels", "*.so"))
build = "tiled" if ctypes.CDLL(built).JaxgenTiledKernels() else "portable"
print(build, cpu_kernels.rounds_activations("kn"))
"""
    env = {
        **os.environ,
        "CXX": str(wrapper),
        "JAXGEN_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"{build} {rounds}"


def test_tiles_are_16_by_128_blocks_in_row_major_order():
    w = np.arange(32 * 256, dtype=np.int32).reshape(32, 256)
    tiles = np.asarray(cpu_kernels.to_tiles(jnp.asarray(w))).reshape(-1)
    # First tile: rows 0-15, columns 0-127, row by row; then the tile to its right.
    np.testing.assert_array_equal(tiles[:128], w[0, :128])
    np.testing.assert_array_equal(tiles[128:256], w[1, :128])
    np.testing.assert_array_equal(tiles[16 * 128 : 16 * 128 + 128], w[0, 128:])
    np.testing.assert_array_equal(tiles[2 * 16 * 128 : 2 * 16 * 128 + 128], w[16, :128])
    np.testing.assert_array_equal(cpu_kernels.from_tiles(cpu_kernels.to_tiles(jnp.asarray(w))), w)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize(
    "m, k, n",
    [(1, 768, 384), (5, 768, 384), (11, 768, 384), (1, 48, 256), (5, 48, 256), (11, 48, 256),
     (64, 48, 8192), (5, 256, 8192)],
)  # fmt: skip
def test_tiled_weights_give_the_plain_layouts_result(dtype, m, k, n):
    # The same sums in the same order, only read from elsewhere: equal to the last bit.
    # 768 x 384 int8 (295 KB) brings in the pool's helpers; K = 48 splits into a 32-row and
    # a 16-row task; m = 11 splits by columns (whole 128-column tiles per task). The last
    # two take the GEMM order (a task's sums over 128 KB) over several 16-row blocks, with
    # the 2 to 8 threads of this suite's pool: split by columns, and by rows into partial sums.
    # That is the AVX-512 build; the portable build (other CPUs) sweeps each tile column
    # with its plain loops, and the same holds.
    assert cpu_kernels.available() or cpu_kernels._compiler() is None
    rng = np.random.default_rng(1)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    if dtype != "int8":
        w = rng.normal(size=(k, n)).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    w = jnp.asarray(w)
    scale = rng.uniform(0.5, 2.0, size=(n,)).astype(np.float32)
    matmul = jax.jit(cpu_kernels.weight_matmul, static_argnums=3)
    plain = np.asarray(matmul(x, w, scale, "kn"))
    np.testing.assert_array_equal(np.asarray(matmul(x, cpu_kernels.to_tiles(w), scale, "kn_tiles")), plain)
    expected = (x.astype(np.float64) @ np.asarray(w, np.float64)) * scale
    np.testing.assert_allclose(plain, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())


def test_tiles_of_a_shape_without_whole_tiles_are_refused():
    w = jnp.zeros((48, 200), jnp.int8)
    with pytest.raises(Exception, match="tiles need K % 16 == 0 and N % 128 == 0"):
        jax.block_until_ready(cpu_kernels.weight_matmul(jnp.ones((1, 48)), w, None, "kn_tiles"))
