"""Do transformers and PEFT compute what jaxgen computes for a LoRA fine-tuning run?

    .venv/bin/python benchmarks/hf_finetune_check.py [--steps 30]

The test suite checks export-peft's tensor names, shapes and B A products without torch.
This script closes the loop with transformers and PEFT themselves (torch==2.13.0 CPU wheel
+ transformers + peft, in the virtualenv of hf_generate_cpu.py, created on first use; peft
is added to it when missing). For a GPT-2 and a Llama (GQA, untied embeddings) base, each
a tiny random jaxgen model written as a Hugging Face directory with a character
SentencePiece `tokenizer.model` beside it, it runs a LoRA fine-tune from that directory
(`finetune.init_from=<hf dir>`, every projection targeted: q, k, v, o and the MLP), then:

- `export-hf RUN`: the LoRA run merged on the fly -> `AutoModelForCausalLM.from_pretrained`;
- `finetune merge RUN` then `export-hf` of the merged run -> the same;
- `export-peft RUN` -> `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
  adapter)` on the HF base the run started from.

Each is compared with `jaxgen.load(RUN).logits` on a fixed batch of ids (float32, max abs
difference <= 1e-4). The commands go through `jaxgen.cli.main` in this process. Prints one
JSON line per case (with how far the fine-tune moved the logits from the base's, so a
match is not a match of untouched adapters) and a summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile

# The repo root first: run from anywhere, `import jaxgen` is this checkout's package.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

TOLERANCE = 1e-4
# Tiny bases: dotted model overrides, and the LoRA targets (every projection the family has).
BASES = {
    "gpt2": (
        ["model.family=gpt2", "model.vocab_size=128", "model.num_layers=2", "model.d_model=64",
         "model.num_heads=4", "model.max_len=64"],
        "[q, k, v, o, mlp_in, mlp_out]",
    ),
    "llama": (
        ["model.family=llama", "model.vocab_size=128", "model.num_layers=2", "model.d_model=64",
         "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=176", "model.max_len=64",
         "model.tie_embeddings=false"],
        "[q, k, v, o, mlp_in, mlp_gate, mlp_out]",
    ),
}  # fmt: skip


def ids_for(vocab: int) -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(vocab) for _ in range(16)] for _ in range(2)]


# ----------------------------------------------------------------------------- HF side (child)


def hf_side(model_dir: str, adapter_dir: str, ids_json: str) -> None:
    """Runs inside the benchmark venv: load (base + adapter), print logits as JSON."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reply = {"class": type(model).__name__, "transformers": transformers.__version__}
    if adapter_dir:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter_dir)
        reply["class"] = f"{type(model).__name__}({reply['class']})"
        reply["peft"] = peft.__version__
        reply["lora_modules"] = sum(name.endswith(".lora_A") for name, _ in model.named_modules())
    with torch.inference_mode():
        reply["logits"] = model.eval()(torch.tensor(json.loads(ids_json))).logits.tolist()
    print(json.dumps(reply))


def ensure_peft_venv() -> str:
    from hf_generate_cpu import ensure_venv

    python = str(ensure_venv())
    if subprocess.run([python, "-c", "import peft"], capture_output=True).returncode != 0:
        # torch pinned: a bare `peft` would let pip replace the local CPU wheel.
        pip = [python, "-m", "pip", "install", "-q", "torch==2.13.0", "peft"]
        subprocess.run(pip, check=True)
    return python


# ----------------------------------------------------------------------------- jaxgen side


def make_base(work: pathlib.Path, family: str, data: list[str]) -> pathlib.Path:
    """A random jaxgen model written as an HF directory with the trained tokenizer.model."""
    import jax

    from jaxgen.config import load_config
    from jaxgen.convert.hf import write_hf
    from jaxgen.data.tokenizer_training import tokenizer_dir
    from jaxgen.model.transformer import init_params
    from jaxgen.tokenizer import load_tokenizer

    config = load_config(None, [*BASES[family][0], "model.dtype=float32", *data])
    tokenizer = load_tokenizer(tokenizer_dir(config))
    params = jax.jit(lambda rng: init_params(config.model, rng))(jax.random.key(5))
    out = work / f"hf-{family}"
    write_hf(out, config.model, params, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
             extra_from=tokenizer_dir(config))  # fmt: skip
    return out


