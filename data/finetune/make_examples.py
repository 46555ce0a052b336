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
- edit.jsonl: {"prompt": "<passage>\n\nIn plain words:\n", "response": "<the passage with
  thou/thee/hath/doth... in today's words>"} -- an editing task whose answer is mostly the
  prompt's own text, the case prompt-lookup speculative decoding is for
  (configs/edit_example.yaml). The same kind of prompts from the held-out 10% go to
  benchmarks/prompts/edit.jsonl for `jaxgen bench generate --speculative prompt_lookup`.

Only the first 90% of the text is used: the quickstart's validation split (the last 10%)
stays unseen by every example.
"""

from __future__ import annotations

import json
import pathlib
import random
import re

HERE = pathlib.Path(__file__).parent
TEXT = HERE.parent / "tinyshakespeare.txt"
RESPONSE_CHARS = 160  # about 40 quickstart BPE tokens: prompt and response fit in 64
PAIR_CHARS = 40  # capitals take more BPE tokens: both sequences of a pair fit in 64
EDIT_CHARS = 200  # ~50 tokens: prompt and response fit the edit run's 128-token context
# Archaic words and today's: a word-for-word edit (capitalised as in the passage).
MODERN = {
    "thou": "you", "thee": "you", "thy": "your", "thine": "your", "ye": "you", "hath": "has",
    "doth": "does", "dost": "do", "art": "are", "wilt": "will", "shalt": "shall", "hast": "have",
    "canst": "can", "ere": "before", "oft": "often", "nay": "no", "wherefore": "why",
    "hither": "here", "thither": "there", "prithee": "please", "'tis": "it is",
}  # fmt: skip
WORD = re.compile(r"[A-Za-z']+")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) in order: a block is "NAME:\n" followed by its lines."""
    out = []
    for block in text.split("\n\n"):
        head, _, body = block.partition("\n")
        if head.endswith(":") and body.strip():
            out.append((head[:-1], body.strip()))
    return out


def modernised(passage: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = MODERN.get(word.lower())
        if new is None:
            return word
        return new[0].upper() + new[1:] if word[0].isupper() else new

    return WORD.sub(swap, passage)


def passages(speech: str) -> list[str]:
    """The speech cut into passages of whole lines of at most EDIT_CHARS (a longer line:
    its first EDIT_CHARS, at a word's end)."""
    out, current = [], ""
    for line in speech.splitlines():
        if current and len(current) + 1 + len(line) > EDIT_CHARS:
            out.append(current)
            current = ""
        current = f"{current}\n{line}" if current else line
        if len(current) > EDIT_CHARS:
            out.append(current[: current.rfind(" ", 0, EDIT_CHARS)])
            current = ""
    return out + ([current] if current else [])


def edit_record(passage: str) -> dict:
    return {"prompt": f"{passage}\n\nIn plain words:\n", "response": modernised(passage)}


def main() -> None:
    full = TEXT.read_text()
    text = full[: int(len(full) * 0.9)]
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
    outputs = (
        ("sft.jsonl", sft[:3000]),
        ("control.jsonl", control),
        ("preference.jsonl", preference),
        # Every passage of the text once: a model that could memorise ~1,700 edited
        # passages did (held-out loss rose), so the task must be learnt as copying.
        ("edit.jsonl", [edit_record(p) for _, speech in blocks for p in passages(speech)]),
    )
    for name, records in outputs:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} records to {HERE / name}")
    # The benchmark's prompts: the same task on the held-out text, 16 passages spread over
    # it, each with at least one word to change.
    held_out = [
        edit_record(p) for _, speech in speeches(full[int(len(full) * 0.9) :]) for p in passages(speech)
    ]
    held_out = [r for r in held_out if len(r["response"]) > 100 and r["response"] not in r["prompt"]]
    bench = [{"id": i, "prompt": r["prompt"]} for i, r in enumerate(held_out[:: len(held_out) // 16][:16])]
    out = HERE.parent.parent / "benchmarks" / "prompts" / "edit.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in bench))
    print(f"wrote {len(bench)} prompts to {out}")


if __name__ == "__main__":
    main()
