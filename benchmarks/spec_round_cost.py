"""Where a speculative round's time goes, on random weights (no trained model needed):
ms per plain decode step, per prompt-lookup round, and per target forward pass of 1 and
k + 1 tokens through the cache, all in one process, rounds alternating the order.

A round's cost does not depend on how many drafts are kept (shapes are fixed), so a
random model whose drafts are all rejected times it as well as a trained one; the prompt
repeats itself so that every round finds a match and runs the k + 1 token pass.

    .venv/bin/python benchmarks/spec_round_cost.py [LAYERS WIDTH HEADS MLP [K]]
    .venv/bin/python benchmarks/spec_round_cost.py 6 512 16 1408 4   # the grown edit model's shape
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import load_config
from jaxgen.decode import loop, ragged, sampling, speculative
from jaxgen.model import quant
from jaxgen.model.serving import ServingTransformer, unstack_layers
from jaxgen.model.transformer import init_params

L, D, H, F, K = (list(map(int, sys.argv[1:6])) + [6, 512, 16, 1408, 4][len(sys.argv) - 1 :])[:5]
config = load_config(
    None,
    [
        "model.preset=tiny-llama",
        f"model.num_layers={L}",
        f"model.d_model={D}",
        f"model.num_heads={H}",
        f"model.num_kv_heads={H}",
        f"model.mlp_dim={F}",
        "model.vocab_size=4096",
        "model.max_len=256",
        "model.tie_embeddings=true",
        "model.dtype=float32",
    ],
)
cfg = config.model
params = unstack_layers(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), cfg)
params = jax.jit(quant.serving_weights, static_argnums=(1, 2))(params, "float32", quant.tiles_for(cfg))
spec = loop.DecodeSpec(sampling.Greedy(), buffer=loop.bucket(64))
lookup = speculative.PromptLookup(num_tokens=K, max_ngram=3)
prompt = list(np.tile(np.random.default_rng(0).integers(0, cfg.vocab_size, 28), 2))  # 56 tokens


def plain(n):
    return loop.generate_ids(cfg, params, [prompt], spec, max_new_tokens=n)


def spec_(n):
    return speculative.generate_ids(cfg, params, [prompt], spec, lookup, max_new_tokens=n)[1].passes


model = ServingTransformer(cfg)


def forwards(t, count=50):
    """`count` target passes of t tokens at one row's cache slot (the cache not advanced)."""
    knobs = sampling.knobs(spec.strategy, 1)
    one = (jnp.asarray([prompt]), jnp.asarray([len(prompt)]), jnp.zeros(1, jnp.int32), 0, 64, knobs)
    rows = ragged.start_rows(model, params, *one, spec, K + 1)
    inputs = jnp.zeros((1, t), jnp.int32)
    positions = ragged.positions_at(cfg, rows.slot - 1, t)

    def body(_, carry):
        acc, cache = carry
        # The input depends on the last pass in a way XLA cannot fold (`x * 0` on an int it
        # folds, and would then hoist the whole pass out of the loop), so each pass runs.
        # The cache is carried (its index unchanged: each pass writes the same slots), so
        # that XLA updates it in place as the decoding loop does instead of copying it.
        fed = inputs + (acc[0, 0, 0] > 1e30).astype(jnp.int32)
        logits, new = model.apply({"params": params}, fed, positions, jnp.ones_like(inputs), cache=cache)
        return acc + logits[:, :1, :1], new.replace(index=cache.index)

    return jax.lax.fori_loop(0, count, body, (jnp.zeros((1, 1, 1)), rows.cache))[0]


fwd = {t: jax.jit(lambda t=t: forwards(t)) for t in (1, K + 1)}


def timed(fn, *a):
    s = time.perf_counter()
    jax.block_until_ready(fn(*a))
    return time.perf_counter() - s


short, long_ = 8, 56
for fn in (plain, spec_):
    fn(short), fn(long_)
for f in fwd.values():
    f()
res = {"plain step": [], "round": [], "1-token pass": [], f"{K + 1}-token pass": []}
for r in range(5):
    order = [0, 1, 2, 3] if r % 2 == 0 else [3, 2, 1, 0]
    for i in order:
        if i == 0:
            res["plain step"].append((timed(plain, long_) - timed(plain, short)) / (long_ - short))
        elif i == 1:
            passes = spec_(long_) - spec_(short)
            res["round"].append((timed(spec_, long_) - timed(spec_, short)) / passes)
        elif i == 2:
            res["1-token pass"].append(timed(fwd[1]) / 50)
        else:
            res[f"{K + 1}-token pass"].append(timed(fwd[K + 1]) / 50)
print(f"{L}x{D} mlp {F}, k={K}, ms (median, range of 5):")
for name, v in res.items():
    v = [1e3 * x for x in v]
    print(f"  {name:>14}: {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})")
rnd, big = statistics.median(res["round"]), statistics.median(res[f"{K + 1}-token pass"])
print(f"  round - pass  : {1e3 * (rnd - big):.3f}")
