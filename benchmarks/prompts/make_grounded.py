"""Writes grounded.jsonl: prompts whose continuation is in the prompt (speculative benchmark).

    .venv/bin/python benchmarks/prompts/make_grounded.py [--count 16] [--chars 120]

Each prompt is a passage of ../shared/data/tinyshakespeare.txt (a speech, from its
speaker line), a blank line, and the passage's first line again: a model that has
learned to repeat text continues by copying the passage, which prompt lookup drafts.
Passages are short (about 56 characters) so that prompt + 28 new tokens fit the
quickstart model's 64-token context.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--chars", type=int, default=56)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    args = parser.parse_args()
    text = pathlib.Path(args.data).read_text(encoding="utf-8")
    rng = np.random.default_rng(0)
    lines = []
    while len(lines) < args.count:
        start = text.index("\n\n", int(rng.integers(0, len(text) - 1000))) + 2
        passage = text[start : start + args.chars]
        passage = passage[: passage.rfind(" ")]  # whole words
        first = passage.split("\n")[0]
        lines.append({"id": len(lines), "prompt": f"{passage}\n\n{first}\n"})
    out = pathlib.Path(__file__).with_name("grounded.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    print(f"wrote {out} ({len(lines)} prompts)")


if __name__ == "__main__":
    main()
