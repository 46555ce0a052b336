"""Text around generated tokens: the continuation of a prompt, stop strings, held-back tails."""

from __future__ import annotations

from collections.abc import Sequence


def continuation(tokenizer, prompt: Sequence[int], tokens: Sequence[int]) -> str:
    """The text `tokens` add after `prompt`.

    Decoded with the prompt, as Hugging Face's pipelines do: decoding the completion alone
    drops its leading space with SentencePiece tokenizers that add a dummy prefix (Llama's).
    """
    head = tokenizer.decode(list(prompt))
    whole = tokenizer.decode([*prompt, *tokens])
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(list(tokens))


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether there was one."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_prefix(seq: Sequence, stops: Sequence[Sequence]) -> int:
    """The length of the longest tail of `seq` that begins some stop sequence (unfinished).

    Streaming holds that tail back until it is decided. Works on text (stop strings) and
    on token ids (stop token sequences) alike: `seq` and each stop are of one kind.
    """
    n = len(seq)
    return max((h for s in stops for h in range(1, len(s)) if h <= n and seq[n - h :] == s[:h]), default=0)


def control_prefix(control: dict[str, str], template: str) -> str:
    """The control tokens of `control` ({"style": "formal"} -> "<style=formal>"), keys sorted,
    so training data and generation put several attributes in the same order."""
    return "".join(template.format(key=k, value=v) for k, v in sorted(control.items()))
