"""Printing one prompt's completion: streamed, or each returned sequence numbered
(`jaxgen generate --prompt` and `--interactive` share it)."""

from __future__ import annotations

import itertools


def complete(
    lm, text: str, opts: dict, *, chat=False, chunk=8, stream=True, echo=True, row_id=0, where="--prompt"
) -> None:
    """Completes one prompt on stdout.

    One sequence streams after the prompt. Beams, several sequences or `stream=False`
    print the prompt once, then each returned sequence under a numbered header with its
    score (`score=`: the beam score; `logprob=`: a sample's log-probability) and finish
    reason. `echo=False` leaves the prompt out (a terminal already shows it); `row_id`
    keys sampling (`LanguageModel.generate`'s row_ids).
    """
    prompt = lm.chat_prompt([{"role": "user", "content": text}], where) if chat else text
    resolved = lm.resolve(**opts).options  # bad options fail before anything is printed
    if stream and resolved.num_beams == 1 and resolved.num_return_sequences == 1:
        pieces = lm.stream(prompt, chunk=chunk, row_id=row_id, **opts)
        first = next(pieces, "")  # a prompt too long fails before anything is printed
        # The user's text, then the completion continuing it as it streams; a chat reply is a
        # turn of its own, so it starts on a new line (the template's markup is not shown).
        if echo:
            print(text, end="\n" if chat else "")
        for piece in itertools.chain([first], pieces):
            print(_shown(piece), end="", flush=True)
        print()
        return
    [result] = lm.generate([prompt], row_ids=[row_id], **opts)
    if echo:
        print(text)
    label = "score" if resolved.num_beams > 1 else "logprob"
    shown = result.texts if result.texts is not None else [_shown(c) for c in result.completions]
    rows = zip(shown, result.scores, result.finish_reasons, strict=True)
    for j, (completion, score, reason) in enumerate(rows, 1):
        print(f"[{j}/{len(shown)}] {label}={score:.4f} finish={reason}")
        print(completion)


def _shown(piece) -> str:
    """Text as is; token ids (a model without a tokenizer) space-separated."""
    return piece if isinstance(piece, str) else " ".join(map(str, piece))
