"""The weight-streaming CPU kernel (jaxgen/runtime/weight_matmul.cc) alone, over one decode
step's matmuls at GPT-2 124M: 12 layers of q/k/v, output, fc and projection weights ([K, N],
in the kernel's tiles where it reads them, as decoding stores them)
and the tied 50257 x 768 head ([N, K]), every array distinct so that they stream from memory
as in decoding, against a max pass over the same arrays (the floor `jaxgen bench generate
--weights` uses); for float32, XLA's dots on the plain layout instead (the kernel's float32
in tiles against XLA: `benchmarks/cpu_kernel_rows.py f32`). Each is one jitted call;
the contenders take turns within each round (this machine is shared and noisy), and the
ratios are taken per round. Random weights.

    .venv/bin/python benchmarks/cpu_kernel_step.py int8|bf16|f32 [M ...]   # M: activation rows (1 5)
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.runtime import cpu_kernels

ROUNDS, CALLS = 5, 7


def main(dtype: str, rows: list[int]) -> None:
    rng = np.random.default_rng(0)

    def make(shape):
        if dtype == "int8":
            return jnp.asarray(rng.integers(-127, 127, shape, dtype=np.int8))
        weights = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        return weights.astype(jnp.bfloat16) if dtype == "bf16" else weights

    layer = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    weights = [make(shape) for _ in range(12) for shape in layer] + [make((50257, 768))]
    layouts = ["kn"] * (len(weights) - 1) + ["nk"]
    if dtype != "f32" and cpu_kernels.reads_tiles():  # the layout decoding stores them in (model/quant.py)
        weights = [
            cpu_kernels.to_tiles(w) if layout == "kn" else w
            for w, layout in zip(weights, layouts, strict=True)
        ]
        layouts = ["kn_tiles" if layout == "kn" else layout for layout in layouts]
    total_bytes = sum(w.nbytes for w in weights)

    def chain(matmul):
        def step(x, weights):
            total = 0.0
            for layout, w in zip(layouts, weights, strict=True):
                k = w.shape[1] if layout == "nk" else w.shape[0]
                inputs = x if k == x.shape[1] else jnp.tile(x, (1, k // x.shape[1]))
                total = total + matmul(inputs, w, layout)[:, :8].sum()
            return total

        return jax.jit(step)

    kernel = chain(lambda x, w, layout: cpu_kernels.weight_matmul(x, w, None, layout))
    xla = chain(lambda x, w, layout: x @ w.astype(x.dtype).T if layout == "nk" else x @ w.astype(x.dtype))
    floor = jax.jit(lambda weights: sum(jnp.max(w) for w in weights))

    def timed(f, *args):
        times = []
        for _ in range(CALLS):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    for m in rows:
        x = jnp.asarray(rng.standard_normal((m, 768), dtype=np.float32))
        # float32 weights are XLA's (the kernel takes narrow ones): its dots against the floor.
        contenders = {
            "XLA's dots" if dtype == "f32" else "kernel": (xla if dtype == "f32" else kernel, (x, weights))
        }
        contenders["max pass"] = (floor, (weights,))
        for f, args in contenders.values():
            jax.block_until_ready(f(*args))  # compile and warm
        seconds = {name: [] for name in contenders}
        for r in range(ROUNDS):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                f, args = contenders[name]
                seconds[name].append(timed(f, *args))
        floor_s = np.array(seconds["max pass"])
        for name, values in seconds.items():
            values = np.array(values)
            ratios = values / floor_s
            print(
                f"{dtype} M={m} {name}: {np.median(values) * 1e3:.2f} ms "
                f"({total_bytes / np.median(values) / 1e9:.1f} GB/s), per round vs max pass "
                f"{', '.join(f'{v:.2f}' for v in ratios)} (median {np.median(ratios):.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "int8", [int(a) for a in sys.argv[2:]] or [1, 5])
