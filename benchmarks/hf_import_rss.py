"""Peak host memory while importing a ~1.1B-parameter Llama-shaped HF checkpoint.

    .venv/bin/python benchmarks/hf_import_rss.py [--dir /tmp/llama-1b-hf] [--dtype bfloat16]

Writes a synthetic TinyLlama-1.1B-shaped checkpoint (random weights, safetensors via
numpy, sharded in ~1 GB files with an index) unless `--dir` already holds one, then
imports it with `jaxgen.convert.hf.load_hf` in a fresh process on one CPU device,
sampling /proc/self/status every 5 ms. Target (issue 7): host memory beyond what the
runtime and the imported params themselves need stays < 1.5x the largest tensor + 1 GB.

On the CPU backend the "device" memory holding the imported params *is* host memory,
so the params' own bytes are reported separately and subtracted: what is left is the
conversion overhead the target is about. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
import time

# The repo root first: run from anywhere, `import jaxgen` is this checkout's package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SHAPE = dict(vocab=32000, layers=22, d=2048, heads=32, kv_heads=4, head_dim=64, mlp=5632)


def llama_config() -> dict:
    s = SHAPE
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s["vocab"],
        "hidden_size": s["d"],
        "intermediate_size": s["mlp"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    s = SHAPE
    d, q, kv, f = s["d"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["mlp"]
    shapes = {
        "model.embed_tokens.weight": (s["vocab"], d),
        "model.norm.weight": (d,),
        "lm_head.weight": (s["vocab"], d),
    }
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
    return shapes


def write_checkpoint(out: pathlib.Path, shard_bytes: int = 10**9) -> None:
    import ml_dtypes
    import numpy as np
    import safetensors.numpy

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = tensor_shapes()
    shards, current, used = [], [], 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        if current and used + size > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            n: (rng.standard_normal(shapes[n], np.float32) * 0.02).astype(ml_dtypes.bfloat16) for n in names
        }
        safetensors.numpy.save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(llama_config()))


def _status_kib(fields=("VmRSS", "RssAnon", "RssFile")) -> dict[str, int]:
    out = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[key] = int(value.split()[0])
    return out


def measure(hf_dir: pathlib.Path, dtype: str) -> dict:
    """Runs in a fresh process: import once, sampling RSS in a thread."""
    import os
    import threading

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from jaxgen.convert import hf

    jax.numpy.zeros(1).block_until_ready()  # start the runtime before the baseline
    base = _status_kib()
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            now = _status_kib()
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    config, params, _ = hf.load_hf(hf_dir, dtype=dtype)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    gib = 1024**3
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    largest = max(math.prod(s) for s in tensor_shapes().values()) * np.dtype(jax.numpy.dtype(dtype)).itemsize
    overhead = peak["VmRSS"] * 1024 - base["VmRSS"] * 1024 - params_bytes
    target = 1.5 * largest + gib
    return {
        "benchmark": "hf_import_rss",
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "dtype": dtype,
        "seconds": round(seconds, 1),
        "baseline_rss_gib": round(base["VmRSS"] / 1024**2, 3),
        "peak_rss_gib": round(peak["VmRSS"] / 1024**2, 3),
        "peak_rss_anon_gib": round(peak["RssAnon"] / 1024**2, 3),
        "peak_rss_file_gib": round(peak["RssFile"] / 1024**2, 3),
        "params_gib": round(params_bytes / gib, 3),
        "largest_tensor_gib": round(largest / gib, 3),
        "overhead_gib": round(overhead / gib, 3),
        "target_gib": round(target / gib, 3),
        "meets_target": overhead < target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/llama-1b-hf", help="synthetic checkpoint (written if missing)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_dir = pathlib.Path(args.dir)
    if args.measure_only:
        print(json.dumps(measure(hf_dir, args.dtype)))
        return
    if not (hf_dir / "model.safetensors.index.json").exists():
        # A separate process, so the writer's buffers are not in the measured process.
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r});"
                f" import hf_import_rss as b, pathlib; b.write_checkpoint(pathlib.Path({str(hf_dir)!r}))",
            ],
            check=True,
        )
    subprocess.run(
        [sys.executable, __file__, "--dir", str(hf_dir), "--dtype", args.dtype, "--measure-only"], check=True
    )


if __name__ == "__main__":
    main()
