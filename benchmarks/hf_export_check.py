"""Do `transformers` models loaded from jaxgen's exports compute what jaxgen computes?

    .venv/bin/python benchmarks/hf_export_check.py [--max-shard-mb 0.05]

The test suite checks exported tensor names, shapes and dtypes against files saved by
transformers, without torch. This script closes the loop with transformers itself
(torch==2.13.0 CPU wheel + transformers, in the virtualenv of hf_generate_cpu.py, created
on first use): for each case it exports a jaxgen run directory with `export_hf`, loads the
export with `AutoModelForCausalLM.from_pretrained` in a child process, and compares
float32 logits on a fixed batch of ids (max abs difference) and 16 greedy tokens per row.

Cases: both HF fixtures imported with `import_hf` (GPT-2; Llama with GQA and untied
embeddings) and random-init jaxgen runs that no fixture covers (a Llama with biases, an
explicit head_dim and tied embeddings; a GPT-2 with a vocabulary that is not a multiple of
anything). `--max-shard-mb` forces sharded exports (model.safetensors.index.json).
Prints one JSON line per case and a summary line; exits 1 when any case differs by more
than 1e-4 or any greedy id differs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

# The repo root first: run from anywhere, `import jaxgen` is this checkout's package.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
NEW_TOKENS = 16
# Random-init jaxgen models that no fixture covers: dotted config overrides.
NATIVE = {
    "llama-bias-headdim-tied": [
        "model.family=llama", "model.vocab_size=300", "model.num_layers=2", "model.d_model=64",
        "model.num_heads=4", "model.num_kv_heads=1", "model.head_dim=24", "model.mlp_dim=96",
        "model.max_len=64", "model.tie_embeddings=true", "model.attention_bias=true",
        "model.mlp_bias=true", "model.rope_theta=500000", "model.norm_eps=1e-6",
    ],
    "gpt2-odd-vocab": [
        "model.family=gpt2", "model.vocab_size=333", "model.num_layers=3", "model.d_model=48",
        "model.num_heads=3", "model.max_len=40",
    ],
}  # fmt: skip


def ids_for(vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(7)
    return [[rng.randrange(vocab) for _ in range(12)] for _ in range(2)]


# ----------------------------------------------------------------------------- HF side (child)


def hf_side(export_dir: str, ids_json: str) -> None:
    """Runs inside the benchmark venv: load the export, print logits and greedy ids as JSON."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(ids_json))
    with torch.inference_mode():
        logits = model(ids).logits
        greedy = model.generate(
            ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0
        )
    reply = {
        "class": type(model).__name__,
        "logits": logits.tolist(),
        "greedy": greedy[:, ids.shape[1] :].tolist(),
        "transformers": transformers.__version__,
    }
    print(json.dumps(reply))


# ----------------------------------------------------------------------------- jaxgen side


def make_runs(work: pathlib.Path) -> dict[str, pathlib.Path]:
    import jax

    from jaxgen.checkpoint import save_params
    from jaxgen.config import load_config
    from jaxgen.convert.hf import import_hf
    from jaxgen.model.transformer import init_params

    runs = {}
    for name in ("gpt2-tiny", "llama-tiny"):
        runs[f"imported {name}"] = work / name
        import_hf(FIXTURES / name, work / name, dtype="float32")
    for name, overrides in NATIVE.items():
        config = load_config(None, [*overrides, "model.dtype=float32"])
        # Scaled so the logits are far from uniform and greedy ids are decided by margins.
        params = jax.tree.map(lambda x: 3.0 * x, init_params(config.model, jax.random.key(3)))
        save_params(work / name, config, params)
        runs[f"native {name}"] = work / name
    return runs


def check(name: str, run: pathlib.Path, export: pathlib.Path, max_shard_bytes: int, python: str) -> dict:
    import numpy as np

    import jaxgen
    from jaxgen.convert.hf import export_hf

    files = export_hf(run, export, max_shard_bytes=max_shard_bytes)
    lm = jaxgen.load(run, dtype="float32")
    ids = ids_for(lm.config.model.vocab_size)
    mine = np.asarray(lm.logits(ids), np.float32)
    greedy = [r.tokens for r in lm.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0.0)]
    child = [python, __file__, "--hf-side", str(export), json.dumps(ids)]
    reply = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    theirs = np.asarray(reply["logits"], np.float32)
    return {
        "case": name,
        "hf_class": reply["class"],
        "files": len(files),
        "sharded": "model.safetensors.index.json" in files,
        "max_abs_logit_diff": float(np.max(np.abs(mine - theirs))),
        "greedy_identical": greedy == reply["greedy"],
        "transformers": reply["transformers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-shard-mb", type=float, default=0.05, help="shard exports above this size")
    parser.add_argument("--hf-side", nargs=2, metavar=("EXPORT_DIR", "IDS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_side:
        hf_side(*args.hf_side)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from hf_generate_cpu import ensure_venv

    python = str(ensure_venv())
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        for name, run in make_runs(work).items():
            line = check(name, run, work / "export" / run.name, int(args.max_shard_mb * 2**20), python)
            ok &= line["max_abs_logit_diff"] <= 1e-4 and line["greedy_identical"]
            print(json.dumps(line), flush=True)
    print(json.dumps({"benchmark": "hf_export_check", "all_match": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
