"""The CPU kernel on [K, N] weights in its tiles against XLA's dot on the same weights as
float32, per number of activation rows M: COUNT distinct matrices (8 by default; enough
that together they outgrow the 32 MB L3 and stream from memory), ms per matrix, median of
5 rounds of 10 calls alternating the order; and the largest difference relative to the
largest output.

    .venv/bin/python benchmarks/cpu_kernel_rows.py int8|bf16|f32 1,5,64,512 [768x3072 [COUNT]]
    .venv/bin/python benchmarks/cpu_kernel_rows.py f32 1,2,3,5,6,9 512x1408 24
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.runtime import cpu_kernels

dtype = sys.argv[1]
ms = [int(a) for a in sys.argv[2].split(",")]
shape = tuple(int(a) for a in sys.argv[3].split("x")) if len(sys.argv) > 3 else (768, 3072)
count = int(sys.argv[4]) if len(sys.argv) > 4 else 8
rng = np.random.default_rng(0)


def make():
    w = rng.standard_normal(shape, dtype=np.float32)
    if dtype == "int8":
        return jnp.asarray(np.clip(np.round(w * 40), -127, 127).astype(np.int8))
    return jnp.asarray(w).astype(jnp.bfloat16) if dtype == "bf16" else jnp.asarray(w)


ws = [make() for _ in range(count)]
tiles = [cpu_kernels.to_tiles(w) for w in ws]
wf = [w.astype(jnp.float32) for w in ws]
scale = jnp.ones((shape[1],), jnp.float32)
kern = jax.jit(
    lambda x, ws: [
        cpu_kernels.weight_matmul(x, w, scale if dtype == "int8" else None, "kn_tiles") for w in ws
    ]
)
xla = jax.jit(lambda x, ws: [x @ w for w in ws])
out = {}
for m in ms:
    x = jnp.asarray(rng.standard_normal((m, shape[0]), dtype=np.float32))
    a, b = kern(x, tiles), xla(x, wf)
    err = max(
        float(jnp.max(jnp.abs(p - q)) / (jnp.max(jnp.abs(q)) + 1e-9)) for p, q in zip(a, b, strict=True)
    )
    t = {"kernel": [], "xla": []}
    for r in range(5):
        for name in ("kernel", "xla") if r % 2 == 0 else ("xla", "kernel"):
            f, arg = (kern, tiles) if name == "kernel" else (xla, wf)
            s = time.perf_counter()
            for _ in range(10):
                got = f(x, arg)
            jax.block_until_ready(got)
            t[name].append((time.perf_counter() - s) / (10 * count) * 1e3)
    out[m] = (statistics.median(t["kernel"]), statistics.median(t["xla"]), err)
print(
    json.dumps(
        {"dtype": dtype, **{str(m): [round(v, 3) for v in out[m][:2]] + [f"{out[m][2]:.1e}"] for m in ms}}
    )
)
