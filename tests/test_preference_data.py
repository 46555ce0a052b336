"""Preference pairs: prepared records, batch layout (two segments per pair), over-long and bad input."""

import json
import pathlib
import random

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config import load_config
from jaxgen.data import as_numpy, builder, eval_batches, prepare, train_batches
from jaxgen.data.chat import ChatTemplate
from jaxgen.data.pipeline import FIELDS
from jaxgen.data.preference import read_pair
from jaxgen.errors import JaxgenError
from jaxgen.model.attention import attention_mask
from jaxgen.tokenizer import load_tokenizer

T, B = 64, 4


def _write(path: pathlib.Path, records) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _config(root: pathlib.Path, files, *overrides):
    return load_config(None, [
        f"data.train_files={json.dumps([str(f) for f in files])}", f"data.data_dir={root / 'prepared'}",
        "data.format=preference", "data.validation_fraction=0", "tokenizer.kind=char",
        "tokenizer.vocab_size=256", f"train.seq_len={T}", f"train.batch_size={B}", *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    records = [
        {
            "prompt": f"q{i}: " + "ab" * rng.randint(0, 3),
            "chosen": f"c{i}" + "xy" * rng.randint(0, 2),
            "rejected": f"r{i}" + "uv" * rng.randint(0, 2),
        }
        for i in range(40)
    ]
    path = _write(root / "pairs.jsonl", records)
    config = _config(root, [path], "data.validation_fraction=0.25")
    info = prepare(config, progress=False)
    assert info.kind == "preference" and info.splits["train"].examples == 30
    return config, info, records


def _pairs_of(batch: dict):
    """Yields (row, chosen slice, rejected slice) of every pair, checking the segment layout."""
    seg = batch["segment_ids"]
    for row in range(seg.shape[0]):
        used = seg[row][seg[row] > 0]
        assert (seg[row][len(used) :] == 0).all()  # padding only after the last pair
        assert len(used) == 0 or set(used) == set(range(1, used.max() + 1)) and used.max() % 2 == 0
        assert np.array_equal(used, np.sort(used))
        for k in range(1, (used.max() if len(used) else 0) // 2 + 1):
            chosen, rejected = np.flatnonzero(seg[row] == 2 * k - 1), np.flatnonzero(seg[row] == 2 * k)
            assert rejected[0] == chosen[-1] + 1  # the rejected sequence follows its chosen one
            yield row, slice(chosen[0], chosen[-1] + 1), slice(rejected[0], rejected[-1] + 1)


def _check_sequence(tok, batch, row, sl) -> tuple[str, str]:
    """(prompt, completion) of one sequence, after checking its shift, positions and mask."""
    tokens, targets, mask = batch["tokens"][row, sl], batch["targets"][row, sl], batch["loss_mask"][row, sl]
    assert np.array_equal(batch["positions"][row, sl], np.arange(len(tokens)))
    assert tokens[0] == tok.bos_id and targets[-1] == tok.eos_id
    assert np.array_equal(tokens[1:], targets[:-1])
    prompt = tok.decode(targets[mask == 0])
    n_prompt = len(tok.encode(prompt))  # targets are prompt, completion, eos: the mask is one run
    assert not mask[:n_prompt].any() and mask[n_prompt:].all() and mask[-1] == 1
    return prompt, tok.decode(targets[mask == 1])  # eos decodes to ""


def test_pairs_are_two_segments_of_one_row_with_the_loss_on_completions(pairs):
    config, info, records = pairs
    tok = load_tokenizer(info.tokenizer_path)
    by_prompt = {r["prompt"]: r for r in records}
    one_epoch = config.model_copy(update={"data": config.data.model_copy(update={"num_epochs": 1})})
    seen, packed = [], False
    for batch in train_batches(one_epoch, None):
        assert set(batch) == set(FIELDS) and all(v.shape == (B, T) for v in batch.values())
        assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()
        for row, chosen, rejected in _pairs_of(batch):
            packed |= batch["segment_ids"][row].max() > 2
            prompt, good = _check_sequence(tok, batch, row, chosen)
            same_prompt, bad = _check_sequence(tok, batch, row, rejected)
            assert same_prompt == prompt
            assert (good, bad) == (by_prompt[prompt]["chosen"], by_prompt[prompt]["rejected"])
            seen.append(prompt)
    assert packed  # some row holds more than one pair
    assert sorted(seen) == sorted(r["prompt"] for r in records[:30])  # each pair once per epoch


def test_the_attention_mask_keeps_chosen_and_rejected_apart(pairs):
    config, _, _ = pairs
    b = as_numpy(next(train_batches(config, None)))
    mask = np.asarray(attention_mask(jnp.asarray(b["segment_ids"]), jnp.asarray(b["segment_ids"]), 0))[:, 0]
    for row, chosen, rejected in _pairs_of(b):
        assert not mask[row, rejected][:, chosen].any()  # [T, S]: rejected queries, chosen keys
        assert mask[row, rejected][:, rejected].any()


def test_eval_covers_the_validation_pairs_once(pairs):
    config, info, records = pairs
    tok = load_tokenizer(info.tokenizer_path)
    prompts = []
    for batch in eval_batches(config, None, batch_size=B):
        for row, chosen, _ in _pairs_of(batch):
            prompts.append(_check_sequence(tok, batch, row, chosen)[0])
    assert sorted(prompts) == sorted(r["prompt"] for r in records[30:])


def test_resume_and_process_rows(pairs):
    config, _, _ = pairs
    straight = [as_numpy(b) for b, _ in zip(train_batches(config, None), range(8), strict=False)]
    it = train_batches(config, None)
    for _ in range(3):
        next(it)
    resumed = train_batches(config, None)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    for k in range(3, 8):
        batch = as_numpy(next(resumed))
        assert all(np.array_equal(batch[f], straight[k][f]) for f in FIELDS)
    halves = [train_batches(config, None, process_index=p, process_count=2) for p in range(2)]
    for k in range(3):
        rows = [as_numpy(next(h)) for h in halves]
        for f in FIELDS:
            assert np.array_equal(np.concatenate([r[f] for r in rows]), straight[k][f])


def test_a_shorter_seq_len_than_prepared_is_refused(pairs):
    config, _, _ = pairs
    shorter = config.model_copy(update={"train": config.train.model_copy(update={"seq_len": T // 2})})
    with pytest.raises(JaxgenError, match=rf"train.seq_len: {T // 2} is shorter than the {T}"):
        train_batches(shorter, None)


# ----------------------------------------------------------------------------- over-long, identical


def _stored(info, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss_mask) of the chosen and the rejected sequence of prepared pair i."""
    record = builder.open_split(info.dataset_dir, "train")[i]
    return [(record["tokens"][record["pair"] == s], record["loss_mask"][record["pair"] == s]) for s in (1, 2)]


def test_overlong_prompts_are_cut_from_the_left_and_bad_pairs_dropped(tmp_path, capsys):
    long_prompt = "".join(f"{i % 10}" for i in range(80)) + " which?"
    path = _write(tmp_path / "pairs.jsonl", [
        {"prompt": "short: ", "chosen": "yes", "rejected": "no"},
        {"prompt": long_prompt, "chosen": "this", "rejected": "that one", "attributes": {"style": "terse"}},
        {"prompt": "same? ", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "y" * 40, "rejected": "n" * 30},  # 42 + 32 > T + 2 without the prompt
        {"prompt": "last: ", "chosen": "ok", "rejected": "ko"},
    ])  # fmt: skip
    info = prepare(_config(tmp_path, [path]))
    out = capsys.readouterr().out
    s = info.splits["train"]
    assert (s.examples, s.truncated, s.dropped, s.identical) == (3, 1, 1, 1)
    assert s.dropped_at == [
        f"{path}:3 (chosen == rejected)",
        f"{path}:4 (longer than seq_len + 2 = 66 tokens)",
    ]
    assert "train: 1 pairs longer than seq_len + 2 tokens: prompts truncated from the left" in out
    assert "train: 1 pairs dropped: chosen and rejected are the same" in out
    assert f"train: dropped {path}:4 (longer than seq_len + 2 = 66 tokens)" in out

    tok = load_tokenizer(info.tokenizer_path)
    (tc, mc), (tr, mr) = _stored(info, 1)
    head = tok.encode("<style=terse>")
    # bos, control tokens (h), prompt (87), completion (4 or 8), eos: 190 + 2h tokens, 124 + 2h
    # over T + 2 = 66, so 62 + h prompt tokens go from each sequence and 25 - h stay (12 for h = 13).
    h = len(head)
    kept = 25 - h
    assert len(tc) + len(tr) == 66 and len(tc) == 1 + h + kept + 4 + 1
    for tokens, mask, completion in ((tc, mc, "this"), (tr, mr, "that one")):
        assert tokens[0] == tok.bos_id and list(tokens[1 : 1 + h]) == head  # control tokens kept
        assert tok.decode(tokens[1 + h :][mask[1 + h :] == 0]) == long_prompt[-kept:]
        assert tok.decode(tokens[mask == 1]) == completion
    assert np.array_equal(tc[: 1 + h + kept], tr[: 1 + h + kept])  # the same prompt in both

    drop = _config(tmp_path / "d", [path], "data.overlong=drop")
    s = prepare(drop, progress=False).splits["train"]
    assert (s.examples, s.truncated, s.dropped, s.identical) == (2, 0, 2, 1)
    assert f"{path}:2 (longer than seq_len + 2 = 66 tokens)" in s.dropped_at


def test_a_messages_record_trains_only_the_completion_turns(tmp_path):
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},  # part of the prompt: never trained here
        {"role": "user", "content": "tea?"},
    ]
    path = _write(tmp_path / "chat.jsonl", [
        {"prompt": prompt, "chosen": "yes please", "rejected": [{"role": "assistant", "content": "no"}]},
        {"messages": prompt[:1], "chosen": [{"role": "assistant", "content": "hey"}], "rejected": "go"},
    ])  # fmt: skip
    info = prepare(_config(tmp_path, [path], "train.seq_len=128"), progress=False)
    assert info.splits["train"].truncated == 0
    tok = load_tokenizer(info.tokenizer_path)
    (tc, mc), (tr, mr) = _stored(info, 0)
    rendered = "user: hi\nassistant: hello\nuser: tea?\nassistant: "  # data.turn_header / separator
    for tokens, mask, completion in ((tc, mc, "yes please\n"), (tr, mr, "no\n")):
        assert tok.decode(tokens[mask == 0]) == rendered  # bos decodes to ""
        assert tok.decode(tokens[mask == 1]) == completion and mask[-1] == 1
    (tc, mc), (tr, mr) = _stored(info, 1)
    assert tok.decode(tc[mc == 0]) == tok.decode(tr[mr == 0]) == "user: hi\nassistant: "
    assert (tok.decode(tc[mc == 1]), tok.decode(tr[mr == 1])) == ("hey\n", "go\n")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """A prepared char tokenizer, so that bad records reach the pair encoder (not the trainer)."""
    root = tmp_path_factory.mktemp("tok")
    path = _write(root / "ok.jsonl", [{"prompt": "abc: ", "chosen": "first", "rejected": "second []{}"}])
    return prepare(_config(root, [path]), progress=False).tokenizer_path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"prompt": "p", "rejected": "r"},
            r"pairs.jsonl:2: no field 'chosen' \(the record has: prompt, rejected\)",
        ),
        ({"chosen": "c", "rejected": "r"}, r"pairs.jsonl:2: no field 'prompt'"),
        ({"prompt": "p", "chosen": "c", "rejected": ""}, r"pairs.jsonl:2: field 'rejected' is empty"),
        (
            {"prompt": "p", "chosen": 5, "rejected": "r"},
            r"pairs.jsonl:2: field 'chosen' is int, not a string",
        ),
        (
            {"prompt": [{"role": "user", "content": "p"}], "chosen": [], "rejected": "r"},
            r"pairs.jsonl:2: field 'chosen': expected a non-empty list of messages",
        ),
        (
            {"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": [{"role": "user"}]},
            r"pairs.jsonl:2: field 'rejected': message 0 needs a string 'role' and 'content'",
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]},
            r"pairs.jsonl:2: field 'rejected' is a list of messages but 'prompt' is a string",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "chosen": "c",
                "rejected": [{"role": "user", "content": "r"}],
            },
            r"pairs.jsonl:2: field 'rejected' has no 'assistant' turn",
        ),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, char_tokenizer, record, message):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, record])
    strict = "data.bad_lines=strict"  # skipped and counted by default: tests/test_bad_lines.py
    with pytest.raises(JaxgenError, match=message):
        prepare(_config(tmp_path, [path], f"tokenizer.path={char_tokenizer}", strict), progress=False)
    assert not list((tmp_path / "prepared" / "default" / "jaxgen_tokens").iterdir())  # nothing half-written


def test_bad_records_fail_as_clearly_when_the_tokenizer_is_trained_first(tmp_path):
    path = _write(
        tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "p"}]
    )
    with pytest.raises(JaxgenError, match=r"pairs.jsonl:2: no field 'chosen'"):
        prepare(_config(tmp_path, [path], "data.bad_lines=strict"), progress=False)


_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_chat_template_renders_the_prompt_once_and_trains_the_completion(tmp_path):
    data = _config(tmp_path, []).data
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}
    template = ChatTemplate(_TEMPLATE, "tok/tokenizer_config.json", bos_token="<s>")
    pair = read_pair(record, data, "pairs.jsonl", 1, template, "<{key}={value}>")
    assert pair.prompt == "<|user|>hi<|end|>"  # the template's bos is cut: the encoder adds its own
    assert pair.chosen == [("<|assistant|>", False), ("yes<|end|>", True)]
    assert pair.rejected == [("<|assistant|>", False), ("no<|end|>", True)]

    reversing = ChatTemplate(
        _TEMPLATE.replace("in messages", "in messages|reverse"), "tok/tokenizer_config.json"
    )
    with pytest.raises(
        JaxgenError, match=r"pairs.jsonl:1: tok/tokenizer_config.json: .*not prefix-consistent"
    ):
        read_pair(record, data, "pairs.jsonl", 1, reversing, "<{key}={value}>")
