"""Supervised fine-tuning records: encoding with a loss mask, and over-long handling.

A record's tokens are `bos? part_1 ... part_n eos?` (no second eos when the parts end
with one); its `loss_mask` is 1 on tokens of
trained parts (the response, or assistant turns) and on the final eos when the last
part is trained, 0 elsewhere. Chat records are rendered by the Hugging Face tokenizer's
chat template when its directory has one (data/chat.py), else by `data.turn_header` /
`data.turn_separator`. The pipeline shifts both by one (targets = tokens[1:],
loss_mask = mask[1:]), so the loss falls exactly on predicting response tokens.
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxgen.data import attributes, chat, documents, sources

_RECORDS_PER_CALL = 256


def encode_record(
    tokenizer, parts: list[tuple[str, bool]], ids: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """([L] int32 tokens, [L] uint8 mask) of one record from its parts' token ids."""
    tokens, mask = [], []
    if tokenizer.bos_id is not None:
        tokens.append(tokenizer.bos_id)
        mask.append(0)
    for (_, trained), piece in zip(parts, ids, strict=True):
        tokens.extend(piece)
        mask.extend([int(trained)] * len(piece))
    # A record already ending in eos gets no second one: a chat template whose end-of-turn
    # token is the eos (Llama-3-Instruct's <|eot_id|>) ends its last turn with it.
    if tokenizer.eos_id is not None and tokens[-1:] != [tokenizer.eos_id]:
        tokens.append(tokenizer.eos_id)
        mask.append(int(parts[-1][1]))
    return np.asarray(tokens, np.int32), np.asarray(mask, np.uint8)


def fit(tokens: np.ndarray, mask: np.ndarray, max_len: int, overlong: str, counts: documents.Counts):
    """Applies `data.overlong` to a record longer than `max_len`; None when it is dropped.

    A record left with no trained target (mask[1:] all 0) is dropped too.
    """
    if len(tokens) > max_len:
        if overlong == "drop":
            counts.dropped += 1
            return None
        tokens, mask = tokens[:max_len], mask[:max_len]
        if not mask[1:].any():
            counts.dropped += 1
            return None
        counts.truncated += 1
    elif not mask[1:].any():
        counts.dropped += 1
        return None
    return tokens, mask


def _parts(record: dict, data, path, line: int, template, control_template: str) -> list[tuple[str, bool]]:
    """The record's parts, after its control tokens (an untrained part) when it has attributes."""
    parts = sources.sft_parts(record, data, path, line, template)
    prefix = attributes.record_prefix(record, data, control_template, path, line)
    return [(prefix, False), *parts] if prefix else parts


def write_sft(config, tokenizer, source, writer, counts: documents.Counts, advance):
    """Encodes the source's SFT records into `writer`, one example per record."""
    data = config.data
    max_len = config.train.seq_len + 1  # one row holds seq_len inputs and seq_len targets
    records = documents.jsonl_records(source.files, data, source.lo, source.hi, counts, advance)
    template = chat.for_tokenizer(tokenizer)  # renders `messages` records when the tokenizer has one

    def read(path, line, record):
        return _parts(record, data, path, line, template, config.generate.control_template)

    records = documents.read_records(records, read, data, counts)
    for parts in iter(lambda: list(itertools.islice(records, _RECORDS_PER_CALL)), []):
        texts = [text for record_parts in parts for text, _ in record_parts]
        ids = iter(tokenizer.encode_batch(texts))
        for record_parts in parts:
            record_ids = list(itertools.islice(ids, len(record_parts)))
            kept = fit(*encode_record(tokenizer, record_parts, record_ids), max_len, data.overlong, counts)
            if kept is None:
                continue
            # Characters of the trained parts only: nats per character then divide the loss
            # (which covers those parts) by the text it covers.
            counts.chars += sum(len(t) for t, trained in record_parts if trained)
            counts.bytes += sum(len(t.encode("utf-8")) for t, trained in record_parts if trained)
            writer.write({"tokens": kept[0], "loss_mask": kept[1]})
            counts.examples += 1
            counts.tokens += len(kept[0])
    return writer.finish()
