"""Greedy generation on CPU: jaxgen on an imported GPT-2-style model vs transformers `generate`.

    .venv/bin/python benchmarks/hf_generate_cpu.py [--shape 124m] [--new-tokens 256] \
        [--prompt-len 32] [--rounds 3] [--beam-check]

Both sides decode the same weights: a random-weight GPT-2-style model (transformers' own
init, seed 0; `--shape` picks its size, GPT-2 124M by default) saved by transformers'
`save_pretrained` as safetensors. The transformers side (torch==2.13.0, the local CPU
wheel, in its own virtualenv created on first use) is a long-lived child process; the
jaxgen side loads the same directory with `jaxgen.load` (the public API: an HF directory
is converted in memory) in this process and decodes with `LanguageModel.generate`
(one compiled loop with a KV cache).

float32, batch 1, the same prompt, greedy, no EOS (the model's eos is unset, so both run
the full length). Each side loads and warms up once (jaxgen: compilation; torch: a first
call), then the two take turns, one timed generate each per round, the first side
alternating between rounds: both see the same machine state, which on a shared 2-core
machine moves more between minutes than between the two programs. Per call: wall and
CPU seconds. Prints one JSON line per round and a summary line (median speedup, ids
identical on every call); issue 7 asks for identical ids and jaxgen >= 5x.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

# The repo root first: run from anywhere, `import jaxgen` is this checkout's package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

VENV = pathlib.Path("/tmp/hfbench-venv")
BEAM = dict(max_length=50, num_beams=5, num_return_sequences=5, early_stopping=True)
# GPT-2-style shapes: (layers, d_model, heads, vocab). 124m/355m are GPT-2's published sizes;
# the smaller ones keep GPT-2's vocabulary so only the transformer stack shrinks.
SHAPES = {
    "355m": (24, 1024, 16, 50257),
    "124m": (12, 768, 12, 50257),
    "distil": (6, 768, 12, 50257),  # distilgpt2's shape (82M)
    "small": (6, 384, 6, 50257),
    "mini": (4, 256, 4, 50257),
    "tiny": (2, 64, 4, 512),  # tests/fixtures/hf/gpt2-tiny's shape, 1024 positions
}


def ensure_venv() -> pathlib.Path:
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import torch, transformers"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "transformers", "safetensors", "numpy"]
    subprocess.run(pip, check=True)
    return python


def model_dir(shape: str) -> pathlib.Path:
    return pathlib.Path(f"/tmp/hfbench-gpt2-{shape}")


def prompt_ids(length: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(1234)
    return [rng.randrange(vocab - 1) for _ in range(length)]


def timed(fn):
    """(result, wall s, CPU s of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------- HF side (child)


def hf_side(args) -> None:
    """Runs inside the benchmark venv: save the model once, then serve `generate` calls.

    Reads one command per stdin line ("greedy" or "beam") and answers each with a JSON line.
    """
    import torch
    import transformers

    layers, d_model, heads, vocab = SHAPES[args.shape]
    path = model_dir(args.shape)
    torch.manual_seed(0)
    if not (path / "model.safetensors").exists():
        config = transformers.GPT2Config(
            n_layer=layers,
            n_embd=d_model,
            n_head=heads,
            vocab_size=vocab,
            bos_token_id=None,
            eos_token_id=None,
        )
        transformers.GPT2LMHeadModel(config).eval().save_pretrained(path, safe_serialization=True)
    model = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(args.prompt_len, vocab)])
    greedy = dict(do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)

    def generate(new_tokens: int):
        return model.generate(ids, **greedy, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    with torch.inference_mode():
        generate(8)  # warm-up
        print(
            json.dumps(
                {
                    "ready": True,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )
        for line in sys.stdin:
            if line.strip() == "greedy":
                out, wall, cpu = timed(lambda: generate(args.new_tokens))
                reply = {"wall": wall, "cpu": cpu, "ids": out[0, args.prompt_len :].tolist()}
            else:  # the classic recipe: max_length=50, num_beams=5, early_stopping=True
                beams = model.generate(
                    ids, **BEAM, return_dict_in_generate=True, output_scores=True, pad_token_id=0
                )
                reply = {
                    "ids": beams.sequences[:, args.prompt_len :].tolist(),
                    "scores": beams.sequences_scores.tolist(),
                }
            print(json.dumps(reply), flush=True)


class HFChild:
    """The transformers side as a long-lived child process, one command at a time."""

    def __init__(self, args):
        child = [
            str(ensure_venv()),
            __file__,
            "--hf-side",
            "--shape",
            args.shape,
            "--new-tokens",
            str(args.new_tokens),
            "--prompt-len",
            str(args.prompt_len),
        ]
        self.proc = subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"transformers side exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- jaxgen side


class JaxgenSide:
    def __init__(self, args):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax

        import jaxgen

        self.args, self.jax_version = args, jax.__version__
        self.prompt = prompt_ids(args.prompt_len, SHAPES[args.shape][3])
        # --weights: jaxgen decodes with its weights stored as bfloat16 or int8 (model/quant.py);
        # transformers stays float32, the peer the issue names.
        self.lm = jaxgen.load(model_dir(args.shape), dtype="float32", weights=args.weights)
        _, self.first_call_wall, _ = timed(self.greedy)  # compilation + the first run

    def greedy(self) -> list[int]:
        (result,) = self.lm.generate([self.prompt], max_new_tokens=self.args.new_tokens, temperature=0.0)
        return result.tokens

    def beam(self) -> dict:
        (beams,) = self.lm.generate([self.prompt], **BEAM)
        return {"ids": beams.completions, "scores": beams.scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="124m")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--beam-check", action="store_true", help="also compare beam search (not timed)")
    parser.add_argument("--weights", choices=("float32", "bfloat16", "int8", "int8-head"), default="float32",
                        help="jaxgen's weight storage (transformers stays float32)")  # fmt: skip
    parser.add_argument("--hf-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_side:
        hf_side(args)
        return
    hf = HFChild(args)  # first: it saves the model directory that jaxgen loads
    ours = JaxgenSide(args)
    hf_calls, our_calls = [], []
    for r in range(args.rounds):
        for side in ("hf", "jaxgen") if r % 2 == 0 else ("jaxgen", "hf"):
            if side == "hf":
                reply = hf.ask("greedy")
                hf_calls.append(reply)
            else:
                ids, wall, cpu = timed(ours.greedy)
                our_calls.append({"wall": wall, "cpu": cpu, "ids": ids})
        h, o = hf_calls[-1], our_calls[-1]
        print(
            json.dumps(
                {
                    "round": r,
                    "first": "transformers" if r % 2 == 0 else "jaxgen",
                    "transformers_s": round(h["wall"], 3),
                    "transformers_cpu_s": round(h["cpu"], 2),
                    "jaxgen_s": round(o["wall"], 3),
                    "jaxgen_cpu_s": round(o["cpu"], 2),
                    "speedup": round(h["wall"] / o["wall"], 2),
                    "identical_ids": h["ids"] == o["ids"],
                    "load_avg_1m": os.getloadavg()[0],
                }
            ),
            flush=True,
        )
    beam = {}
    if args.beam_check:
        theirs, mine = hf.ask("beam"), ours.beam()
        gap = max(abs(a - b) for a, b in zip(theirs["scores"], mine["scores"], strict=True))
        beam = {"beam_identical_ids": theirs["ids"] == mine["ids"], "beam_max_score_diff": gap}
    hf.close()
    reference = hf_calls[0]["ids"]
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(reference, our_calls[0]["ids"], strict=True)) if a != b), None
    )
    hf_wall = statistics.median(c["wall"] for c in hf_calls)
    our_wall = statistics.median(c["wall"] for c in our_calls)
    layers, d_model, heads, vocab = SHAPES[args.shape]
    print(
        json.dumps(
            {
                **beam,
                "benchmark": "hf_generate_cpu",
                "model": f"gpt2-style {args.shape}: {layers} x {d_model}, {heads} heads, vocab {vocab}",
                "dtype": "float32",
                "jaxgen_weights": args.weights,
                "batch": 1,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "transformers_ms_per_token": round(1000 * hf_wall / args.new_tokens, 2),
                "jaxgen_ms_per_token": round(1000 * our_wall / args.new_tokens, 2),
                "speedup_median": round(hf_wall / our_wall, 2),
                "speedup_per_round": [
                    round(h["wall"] / o["wall"], 2) for h, o in zip(hf_calls, our_calls, strict=True)
                ],
                "identical_ids": all(c["ids"] == reference for c in hf_calls + our_calls),
                "first_diff": first_diff,
                "jaxgen_first_call_s": round(ours.first_call_wall, 2),
                "versions": {
                    "torch": hf.info["torch"],
                    "transformers": hf.info["transformers"],
                    "jax": ours.jax_version,
                },
                "torch_threads": hf.info["threads"],
            }
        )
    )


if __name__ == "__main__":
    main()