def make_data(work: pathlib.Path) -> list[str]:
    """SFT records (prompt: a line, response: the next) and a char tokenizer trained on them."""
    from jaxgen.config import load_config
    from jaxgen.data.tokenizer_training import train_tokenizer

    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:40_000]
    lines = [line for line in text.splitlines() if line.strip()]
    records = [{"prompt": a + "\n", "response": b} for a, b in zip(lines, lines[1:], strict=False)]
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = [f"data.train_files=[{work / 'sft.jsonl'}]", "data.format=sft", f"data.data_dir={work / 'data'}",
            "data.name=sft"]  # fmt: skip
    train_tokenizer(load_config(None, [*data, "tokenizer.kind=char", "tokenizer.vocab_size=100"]))
    return data


def finetune_lora(work: pathlib.Path, family: str, base: pathlib.Path, data: list[str], steps: int):
    from jaxgen.config import load_config
    from jaxgen.train.finetune import finetune

    overrides = {
        "finetune.init_from": base,
        "finetune.method": "lora",
        "finetune.lora.targets": BASES[family][1],
        "finetune.lora.rank": 8,
        "finetune.lora.alpha": 16,
        "tokenizer.vocab_multiple": 8,
        "train.steps": steps,
        "train.batch_size": 8,
        "train.seq_len": 64,
        "train.log_every": steps,
        "checkpoint.every": steps,
        "checkpoint.async_save": False,
        "optimizer.learning_rate": 1e-2,
        "eval.max_batches": 2,
    }
    config = load_config(None, [*data, *(f"{k}={v}" for k, v in overrides.items())])
    run = work / f"lora-{family}"
    result = finetune(config, run)
    return run, result


def cli(*argv: str) -> None:
    from jaxgen.cli import main

    if main(list(argv)) != 0:
        raise SystemExit(f"jaxgen {' '.join(argv)} failed")


def hf_logits(python: str, model_dir: pathlib.Path, adapter_dir: pathlib.Path | None, ids) -> dict:
    child = [python, __file__, "--hf-side", str(model_dir), str(adapter_dir or ""), json.dumps(ids)]
    return json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)


def check_family(work: pathlib.Path, family: str, data: list[str], steps: int, python: str) -> list[dict]:
    import jax
    import numpy as np
    import safetensors.numpy

    import jaxgen
    from jaxgen.train.finetune import load_adapters

    base = make_base(work, family, data)
    run, result = finetune_lora(work, family, base, data, steps)
    adapters = jax.device_get(load_adapters(run)[2]["lora"])["layers"]
    max_b = max(float(np.abs(ab["b"]).max()) for module in adapters.values() for ab in module.values())
    lm = jaxgen.load(run, dtype="float32")
    ids = ids_for(lm.config.model.vocab_size)
    mine = np.asarray(lm.logits(ids), np.float32)
    base_logits = np.asarray(jaxgen.load(base, dtype="float32").logits(ids), np.float32)
    effect = float(np.max(np.abs(mine - base_logits)))

    cli("convert", "export-hf", str(run), str(work / f"export-{family}"))
    cli("finetune", "merge", str(run), str(work / f"merged-{family}"))
    cli("convert", "export-hf", str(work / f"merged-{family}"), str(work / f"export-merged-{family}"))
    cli("convert", "export-peft", str(run), str(work / f"peft-{family}"))
    adapter = work / f"peft-{family}"
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    cases = {
        "export-hf (LoRA merged on the fly)": (work / f"export-{family}", None),
        "finetune merge + export-hf": (work / f"export-merged-{family}", None),
        "export-peft on the HF base": (base, adapter),
    }
    lines = []
    for case, (model_dir, adapter_dir) in cases.items():
        reply = hf_logits(python, model_dir, adapter_dir, ids)
        diff = float(np.max(np.abs(mine - np.asarray(reply.pop("logits"), np.float32))))
        line = {"case": f"{family} {case}", "max_abs_logit_diff": diff, "ok": diff <= TOLERANCE}
        line.update(reply)
        if adapter_dir is not None:
            tensors = safetensors.numpy.load_file(adapter / "adapter_model.safetensors")
            line.update(adapter_tensors=len(tensors), target_modules=peft_config["target_modules"],
                        rank_pattern=peft_config["rank_pattern"])  # fmt: skip
        line.update(steps=result.step, final_loss=round(result.losses[-1], 4), max_abs_lora_b=max_b,
                    max_abs_logit_change_from_base=effect)  # fmt: skip
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="LoRA fine-tuning steps per base")
    parser.add_argument(
        "--hf-side", nargs=3, metavar=("MODEL_DIR", "ADAPTER_DIR", "IDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.hf_side:
        hf_side(*args.hf_side)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    python = ensure_peft_venv()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        data = make_data(work)
        for family in BASES:
            for line in check_family(work, family, data, args.steps, python):
                ok &= line["ok"]
                print(json.dumps(line), flush=True)
    print(json.dumps({"benchmark": "hf_finetune_check", "tolerance": TOLERANCE, "all_match": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
