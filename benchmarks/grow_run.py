"""Grow a trained llama-family run into a wider, deeper one that computes the same function.

    .venv/bin/python benchmarks/grow_run.py runs/edit_example runs/edit_grown \
        --layers 6 --d-model 512 --mlp-dim 1408

Why: speculative decoding pays off where a decode step is bound by reading the weights
(a pass over k + 1 tokens then costs little more than a one-token step), and it needs a
model that copies its prompt. On this 2-core CPU the only model that copies is the
quickstart model fine-tuned on the edit task (configs/edit_example.yaml, 4 x 128, 3.5 MB:
its weights sit in cache), and training a larger one from scratch to copy would take hours
here. Growing the small one (Net2Net, Chen et al. 2016; bert2BERT, Chen et al. 2022) gives
a model of a weight-bound shape that already copies; `configs/edit_grown.yaml` then
fine-tunes every one of its weights on the same task, so the model that is measured is a
trained model of that shape, not a padded copy (benchmarks/RESULTS.md, "Speculative
decoding at a shape bound by its weights").

How the function is kept: the old model occupies the first d_model residual dims, its
heads the first heads (head_dim, the rotary frequencies and the query heads per kv head
unchanged), its MLP units the
first units, its layers the first layers. Every weight that *writes* into the residual
stream outside the old dims (embedding columns, attention output and MLP down projections),
and every new head's output and new unit's down projection, starts at zero, so the new
residual dims stay zero and the new parts add nothing; everything that only *reads* them
(new heads' q/k/v, new units' gate/up, whole new layers but for their output projections)
keeps the model's random init, so that fine-tuning moves it. RMSNorm over d' dims of
[x, 0] divides by sqrt(d / d') times x's RMS when eps becomes eps * d / d', so the norm
scales are multiplied by sqrt(d / d'). The script checks the grown logits against the
original's on a sample of the training text and writes nothing if they differ.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.checkpoint import load_params, local_tokenizer, save_params
from jaxgen.model.transformer import Transformer, init_params


def grow(old: dict, new: dict, d: int, heads: int, kv_heads: int, units: int, layers: int) -> dict:
    """`new` (a random init of the grown shape) with `old` in its leading block and every
    write into what the old model did not have set to zero."""
    g = jax.tree.map(np.array, new)
    o = jax.tree.map(np.asarray, old)
    attn, mlp = g["layers"]["attn"], g["layers"]["mlp"]
    g["embed"]["embedding"][:, :d] = o["embed"]["embedding"]
    g["embed"]["embedding"][:, d:] = 0.0
    for name, count in (("query", heads), ("key", kv_heads), ("value", kv_heads)):
        attn[name]["kernel"][:layers, :d, :count] = o["layers"]["attn"][name]["kernel"]
    attn["out"]["kernel"][:] = 0.0  # [L, H, hd, D]
    attn["out"]["kernel"][:layers, :heads, :, :d] = o["layers"]["attn"]["out"]["kernel"]
    for name in ("gate", "up"):
        mlp[name]["kernel"][:layers, :d, :units] = o["layers"]["mlp"][name]["kernel"]
    mlp["down"]["kernel"][:] = 0.0  # [L, F, D]
    mlp["down"]["kernel"][:layers, :units, :d] = o["layers"]["mlp"]["down"]["kernel"]
    ratio = math.sqrt(d / g["embed"]["embedding"].shape[1])
    for norm in ("attn_norm", "mlp_norm"):
        scale = g["layers"][norm]["scale"]  # [L, D]
        scale[:layers, :d] = o["layers"][norm]["scale"] * ratio
        scale[:layers, d:] = ratio
        scale[layers:] = ratio
    g["final_norm"]["scale"][:d] = o["final_norm"]["scale"] * ratio
    g["final_norm"]["scale"][d:] = ratio
    return g


def logits(config, params, tokens: np.ndarray) -> np.ndarray:
    model = Transformer(config.model_copy(update={"scan_layers": True}))
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    out = jax.jit(lambda p, t: model.apply({"params": p}, t, positions, jnp.ones_like(t)))(params, tokens)
    return np.asarray(out[0], np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--d-model", type=int, required=True)
    p.add_argument("--mlp-dim", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config, old = load_params(args.run_dir)
    m = config.model
    if m.family != "llama" or not m.tie_embeddings:
        sys.exit(f"{args.run_dir}: growing covers llama runs with tied embeddings (this is {m.family})")
    if args.layers < m.num_layers or args.d_model < m.d_model or args.mlp_dim < m.mlp_dim:
        sys.exit("--layers, --d-model and --mlp-dim must each be at least the run's own")
    if args.d_model % m.dim_per_head:
        sys.exit(f"--d-model must be a multiple of the run's head_dim ({m.dim_per_head})")
    heads = args.d_model // m.dim_per_head
    group = (
        m.num_heads // m.kv_heads
    )  # query heads per kv head: kept, so head h still reads kv head h // group
    if heads % group:
        sys.exit(
            f"--d-model / head_dim ({heads} heads) must be a multiple of the run's {group} heads per kv head"
        )
    model = m.model_copy(
        update={
            "num_layers": args.layers,
            "d_model": args.d_model,
            "num_heads": heads,
            "num_kv_heads": heads // group,
            "head_dim": m.dim_per_head,
            "mlp_dim": args.mlp_dim,
            "norm_eps": m.norm_eps * m.d_model / args.d_model,
        }
    )
    grown_config = config.model_copy(update={"model": model, "name": pathlib.Path(args.out_dir).name})
    new = jax.jit(init_params, static_argnums=0)(model, jax.random.key(args.seed))
    grown = grow(old, new, m.d_model, m.num_heads, m.kv_heads, m.mlp_dim, m.num_layers)

    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, min(64, m.max_len)), dtype=np.int32)
    a, b = logits(m, old, tokens), logits(model, grown, tokens)
    diff = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    shape = f"{m.num_layers}x{m.d_model} -> {args.layers}x{args.d_model} (mlp {args.mlp_dim}, {heads} heads)"
    print(f"grown {shape}: max |logit difference| / max |logit| = {diff:.2e}")
    if diff > 1e-4:
        sys.exit("the grown model does not compute the run's function; nothing written")
    save_params(
        args.out_dir,
        grown_config,
        jax.tree.map(jnp.asarray, grown),
        tokenizer_path=local_tokenizer(args.run_dir),
    )
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
