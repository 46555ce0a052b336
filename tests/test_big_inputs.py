"""Bounded memory on big inputs (docs/RELIABILITY.md): `generate --input` reads its prompts
a window at a time, and the ids it must remember cost 8 bytes each. The figures at 1 GB
scale are benchmarks/big_inputs_rss.py's (benchmarks/RESULTS.md); these tests prove the
properties that make them flat, by counting, not timing."""

import json

import numpy as np
import pytest
from test_language_model import run_dir  # noqa: F401  (the shared tiny run directory fixture)

import jaxgen
from jaxgen.data import lines
from jaxgen.inference import jsonl as generate_jsonl
from jaxgen.inference import line_ids

N, WINDOW, BATCH = 40, 8, 2
OPTIONS = {"temperature": 0.0, "max_new_tokens": 2, "batch_size": BATCH}


@pytest.fixture(scope="module")
def lm(run_dir):  # noqa: F811
    return jaxgen.load(run_dir)


def _prompts(path):
    records = []
    for i in range(N):
        record = {"id": i, "prompt": f"the cat {'sat ' * (i % 4)}"}
        if i % 3 == 0:  # a second option group, so windows are grouped too
            record["top_k"] = 5
        records.append(json.dumps(record))
    records.insert(11, "{not json")  # a bad line in the second window
    path.write_text("\n".join(records) + "\n")
    return path


def _by_id(path) -> dict:
    return {json.loads(line)["id"]: line for line in path.read_text().splitlines()}


def test_generate_holds_one_window_of_records_and_resumes_across_windows(lm, tmp_path, monkeypatch):
    prompts = _prompts(tmp_path / "p.jsonl")
    whole = generate_jsonl.run(lm, prompts, tmp_path / "whole.jsonl", OPTIONS, progress=False, window=10 * N)
    read = []
    read_jsonl = lines.read_jsonl

    def counted(*args, **kw):  # counts every line the generator has taken from the file
        for line in read_jsonl(*args, **kw):
            read.append(line.number)
            yield line

    monkeypatch.setattr(lines, "read_jsonl", counted)
    out, ahead = tmp_path / "out.jsonl", []

    def written(n):  # lines read but not yet written (bad lines are neither held nor written)
        ahead.append(len(read) - len(out.read_text().splitlines()) - 1)

    summary = generate_jsonl.run(lm, prompts, out, OPTIONS, progress=False, window=WINDOW, on_batch=written)
    assert len(read) == N + 1 and max(ahead) <= WINDOW, ahead  # never more than a window held
    assert (summary.written, summary.failures) == (whole.written, whole.failures)
    assert _by_id(out) == _by_id(tmp_path / "whole.jsonl")  # the same lines, however windowed

    class Crash(Exception):
        pass

    def crash(n):
        if n == 7:  # past the first window
            raise Crash

    partial = tmp_path / "partial.jsonl"
    with pytest.raises(Crash):
        generate_jsonl.run(lm, prompts, partial, OPTIONS, progress=False, window=WINDOW, on_batch=crash)
    before = len(partial.read_text().splitlines())
    resumed = generate_jsonl.run(lm, prompts, partial, OPTIONS, progress=False, window=WINDOW)
    assert before > WINDOW and (resumed.skipped, resumed.written) == (before, N - before)
    assert partial.read_text() == out.read_text()  # resumed: what the uninterrupted run wrote


def test_ids_cost_eight_bytes_each_and_none_is_lost_in_a_merge(monkeypatch):
    monkeypatch.setattr(line_ids, "_RECENT", 100)
    ids = line_ids.IdSet()
    keys = [line_ids.key(i) for i in range(1050)] + [line_ids.key(str(i)) for i in range(1050)]
    for k in keys + keys[:300]:  # a repeated id is held once
        ids.add(k)
    assert len(ids) == len(keys) and all(k in ids for k in keys)
    assert line_ids.key(5000) not in ids and line_ids.key([1]) not in ids
    assert ids._sorted.dtype == np.uint64 and ids._sorted.size == len(keys)  # merged: 8 bytes an id
