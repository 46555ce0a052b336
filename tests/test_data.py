"""`prepare`: splits, statistics, no-op re-runs, rebuilds, sources, and every bad input's message."""

import json
import os
import pathlib

import numpy as np
import pytest
from data_configs import char_data_config

from jaxgen.data import builder, prepare, split_stats
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer import load_tokenizer

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
PARAGRAPHS = [
    "The quick brown fox.\nJumps over the lazy dog.",
    "Pack my box\nwith five dozen jugs.",
    "Sphinx of black quartz.",
]


def _write(path: pathlib.Path, content: str | bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _stream(config, info, split: str) -> np.ndarray:
    """The split's whole token stream, read back from the TFDS shards."""
    source = builder.open_split(info.dataset_dir, split)
    return np.concatenate([source[i]["tokens"] for i in range(len(source))])


def _documents(config, info, split: str) -> list[str]:
    tok = load_tokenizer(info.tokenizer_path)
    stream = _stream(config, info, split)
    assert stream[0] == tok.eos_id and stream[-1] == tok.eos_id
    cuts = np.flatnonzero(stream == tok.eos_id)
    return [tok.decode(stream[a + 1 : b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


# ----------------------------------------------------------------------------- splits


def test_tinyshakespeare_validation_is_the_last_ten_percent_of_characters(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    config = char_data_config(
        tmp_path,
        [SHAKESPEARE],
        "data.documents=file",
        "data.validation_fraction=0.1",
        "tokenizer.kind=bpe",
        "tokenizer.vocab_size=1024",
    )
    info = prepare(config, progress=False)
    cut = int(len(text) * 0.9)  # nanoGPT: train = data[:int(n*0.9)], val = data[int(n*0.9):]
    assert info.splits["validation"].chars == len(text) - cut
    assert info.splits["train"].chars == cut
    assert split_stats(config, "validation") == info.splits["validation"]
    # The stored tokens decode back to exactly those characters.
    assert _documents(config, info, "validation") == [text[cut:]]
    assert _documents(config, info, "train") == [text[:cut]]
    assert info.splits["validation"].bytes == len(text[cut:].encode())


def test_documents_modes_and_globs(tmp_path):
    for i, para in enumerate(PARAGRAPHS):
        _write(tmp_path / "docs" / f"{i}.txt", para + "\n")
    joined = _write(tmp_path / "joined.txt", "\n\n  \n".join(PARAGRAPHS) + "\n")

    per_file = char_data_config(tmp_path / "a", [tmp_path / "docs" / "*.txt"], "data.validation_fraction=0")
    assert _documents(per_file, prepare(per_file, progress=False), "train") == [p + "\n" for p in PARAGRAPHS]

    blank = char_data_config(
        tmp_path / "b", [joined], "data.documents=blank_lines", "data.validation_fraction=0"
    )
    info = prepare(blank, progress=False)
    assert _documents(blank, info, "train") == PARAGRAPHS
    assert info.splits["train"].examples == 3
    assert info.splits["train"].chars == sum(map(len, PARAGRAPHS))

    lines = char_data_config(tmp_path / "c", [joined], "data.documents=line", "data.validation_fraction=0")
    expected = [line for p in PARAGRAPHS for line in p.split("\n")]
    assert _documents(lines, prepare(lines, progress=False), "train") == expected


def test_jsonl_text_field_and_explicit_validation_files(tmp_path):
    train = _write(tmp_path / "train.jsonl", "".join(json.dumps({"body": p}) + "\n" for p in PARAGRAPHS))
    val = _write(tmp_path / "val.jsonl", json.dumps({"body": "held out"}) + "\n\n")
    config = char_data_config(
        tmp_path, [train], "data.format=jsonl", "data.text_field=body", f"data.validation_files=[{val}]"
    )
    info = prepare(config, progress=False)
    assert _documents(config, info, "train") == PARAGRAPHS
    assert _documents(config, info, "validation") == ["held out"]
    assert info.splits["validation"].examples == 1


def test_catalog_dataset_from_data_dir(tmp_path):
    import tensorflow_datasets as tfds

    root = tmp_path / "prepared" / "toy_catalog" / "plain" / "1.0.0"
    root.mkdir(parents=True)
    spec = tfds.features.FeaturesDict({"text": tfds.features.Text()})
    writer = builder.SplitWriter(root, "train", spec, name="toy_catalog")
    for p in PARAGRAPHS:
        writer.write({"text": p})
    names = builder.template(root, "train", "toy_catalog")
    tfds.folder_dataset.write_metadata(
        data_dir=root, features=spec, split_infos=[writer.finish()], filename_template=names, check_data=False
    )
    config = char_data_config(tmp_path, ["tfds:toy_catalog/plain"], "data.validation_fraction=0")
    assert _documents(config, prepare(config, progress=False), "train") == PARAGRAPHS

    missing = char_data_config(tmp_path, ["tfds:wikitext/wikitext-103-raw-v1"])
    with pytest.raises(
        JaxgenError, match=r"tfds:wikitext/wikitext-103-raw-v1: not prepared in .*never downloads"
    ):
        prepare(missing, progress=False)


# ----------------------------------------------------------------------------- no-op / rebuild


def _snapshot(directory: pathlib.Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_prepare_twice_is_a_no_op_and_changes_rebuild(tmp_path, capsys):
    corpus = _write(tmp_path / "corpus.txt", "\n".join(PARAGRAPHS) * 20)
    config = char_data_config(tmp_path, [corpus])
    first = prepare(config)
    assert first.rebuilt and "preparing" in capsys.readouterr().out
    before = _snapshot(tmp_path / "prepared")

    second = prepare(config)
    assert not second.rebuilt and "up to date" in capsys.readouterr().out
    assert second.splits == first.splits
    assert _snapshot(tmp_path / "prepared") == before  # nothing rewritten

    # pipeline-only settings do not invalidate the dataset
    assert not prepare(char_data_config(tmp_path, [corpus], "data.shuffle_seed=7"), progress=False).rebuilt

    # new content (same size, so only the hash can tell) rebuilds tokenizer and data
    corpus.write_text(("\n".join(PARAGRAPHS) * 20).replace("fox", "cat"))
    os.utime(corpus, ns=(1, 1))
    third = prepare(config, progress=False)
    assert third.rebuilt
    assert _documents(config, third, "train")[0].count("cat") > 0
    tok = tmp_path / "prepared" / "default" / "tokenizer.model"
    assert tok.stat().st_mtime_ns != before[str(tok)]

    # a changed config field that shapes the records rebuilds too
    assert prepare(
        char_data_config(tmp_path, [corpus], "data.validation_fraction=0.5"), progress=False
    ).rebuilt
    leftovers = [p.name for p in (tmp_path / "prepared" / "default" / "jaxgen_tokens").iterdir()]
    assert leftovers == ["1.0.0"]  # no temp or old directories left behind


# ----------------------------------------------------------------------------- SFT


def _sft_records():
    return [
        {"prompt": "Q: two plus two?\nA: ", "response": "four"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"},
            ]
        },
        {"prompt": "x" * 50, "response": "long answer " * 10},  # 171 tokens > seq_len + 1
    ]


def test_sft_records_keep_the_loss_on_responses_and_report_overlong(tmp_path, capsys):
    path = _write(tmp_path / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in _sft_records()))
    config = char_data_config(
        tmp_path, [path], "data.format=sft", "data.validation_fraction=0", "train.seq_len=64"
    )
    info = prepare(config)
    assert "1 records longer than seq_len + 1 tokens truncated" in capsys.readouterr().out
    stats = info.splits["train"]
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 1, 0)
    tok = load_tokenizer(info.tokenizer_path)
    source = builder.open_split(info.dataset_dir, "train")
    trained = [tok.decode(r["tokens"][r["loss_mask"] == 1]) for r in (source[i] for i in range(3))]
    # eos decodes to ""; the over-long record keeps 65 tokens: bos, 50 prompt chars, 14 response chars
    assert trained == ["four", "hello\nsee you\n", ("long answer " * 10)[:14]]
    first = source[0]
    assert first["tokens"][0] == tok.bos_id and first["tokens"][-1] == tok.eos_id
    assert tok.decode(first["tokens"][first["loss_mask"] == 0]) == "Q: two plus two?\nA: "
    assert len(source[2]["tokens"]) == 65

    drop = char_data_config(
        tmp_path / "d",
        [path],
        "data.format=sft",
        "data.validation_fraction=0",
        "train.seq_len=64",
        "data.overlong=drop",
    )
    stats = prepare(drop, progress=False).splits["train"]
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 0, 1)


# ----------------------------------------------------------------------------- bad input


def test_invalid_utf8_is_replaced_and_counted_or_rejected_with_file_line(tmp_path):
    corpus = _write(tmp_path / "bad.txt", b"good line\nbad \xff\xfe here\nfine \xef\xbf\xbd kept\n" * 3)
    info = prepare(char_data_config(tmp_path, [corpus], "data.validation_fraction=0"), progress=False)
    # 0xff and 0xfe are each replaced (2 per copy, 3 copies); the U+FFFD already in the file is not counted
    assert info.splits["train"].replaced_chars == 6
    strict = char_data_config(tmp_path / "s", [corpus], "data.strict_utf8=true")
    with pytest.raises(JaxgenError, match=r"bad.txt:2: invalid UTF-8 \(byte 0xff\)"):
        prepare(strict, progress=False)


@pytest.mark.parametrize(
    ("content", "overrides", "message"),
    [
        ('{"text": "ok"}\n{"text": "ok"}\nnot json\n', [], r"data.jsonl:3: not valid JSON"),
        ('{"text": "ok"}\n\n{"body": "x"}\n', [], r"data.jsonl:3: no field 'text' \(the record has: body\)"),
        ('{"text": 5}\n', [], r"data.jsonl:1: field 'text' is int, not a string"),
        ("[1, 2]\n", [], r"data.jsonl:1: expected a JSON object, got list"),
        ('{"prompt": "p"}\n', ["data.format=sft"], r"data.jsonl:1: no field 'response'"),
        (
            '{"question": "p"}\n',
            ["data.format=sft"],
            r"data.jsonl:1: expected fields 'prompt' and 'response'",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            ["data.format=sft"],
            r"data.jsonl:1: no 'assistant' turn",
        ),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, overrides, message):
    path = _write(tmp_path / "data.jsonl", content)
    fmt = [] if overrides else ["data.format=jsonl"]
    strict = "data.bad_lines=strict"  # skipped and counted by default: tests/test_bad_lines.py
    config = char_data_config(tmp_path, [path], *fmt, *overrides, "data.validation_fraction=0", strict)
    with pytest.raises(JaxgenError, match=message):
        prepare(config, progress=False)
    assert not (tmp_path / "prepared" / "default" / "jaxgen_tokens").exists()  # nothing half-written


def test_missing_empty_and_unmatched_sources(tmp_path):
    with pytest.raises(JaxgenError, match=r"nope.txt: file not found \(listed in data.train_files\)"):
        prepare(char_data_config(tmp_path, [tmp_path / "nope.txt"]), progress=False)
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(JaxgenError, match=r"empty.txt: file is empty"):
        prepare(char_data_config(tmp_path, [empty]), progress=False)
    with pytest.raises(JaxgenError, match=r"data.train_files: '.*\*.md' matches no files"):
        prepare(char_data_config(tmp_path, [tmp_path / "*.md"]), progress=False)
    with pytest.raises(JaxgenError, match=r"data.train_files: no training files"):
        prepare(char_data_config(tmp_path, []), progress=False)
    blank = _write(tmp_path / "blank.txt", "\n\n\n")
    with pytest.raises(JaxgenError, match=r"contain no text"):
        prepare(char_data_config(tmp_path, [blank]), progress=False)


def test_vocab_too_small_for_byte_fallback_through_prepare(tmp_path):
    corpus = _write(tmp_path / "c.txt", "".join(chr(c) for c in range(0x400, 0x480)) * 3)
    config = char_data_config(
        tmp_path, [corpus], "tokenizer.kind=bpe", "tokenizer.byte_fallback=true", "tokenizer.vocab_size=300"
    )
    with pytest.raises(JaxgenError, match=r"^tokenizer.vocab_size: 300 is too small .*needs at least \d+"):
        prepare(config, progress=False)


def test_worker_processes_write_the_same_dataset(tmp_path):
    corpus = _write(tmp_path / "corpus.txt", "\n\n".join(PARAGRAPHS * 400))
    one = char_data_config(tmp_path / "one", [corpus], "data.documents=blank_lines", "data.prepare_workers=1")
    two = char_data_config(tmp_path / "two", [corpus], "data.documents=blank_lines", "data.prepare_workers=2")
    a, b = prepare(one, progress=False), prepare(two, progress=False)
    assert a.splits == b.splits and a.splits["train"].examples > 1000
    for split in ("train", "validation"):
        assert np.array_equal(_stream(one, a, split), _stream(two, b, split))


def test_cli_tokenizer_and_prepare(tmp_path, capsys):
    from jaxgen.cli import main

    corpus = _write(tmp_path / "corpus.txt", "\n".join(PARAGRAPHS) * 10)
    config = _write(tmp_path / "c.yaml", f"data:\n  train_files: [{corpus}]\n  data_dir: {tmp_path / 'p'}\n")
    overrides = ["tokenizer.kind=char", "tokenizer.vocab_size=100"]
    assert main(["data", "tokenizer", str(config), *overrides]) == 0
    assert "tokenizer.model: " in capsys.readouterr().out
    assert main(["data", "prepare", str(config), *overrides]) == 0
    assert "train: 1 examples" in capsys.readouterr().out
    assert main(["data", "prepare", str(config), *overrides]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["data", "prepare", str(config), "data.train_files=[/nonexistent.txt]"]) == 1
    err = capsys.readouterr().err
    assert err == "error: /nonexistent.txt: file not found (listed in data.train_files)\n"


def test_block_boundaries_do_not_change_the_dataset(tmp_path, monkeypatch):
    from jaxgen.data import sources

    text = ("Ünïcödé line one\n\nsecond — paragraph with a long line " + "x" * 40 + "\n") * 30
    corpus = _write(tmp_path / "c.txt", text)
    whole = char_data_config(tmp_path / "whole", [corpus], "data.documents=blank_lines")
    reference = prepare(whole, progress=False)
    # Tiny blocks, and lines longer than the line limit cut mid-line at character boundaries.
    monkeypatch.setattr(sources, "BLOCK_BYTES", 7)
    monkeypatch.setattr(sources, "_MAX_LINE_BYTES", 23)
    tiny = char_data_config(tmp_path / "tiny", [corpus], "data.documents=blank_lines")
    tiny_tok = tmp_path / "tiny" / "prepared" / "default"
    tiny_tok.mkdir(parents=True)
    (tiny_tok / "tokenizer.model").write_bytes(reference.tokenizer_path.read_bytes())
    chunked = prepare(tiny.model_copy(update={"tokenizer": tiny.tokenizer.model_copy(
        update={"path": str(tiny_tok / "tokenizer.model")})}), progress=False)  # fmt: skip
    assert chunked.splits == reference.splits
    for split in ("train", "validation"):
        assert np.array_equal(_stream(tiny, chunked, split), _stream(whole, reference, split))


@pytest.mark.parametrize("mode", ["file", "line", "blank_lines"])
def test_splitter_is_independent_of_how_text_is_fed(mode):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from jaxgen.data.documents import Splitter

    def documents(pieces):
        splitter, docs, current = Splitter(mode), [], []
        for segs in [*(splitter.feed(p) for p in pieces), splitter.end()]:
            for text, end in segs:
                current.append(text)
                if end:
                    docs.append("".join(current))
                    current = []
        assert not "".join(current)  # everything ends in a document
        return docs

    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet="ab \n", max_size=60), st.lists(st.integers(0, 60), max_size=6))
    def check(text, cuts):
        cuts = sorted(set(cuts))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert documents(pieces) == documents([text])

    check()
