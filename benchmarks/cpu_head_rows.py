"""A float32 tied output head ([V, D], contracted on D) through the CPU kernel's [N, K] path
against XLA's dot, per number of activation rows M: COUNT distinct heads (so that they
stream from memory), ms per head, median of 5 rounds of 10 calls alternating the order.
Serving sends 2-8 rows through the kernel (`model/layers.py` FEW_ROWS: a speculative
verify pass is 5); this is the measurement behind that range.

    .venv/bin/python benchmarks/cpu_head_rows.py 4096x512 8        # the grown edit model's head
    .venv/bin/python benchmarks/cpu_head_rows.py 50304x768 1       # GPT-2 124M's
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.runtime import cpu_kernels

v, d = (int(a) for a in sys.argv[1].split("x"))
count = int(sys.argv[2]) if len(sys.argv) > 2 else 8
rng = np.random.default_rng(0)
heads = [jnp.asarray(rng.standard_normal((v, d), dtype=np.float32)) for _ in range(count)]
sides = {
    "kernel": jax.jit(lambda x, hs: [cpu_kernels.weight_matmul(x, h, None, "nk") for h in hs]),
    "xla": jax.jit(lambda x, hs: [x @ h.T for h in hs]),
}
out = {}
for m in (1, 2, 3, 5, 8, 16, 64):
    x = jnp.asarray(rng.standard_normal((m, d), dtype=np.float32))
    a, b = (np.asarray(f(x, heads)[0]) for f in sides.values())
    err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    t = {name: [] for name in sides}
    for r in range(5):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            s = time.perf_counter()
            for _ in range(10):
                got = sides[name](x, heads)
            jax.block_until_ready(got)
            t[name].append((time.perf_counter() - s) / (10 * count) * 1e3)
    out[str(m)] = [
        round(statistics.median(t["kernel"]), 3),
        round(statistics.median(t["xla"]), 3),
        f"{err:.1e}",
    ]
print(json.dumps({"head": f"{v}x{d}", "count": count, "M: [kernel ms, xla ms, difference]": out}))
