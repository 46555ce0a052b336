"""Writes the fine-tuning examples' data from data/tinyshakespeare.txt (deterministic).

    python data/finetune/make_examples.py

- sft.jsonl: {"prompt": "<the line before>\n\n<SPEAKER>:\n", "response": "<the speech's opening>"}
  -- who speaks next, in their voice (configs/sft_example.yaml, configs/lora_example.yaml).
- control.jsonl: {"text": "<a line>", "attributes": {"case": "upper" | "lower"}} -- the same
  lines written in capitals or in small letters, a property anyone can see in a sample
  (configs/control_example.yaml).
- preference.jsonl: {"prompt": "<SPEAKER>:\n", "chosen": "<SPEECH OPENING IN CAPITALS>",
  "rejected": "<the speech's opening as written>"} -- a preference for declaiming, short
  enough that both sequences of a pair fit one 64-token row (configs/dpo_example.yaml).

Only the first 90% of the text is used: the quickstart's validation split (the last 10%)
stays unseen by every example.
"""

from __future__ import annotations

import json
import pathlib
import random

HERE = pathlib.Path(__file__).parent
TEXT = HERE.parent / "tinyshakespeare.txt"
RESPONSE_CHARS = 160  # about 40 quickstart BPE tokens: prompt and response fit in 64
PAIR_CHARS = 40  # capitals take more BPE tokens: both sequences of a pair fit in 64


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) in order: a block is "NAME:\n" followed by its lines."""
    out = []
    for block in text.split("\n\n"):
        head, _, body = block.partition("\n")
        if head.endswith(":") and body.strip():
            out.append((head[:-1], body.strip()))
    return out


def main() -> None:
    text = TEXT.read_text()
    text = text[: int(len(text) * 0.9)]
    blocks = speeches(text)
    sft = []
    for (_, before), (speaker, speech) in zip(blocks, blocks[1:], strict=False):
        last_line = before.splitlines()[-1]
        sft.append({"prompt": f"{last_line}\n\n{speaker}:\n", "response": speech[:RESPONSE_CHARS]})
    rng = random.Random(0)
    lines = [line for line in text.splitlines() if len(line) > 20 and not line.endswith(":")]
    control = []
    for line in rng.sample(lines, 4000):
        case = rng.choice(("upper", "lower"))
        control.append(
            {"text": line.upper() if case == "upper" else line.lower(), "attributes": {"case": case}}
        )
    preference = []
    for speaker, speech in blocks[:3000]:
        opening = speech.splitlines()[0][:PAIR_CHARS]
        preference.append({"prompt": f"{speaker}:\n", "chosen": opening.upper(), "rejected": opening})
    outputs = (("sft.jsonl", sft[:3000]), ("control.jsonl", control), ("preference.jsonl", preference))
    for name, records in outputs:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} records to {HERE / name}")


if __name__ == "__main__":
    main()
