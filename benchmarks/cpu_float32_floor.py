"""Float32 batch-1 decode at one GPT-2-family shape (random weights): block kernels in tiles
through the CPU kernel (the serving layout, model/quant.py) against XLA's dots on the plain
tree, in one process, 4 rounds alternating the order, each decode against the bare weight
pass (`jaxgen bench generate`'s floor) of the same round.

    .venv/bin/python benchmarks/cpu_float32_floor.py LAYERS WIDTH HEADS VOCAB [NEW_TOKENS]
    .venv/bin/python benchmarks/cpu_float32_floor.py 12 768 12 50304     # GPT-2 124M
"""

import statistics
import sys

import jax

from jaxgen.bench import generate as bg
from jaxgen.config import load_config
from jaxgen.decode import sampling
from jaxgen.model import quant
from jaxgen.model.serving import unstack_layers
from jaxgen.model.transformer import init_params

L, D, H, V = map(int, sys.argv[1:5])
new = int(sys.argv[5]) if len(sys.argv) > 5 else 128
config = load_config(
    None,
    [
        "model.preset=gpt2-124m",
        f"model.num_layers={L}",
        f"model.d_model={D}",
        f"model.num_heads={H}",
        f"model.vocab_size={V}",
        "model.dtype=float32",
    ],
)
cfg = config.model
plain = unstack_layers(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), cfg)
tiled = jax.jit(quant.serving_weights, static_argnums=(1, 2))(plain, "float32", True)
sides = {"tiles": tiled, "xla": plain}


def step_ms(params):
    line = bg._decode_line(config, params, 1, 32, new, sampling.Greedy())
    return line["ms_per_decode_step"]


def pass_ms(params):
    return 1e3 * bg._timed(bg._weight_pass, params)[1]


for p in sides.values():
    step_ms(p)
    pass_ms(p)
ratios = {n: [] for n in sides}
steps = {n: [] for n in sides}
for r in range(4):
    for n in list(sides) if r % 2 == 0 else list(sides)[::-1]:
        s = step_ms(sides[n])
        f = pass_ms(sides[n])
        steps[n].append(s)
        ratios[n].append(s / f)
print(
    f"{L}x{D}: "
    + "; ".join(
        f"{n}: step {statistics.median(steps[n]):.2f} ms ({min(steps[n]):.2f}-{max(steps[n]):.2f}), "
        f"step/pass {statistics.median(ratios[n]):.2f} ({min(ratios[n]):.2f}-{max(ratios[n]):.2f})"
        for n in sides
    )
)
