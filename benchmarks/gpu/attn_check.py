"""Training attention on a GPU: cuDNN's fused kernel against JAX's XLA path, same inputs.

    python benchmarks/gpu/attn_check.py    # on the GPU machine, ~20 s

For TinyLlama's shape (8 x 2048, 32 query heads over 4 key/value heads, head size 64, bf16)
with a segment mask as training passes one (suffix padding), and without: the largest
difference of the output and of the gradients of q, k, v, and the time of forward plus
backward for each. This is what `model.attention_impl: auto` relies on (model/attention.py).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def main() -> None:
    b, t, n, k, h = 8, 2048, 32, 4, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    vv = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    lengths = jnp.array([t, t, t, t, t, t, t - 100, 1500])  # two rows padded at the end
    segment = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    mask = (causal & (segment[:, :, None] == segment[:, None, :]))[:, None]
    weight = jnp.where(segment[:, :, None, None] > 0, 1.0, 0.0)  # loss reads real positions only

    for label, m in (("masked", mask), ("unmasked", None)):
        results = {}
        for impl in ("xla", "cudnn"):

            def loss(q, kk, vv, impl=impl, m=m):
                out = jax.nn.dot_product_attention(q, kk, vv, mask=m, is_causal=True, implementation=impl)
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
            results[impl] = got
            print(f"{label} {impl}: {(time.perf_counter() - start) / 10 * 1e3:.2f} ms forward+backward")
        if len(results) == 2:
            (_, out_x), grads_x = results["xla"]
            (_, out_c), grads_c = results["cudnn"]
            real = segment[:, :, None, None] > 0
            diff = float(jnp.max(jnp.abs(jnp.where(real, out_x.astype(jnp.float32) - out_c, 0))))
            gdiff = [
                float(jnp.max(jnp.abs(a.astype(jnp.float32) - c)))
                for a, c in zip(grads_x, grads_c, strict=True)
            ]
            print(f"{label}: max |out xla - cudnn| on real positions {diff:.4f}; grads q,k,v {gdiff}")


if __name__ == "__main__":
    main()
