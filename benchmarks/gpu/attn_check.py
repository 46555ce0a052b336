"""Training attention on a GPU: cuDNN's fused kernel against JAX's XLA path, same inputs.

    python benchmarks/gpu/attn_check.py [--shape tinyllama|gpt2]   # on the GPU machine, ~20 s

At TinyLlama's training shape (8 x 2048, 32 query heads over 4 key/value heads, head size
64) or GPT-2 124M's (16 x 1024, 12 heads of 64), bf16: with a segment mask as pretraining
passes one (suffix padding), with the same padding given as sequence lengths instead, and
without any: the largest difference of the output and of the gradients of q, k, v between
the XLA path and cuDNN, and the time of forward plus backward for each. This is what
`model.attention_impl: auto` relies on (model/attention.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

SHAPES = {"tinyllama": (8, 2048, 32, 4, 64), "gpt2": (16, 1024, 12, 12, 64)}  # B, T, N, K, H


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama")
    b, t, n, k, h = SHAPES[p.parse_args().shape]
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    vv = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    lengths = jnp.full((b,), t).at[-2:].set(jnp.array([t - 100, t * 3 // 4]))  # two rows padded at the end
    segment = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    mask = (causal & (segment[:, :, None] == segment[:, None, :]))[:, None]
    weight = jnp.where(segment[:, :, None, None] > 0, 1.0, 0.0)  # loss reads real positions only

    # "lengths": the suffix padding as sequence lengths, which cuDNN takes as its own padding
    # mask instead of an additive bias (same outputs on real positions).
    results = {}
    for label, m, lens in (("masked", mask, None), ("lengths", None, lengths), ("unmasked", None, None)):
        for impl in ("xla", "cudnn"):

            def loss(q, kk, vv, impl=impl, m=m, lens=lens):
                out = jax.nn.dot_product_attention(
                    q, kk, vv, mask=m, is_causal=True, implementation=impl,
                    query_seq_lengths=lens, key_value_seq_lengths=lens,
                )  # fmt: skip
                return jnp.sum(out.astype(jnp.float32) * weight), out

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            try:
                jax.block_until_ready(step(q, kk, vv))
            except Exception as e:  # noqa: BLE001 (reported, the other path still runs)
                print(f"{label} {impl}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            start = time.perf_counter()
            for _ in range(10):
                got = step(q, kk, vv)
            jax.block_until_ready(got)
            results[label, impl] = got
            print(f"{label} {impl}: {(time.perf_counter() - start) / 10 * 1e3:.2f} ms forward+backward")
    # Each cuDNN variant against the XLA path with the mask (what the model computes).
    real = segment[:, :, None, None] > 0
    for label in ("masked", "lengths", "unmasked"):
        if ("masked", "xla") not in results or (label, "cudnn") not in results:
            continue
        (_, out_x), grads_x = results["masked", "xla"]
        (_, out_c), grads_c = results[label, "cudnn"]
        diff = float(jnp.max(jnp.abs(jnp.where(real, out_x.astype(jnp.float32) - out_c, 0))))
        # Gradients of padded rows' keys differ by design when the mask is dropped.
        gdiff = [
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - c))) for a, c in zip(grads_x, grads_c, strict=True)
        ]
        print(
            f"cudnn {label} vs masked xla: max |out| diff on real positions {diff:.4f}; grads q,k,v {gdiff}"
        )


if __name__ == "__main__":
    main()
