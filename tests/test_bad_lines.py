"""Per-record faults never take down a batch job (docs/RELIABILITY.md): a bad line of a
prompts JSONL (`jaxgen generate --input`) or of SFT / preference / text JSONL (`jaxgen data
prepare`) is reported as file:line, skipped and counted (non-zero exit unless
--allow-bad-lines), or fatal with --strict; the good lines are processed."""

import json

import pytest
from data_configs import char_data_config
from test_language_model import run_dir  # noqa: F401  (the shared tiny run directory fixture)

import jaxgen
from jaxgen import cli
from jaxgen.data import prepare
from jaxgen.data.lines import MAX_LINE_BYTES
from jaxgen.errors import JaxgenError
from jaxgen.inference import jsonl as generate_jsonl

_HUGE = b'{"id": 90, "prompt": "' + b"a" * (10 << 20) + b'"}'  # a 10 MB line


@pytest.fixture(scope="module")
def lm(run_dir):  # noqa: F811
    return jaxgen.load(run_dir)


def _prompt_lines(lm):
    """(input line bytes, why it is bad or None) in file order; line numbers are 1-based."""
    long = "the cat sat on the mat. " * 20
    n = len(lm.encode_prompt(long, lm.config.generate, "prompt"))
    return [
        (json.dumps({"id": 0, "prompt": "the cat"}).encode(), None),
        (b'{"id": 80, "prompt": "bad \xff\xfe here"}', "invalid UTF-8 (byte 0xff)"),
        (b'{"id": 81, "prompt": ', "not valid JSON (Expecting value)"),
        (json.dumps({"id": 82, "prompt": 5}).encode(), "prompt must be a string or a list of token ids"),
        (
            json.dumps({"prompt": "no id"}).encode(),
            'expected an object with "id" and "prompt" (or "messages", not both)',
        ),
        (b'{"id": 83, "prompt": "a\x00b"}', "NUL byte in the line"),
        (_HUGE, f"line longer than {MAX_LINE_BYTES >> 20} MiB"),
        (json.dumps({"id": 84, "prompt": ""}).encode(), "empty prompt"),
        (
            json.dumps({"id": 85, "prompt": long}).encode(),
            f"prompt: {n} prompt tokens + max_new_tokens=8 exceed the model's max_len=64 (shorten the"
            " prompt, lower max_new_tokens or set generate.truncate_prompt)",
        ),
        (
            json.dumps({"id": 86, "prompt": "x", "top_k": -3}).encode(),
            "top_k: -3 Input should be greater than or equal to 0",
        ),
        (json.dumps({"id": 0, "prompt": "again"}).encode(), "duplicate id 0"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"id": 1, "prompt": "a bird"}).encode(), None),
        (b"", None),  # blank: not a record
        (json.dumps({"id": 2, "prompt": [5, 6, 7], "max_new_tokens": 4}).encode(), None),
        (json.dumps({"id": 3, "prompt": "the dog ate"}).encode(), None),
        (json.dumps({"id": 4, "prompt": long, "truncate_prompt": True}).encode(), None),
    ]


def _write_prompts(tmp_path, lm):
    lines = _prompt_lines(lm)
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    bad = [(n, why) for n, (_, why) in enumerate(lines, 1) if why is not None]
    return path, bad


def _ids_of(line: bytes):
    try:
        return json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None


def test_generate_skips_each_bad_line_and_lists_it(lm, tmp_path, reliability):
    prompts, bad = _write_prompts(tmp_path, lm)
    out = tmp_path / "out.jsonl"
    summary = generate_jsonl.run(lm, prompts, out, {"temperature": 0.0}, progress=False)
    reliability["bad input lines tried"] += len(bad)
    assert summary.written == 5
    assert summary.failures == [f"{prompts}:{n}: {why}" for n, why in bad]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in written) == [0, 1, 2, 3, 4]
    errors = [json.loads(line) for line in generate_jsonl.errors_path(out).read_text().splitlines()]
    raw = prompts.read_bytes().split(b"\n")
    # the line's id where it was read (the over-long line is passed over unread)
    assert errors == [
        {"line": n, "id": None if n == 7 else _ids_of(raw[n - 1]), "error": why} for n, why in bad
    ]
    # every non-blank input line: one output line or one errors-file entry, never both
    accounted = len(written) + len(errors)
    assert accounted == sum(1 for line in raw if line.strip())

    again = generate_jsonl.run(lm, prompts, out, {"temperature": 0.0}, progress=False)
    assert (again.written, again.skipped, len(again.failures)) == (0, 5, len(bad))
    assert len(generate_jsonl.errors_path(out).read_text().splitlines()) == len(
        bad
    )  # rewritten, not appended

    with pytest.raises(JaxgenError) as e:
        generate_jsonl.run(
            lm, prompts, tmp_path / "strict.jsonl", {"temperature": 0.0}, progress=False, strict=True
        )
    assert str(e.value) == f"{prompts}:2: invalid UTF-8 (byte 0xff)"
    assert not (tmp_path / "strict.jsonl").exists() or not (tmp_path / "strict.jsonl").read_text()


