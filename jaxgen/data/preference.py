"""Preference pairs (DPO): a prompt with a chosen and a rejected completion, as one record.

A JSONL record `{"prompt", "chosen", "rejected"}` (data.prompt_field, else
data.messages_field; data.chosen_field, data.rejected_field) gives two sequences, each
encoded as SFT encodes a record (data/sft.py): `bos prompt completion eos`, the loss
mask on the completion's trained text and eos only. Each field is text or a list of chat
messages. A messages prompt is rendered together with each completion as one
conversation, as SFT renders chat (the tokenizer's chat template, else
data.turn_header / turn_separator); a text completion after it is one
`data.trained_role` turn. The prompt part is the render of the prompt messages alone,
so it is the same text, and the same tokens, in both sequences; only the completion's
trained_role turns are trained, never an assistant turn inside the prompt. Attribute
control tokens (data/attributes.py) go before the prompt in both sequences.

The prepared record holds the pair back to back (Lc, Lr: the two sequences' lengths):

    tokens     [Lc + Lr] int32  chosen sequence ++ rejected sequence
    loss_mask  [Lc + Lr] uint8  1 on completion tokens (and each sequence's eos)
    pair       [Lc + Lr] uint8  1 on the chosen sequence's tokens, 2 on the rejected one's

The pipeline shifts each sequence by one on its own (inputs seq[:-1], targets seq[1:]),
so a pair fills Lc - 1 + Lr - 1 columns of one row: it fits when Lc + Lr <= seq_len + 2.
No target crosses from chosen into rejected: the chosen's last target is its eos, and
the rejected's bos is an input only.

A longer pair, with data.overlong: truncate, loses the same number of prompt tokens from
the left of both sequences (after bos and the control tokens), so both prompts stay
identical. It is dropped (counted) when even an empty prompt does not fit, or under
overlong: drop; so is a pair whose two sequences are the same tokens, which has no
preference to learn. The first few dropped pairs are named by file:line in the split's
statistics (`Counts.dropped_at`), which `jaxgen data prepare` prints.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np

from jaxgen.data import attributes, chat, documents, sources
from jaxgen.data.sft import encode_record
from jaxgen.errors import JaxgenError

_RECORDS_PER_CALL = 256
_SHOWN = 5  # dropped pairs named in the split's statistics
TRUNCATED = "truncated"
IDENTICAL = "chosen == rejected"

Parts = list[tuple[str, bool]]  # (text, trained) in order


@dataclasses.dataclass(frozen=True)
class Pair:
    """One record's text: parts of both sequences after the shared control tokens and prompt.

    Attributes:
        where: "file:line" of the record.
        head: the control tokens ([] or one text); never truncated, as they set the style.
        prompt: the prompt text (untrained), truncated from the left when the pair is too long.
        chosen, rejected: the parts after the prompt.
    """

    where: str
    head: list[str]
    prompt: str
    chosen: Parts
    rejected: Parts

    def texts(self) -> list[str]:
        """What to tokenize, each text once: head, prompt, chosen parts, rejected parts."""
        return [*self.head, self.prompt, *(t for t, _ in self.chosen), *(t for t, _ in self.rejected)]

    def parts(self, side: Parts) -> Parts:
        return [*((t, False) for t in self.head), (self.prompt, False), *side]


def read_pair(record: dict, data, path, lineno: int, style, control_template: str) -> Pair:
    """The pair of one record; `style` renders messages (a ChatTemplate or PlainChat).

    Raises:
        JaxgenError: a bad record (sources.preference_fields), or a chat template that fails
            or whose render of the prompt does not begin that of prompt + completion.
    """
    where = f"{path}:{lineno}"
    prompt, chosen, rejected = sources.preference_fields(record, data, path, lineno)
    prefix = attributes.record_prefix(record, data, control_template, path, lineno)
    head = [prefix] if prefix else []
    if isinstance(prompt, str):  # then both completions are text (preference_fields)
        return Pair(where, head, prompt, [(chosen, True)], [(rejected, True)])
    text = "".join(t for t, _ in _chat_parts(style, prompt, data.trained_role, where))
    sides = [
        _after_prompt(style, prompt, text, c, data.trained_role, where, field)
        for c, field in ((chosen, data.chosen_field), (rejected, data.rejected_field))
    ]
    return Pair(where, head, text, *sides)


def _chat_parts(style, messages: list[dict], trained_role: str, where: str) -> Parts:
    try:
        return style.parts(messages, trained_role)
    except JaxgenError as e:  # the template's file is named; add the record's
        raise JaxgenError(f"{where}: {e}") from None


def _after_prompt(style, prompt: list[dict], prompt_text: str, completion, trained_role, where, field):
    """The parts of render(prompt + completion) after `prompt_text` (the prompt's render).

    Only the completion's trained_role turns are trained: a trained part reaching into the
    prompt's text (an assistant turn of the prompt) keeps just its tail past the prompt.
    """
    if isinstance(completion, str):
        completion = [{"role": trained_role, "content": completion}]
    parts = _chat_parts(style, prompt + completion, trained_role, where)
    if not "".join(t for t, _ in parts).startswith(prompt_text):
        source = getattr(style, "source", "chat format")
        raise JaxgenError(
            f"{where}: {source}: chat template is not prefix-consistent: the render of the prompt "
            f"does not begin the render of prompt + {field!r}"
        )
    out, pos = [], 0
    for text, trained in parts:
        keep = text[max(len(prompt_text) - pos, 0) :]
        if keep:
            out.append((keep, trained))
        pos += len(text)
    return out


def join_pair(
    chosen: tuple[np.ndarray, np.ndarray],
    rejected: tuple[np.ndarray, np.ndarray],
    start: int,
    n_prompt: int,
    max_len: int,
    overlong: str,
) -> tuple[dict | None, str]:
    """The prepared record of two encoded sequences, and what happened: "" (kept as is),
    TRUNCATED, or why the pair was dropped (record None).

    Args:
        chosen, rejected: ([L] int32 tokens, [L] uint8 loss mask) of each sequence.
        start: index of the first prompt token (after bos and the control tokens).
        n_prompt: prompt tokens, the same in both sequences.
        max_len: the most tokens a pair may hold (seq_len + 2).
        overlong: `data.overlong`.
    """
    (tc, mc), (tr, mr) = chosen, rejected
    if np.array_equal(tc, tr) and np.array_equal(mc, mr):
        return None, IDENTICAL
    outcome = ""
    excess = len(tc) + len(tr) - max_len
    if excess > 0:
        cut = -(-excess // 2)  # from each prompt, so that both stay the same
        if overlong == "drop" or cut > n_prompt:
            return None, f"longer than seq_len + 2 = {max_len} tokens"
        tc, mc, tr, mr = (np.delete(x, np.s_[start : start + cut]) for x in (tc, mc, tr, mr))
        outcome = TRUNCATED
    if not (mc[1:].any() and mr[1:].any()):
        return None, "no completion token to train on"
    side = np.concatenate([np.full(len(tc), 1, np.uint8), np.full(len(tr), 2, np.uint8)])
    record = {"tokens": np.concatenate([tc, tr]), "loss_mask": np.concatenate([mc, mr]), "pair": side}
    return record, outcome


def _encode(tokenizer, pair: Pair, ids: Iterator[list[int]], max_len: int, overlong: str):
    """join_pair of one pair, its token ids taken from `ids` in `Pair.texts` order."""
    head = [next(ids) for _ in pair.head]
    prompt = next(ids)
    sequences = []
    for side in (pair.chosen, pair.rejected):
        side_ids = [next(ids) for _ in side]
        sequences.append(encode_record(tokenizer, pair.parts(side), [*head, prompt, *side_ids]))
    start = (tokenizer.bos_id is not None) + sum(map(len, head))
    return join_pair(*sequences, start, len(prompt), max_len, overlong)


def write_preference(config, tokenizer, source, writer, counts: documents.Counts, advance):
    """Encodes the source's preference records into `writer`, one record per kept pair."""
    data = config.data
    max_len = config.train.seq_len + 2  # each sequence shifts on its own: (Lc - 1) + (Lr - 1) <= T
    records = documents.jsonl_records(source.files, data, source.lo, source.hi, counts, advance)
    template = chat.for_tokenizer(tokenizer)
    style = chat.PlainChat.from_data(data) if template is None else template
    control = config.generate.control_template
    pairs_read = documents.read_records(
        records, lambda path, line, rec: read_pair(rec, data, path, line, style, control), data, counts
    )
    for pairs in iter(lambda: list(itertools.islice(pairs_read, _RECORDS_PER_CALL)), []):
        ids = iter(tokenizer.encode_batch([text for pair in pairs for text in pair.texts()]))
        for pair in pairs:
            record, outcome = _encode(tokenizer, pair, ids, max_len, data.overlong)
            if record is None:
                if outcome == IDENTICAL:
                    counts.identical += 1
                else:
                    counts.dropped += 1
                if len(counts.dropped_at) < _SHOWN:
                    counts.dropped_at.append(f"{pair.where} ({outcome})")
                continue
            counts.truncated += outcome == TRUNCATED
            # The characters the loss covers (both completions), for nats per character.
            trained = [t for t, on in (*pair.chosen, *pair.rejected) if on]
            counts.chars += sum(map(len, trained))
            counts.bytes += sum(len(t.encode("utf-8")) for t in trained)
            writer.write(record)
            counts.examples += 1
            counts.tokens += len(record["tokens"])
    return writer.finish()