def test_generate_with_bad_lines_resumes_after_a_crash_without_losing_or_repeating_a_line(lm, tmp_path):
    prompts, bad = _write_prompts(tmp_path, lm)
    out = tmp_path / "out.jsonl"
    options = {"temperature": 0.0}  # as the test above: its compiled programs serve this one
    ref = generate_jsonl.run(lm, prompts, tmp_path / "ref.jsonl", options, progress=False)

    def crash(n):
        if n == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_jsonl.run(lm, prompts, out, options, progress=False, on_batch=crash)
    first = out.read_text().splitlines()
    assert 0 < len(first) < 5
    with open(out, "a") as f:  # killed while writing the next line
        f.write('{"id": 3, "prom')
    resumed = generate_jsonl.run(lm, prompts, out, options, progress=False)
    assert resumed.written == 5 - len(first) and resumed.failures == ref.failures
    lines = out.read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == [0, 1, 2, 3, 4]
    want = sorted((tmp_path / "ref.jsonl").read_text().splitlines())
    assert sorted(lines) == want  # what an uninterrupted run writes, no line torn or twice
    errors = generate_jsonl.errors_path(out).read_text().splitlines()
    assert [json.loads(e)["line"] for e in errors] == [n for n, _ in bad]


def test_generate_cli_exit_codes_and_summary(run_dir, lm, tmp_path, capsys):  # noqa: F811
    prompts, bad = _write_prompts(tmp_path, lm)
    out = tmp_path / "out.jsonl"
    base = ["generate", "--run", str(run_dir), "--input", str(prompts), "--output", str(out), "--no-progress"]
    assert cli.main([*base, "--temperature", "0"]) == 1
    err = capsys.readouterr().err.splitlines()
    shown = [f"skipped {prompts}:{n}: {why}" for n, why in bad[:10]]
    tail = f"... and {len(bad) - 10} more; {len(bad)} bad lines skipped, listed in {out}.errors.jsonl"
    assert err[1:] == [*shown, tail]
    assert cli.main([*base, "--temperature", "0", "--allow-bad-lines"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--temperature", "0", "--strict"]) == 1
    assert capsys.readouterr().err == f"error: {prompts}:2: invalid UTF-8 (byte 0xff)\n"


# ----------------------------------------------------------------------------- data prepare


# (line, why it is bad or None) for each format; `why` without the "file:line: " prefix.
_SFT = [
    (b'{"prompt": "hi", "response": "there"}', None),
    (
        b'{"prompt": "bad \xff", "response": "x"}',
        "invalid UTF-8 (byte 0xff); set data.strict_utf8: false to replace it with U+FFFD",
    ),
    (b'{"prompt": "a", ', "not valid JSON (Expecting property name enclosed in double quotes)"),
    (b'{"prompt": 3, "response": "x"}', "field 'prompt' is int, not a string"),
    (b'{"prompt": "only"}', "no field 'response' (the record has: prompt)"),
    (b'{"prompt": "a\x00", "response": "b"}', "NUL byte in the line"),
    (_HUGE, f"line longer than {MAX_LINE_BYTES >> 20} MiB"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "no 'assistant' turn to train on"),
    (b"", None),
    (b'"text"', "expected a JSON object, got str"),
    (b'{"prompt": "how", "response": "so"}', None),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', None),
]
_PREFERENCE = [
    (b'{"prompt": "p", "chosen": "good", "rejected": "bad"}', None),
    (b'{"prompt": "p", "chosen": "good"}', "no field 'rejected' (the record has: chosen, prompt)"),
    (b'{"prompt": "p", "chosen": "", "rejected": "x"}', "field 'chosen' is empty"),
    (b'{"prompt": "q", "chosen": "yes", "rejected": "no"}', None),
]
_TEXT = [
    (b'{"text": "some words"}', None),
    (b'{"body": "x"}', "no field 'text' (the record has: body)"),
    (b'{"text": 5}', "field 'text' is int, not a string"),
    (b"{oops", "not valid JSON (Expecting property name enclosed in double quotes)"),
    (b'{"text": "more words"}', None),
]


@pytest.mark.parametrize(("fmt", "lines"), [("sft", _SFT), ("preference", _PREFERENCE), ("jsonl", _TEXT)])
def test_prepare_skips_and_counts_bad_lines_or_stops_when_strict(tmp_path, reliability, fmt, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    bad = [f"{path}:{n}: {why}" for n, (_, why) in enumerate(lines, 1) if why is not None]
    good = sum(1 for line, why in lines if why is None and line)
    reliability["bad input lines tried"] += len(bad)
    config = char_data_config(
        tmp_path, [path], f"data.format={fmt}", "data.validation_fraction=0", "data.strict_utf8=true"
    )
    info = prepare(config, progress=False)
    train = info.splits["train"]
    assert (train.examples, train.bad_lines, train.bad_at) == (good, len(bad), bad[:10])
    assert jaxgen.data.bad_lines(info) == len(bad)

    strict = char_data_config(tmp_path, [path], f"data.format={fmt}", "data.validation_fraction=0",
                          "data.strict_utf8=true", "data.bad_lines=strict")  # fmt: skip
    with pytest.raises(JaxgenError) as e:  # up to date, but its stored counts say a line was bad
        prepare(strict, progress=False)
    assert str(e.value) == bad[0]
    with pytest.raises(JaxgenError) as e:  # rebuilt from scratch: the same first bad line
        prepare(char_data_config(tmp_path / "fresh", [path], *strict_overrides(fmt)), progress=False)
    assert str(e.value) == bad[0]


def strict_overrides(fmt):
    return [
        f"data.format={fmt}",
        "data.validation_fraction=0",
        "data.strict_utf8=true",
        "data.bad_lines=strict",
    ]


def test_each_bad_line_is_counted_by_exactly_one_split(tmp_path):
    lines = [b'{"text": "good %d"}' % i if i % 3 else b"{bad %d" % i for i in range(30)]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    info = prepare(
        char_data_config(tmp_path, [path], "data.format=jsonl", "data.validation_fraction=0.3"),
        progress=False,
    )
    train, val = info.splits["train"], info.splits["validation"]
    assert (train.bad_lines, val.bad_lines) == (7, 3)  # lines 1, 4, ..., 19 | 22, 25, 28 (0-based 0..27)
    assert train.examples + val.examples == 20


def test_prepare_cli_reports_bad_lines_even_when_up_to_date(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": 1}\n\xff\n{"text": "also fine"}\n')
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data:\n  format: jsonl\n  train_files: [{path}]\n  data_dir: {tmp_path / 'prepared'}\n"
        "  validation_fraction: 0\ntokenizer:\n  kind: char\n  vocab_size: 256\n"
    )
    args = ["data", "prepare", str(config)]
    listed = [
        "  train: 2 bad lines skipped (data.bad_lines: skip)",
        f"  train: skipped {path}:2: field 'text' is int, not a string",
        f"  train: skipped {path}:3: not valid JSON (Expecting value)",
    ]
    final = (
        "data prepare: 2 bad lines skipped (listed above); pass --allow-bad-lines to accept them"
        " or --strict to stop at the first\n"
    )
    for _ in range(2):  # built, then up to date: the stored counts are reported again
        assert cli.main(args) == 1
        captured = capsys.readouterr()
        assert captured.out.splitlines()[-3:] == listed and captured.err == final
    assert cli.main([*args, "--allow-bad-lines"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main([*args, "--strict"]) == 1
    assert capsys.readouterr().err == f"error: {path}:2: field 'text' is int, not a string\n"
