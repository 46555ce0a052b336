"""Several sequences per prompt (beams from the command line, independent samples) and the
interactive session of `jaxgen generate`, on the tiny run directory of test_language_model."""

import contextlib
import io
import json

import jax
import numpy as np
import pytest
from test_language_model import run_dir  # noqa: F401  (the shared tiny run directory fixture)

import jaxgen
from jaxgen import cli
from jaxgen.cli import interactive
from jaxgen.cli.options import parse_option
from jaxgen.decode import loop
from jaxgen.decode.request import sequence_key
from jaxgen.errors import JaxgenError
from jaxgen.inference import jsonl as generate_jsonl

SAMPLED = dict(num_return_sequences=3, temperature=0.8, top_k=5, seed=3)


@pytest.fixture(scope="module")
def lm(run_dir):  # noqa: F811
    return jaxgen.load(run_dir)


def _numbered(prompt: str, result, label: str) -> str:
    """What the CLI prints for several sequences: the prompt once, then each one numbered."""
    n = len(result.texts)
    rows = zip(result.texts, result.scores, result.finish_reasons, strict=True)
    return (
        prompt
        + "\n"
        + "".join(f"[{j}/{n}] {label}={s:.4f} finish={r}\n{t}\n" for j, (t, s, r) in enumerate(rows, 1))
    )


def test_cli_runs_the_beam_recipe_and_prints_the_api_beams(run_dir, lm, capsys):  # noqa: F811
    flags = ["--num-beams", "5", "--early-stopping", "true", "--num-return-sequences", "3"]
    assert cli.main(["generate", "--run", str(run_dir), "--prompt", "the cat", *flags]) == 0
    [want] = lm.generate(["the cat"], num_beams=5, early_stopping=True, num_return_sequences=3)
    assert len({tuple(c) for c in want.completions}) == 3 and len(set(want.texts)) == 3
    assert capsys.readouterr().out == _numbered("the cat", want, "score")


def test_cli_prints_sampled_sequences_and_no_stream_numbers_one(run_dir, lm, capsys):  # noqa: F811
    base = ["generate", "--run", str(run_dir), "--prompt", "the cat", "--temperature", "0.8", "--top-k", "5"]
    assert cli.main([*base, "--num-return-sequences", "3", "--seed", "3"]) == 0
    [want] = lm.generate(["the cat"], **SAMPLED)
    assert capsys.readouterr().out == _numbered("the cat", want, "logprob")
    assert cli.main([*base, "--no-stream"]) == 0
    [one] = lm.generate(["the cat"], temperature=0.8, top_k=5)
    assert capsys.readouterr().out == _numbered("the cat", one, "logprob")


def test_cli_reports_what_speculation_did(run_dir, capsys, monkeypatch):  # noqa: F811
    flags = [
        "--temperature",
        "0",
        "--max-new-tokens",
        "9",
        "--speculative",
        "draft",
        "--draft-run",
        str(run_dir),
    ]
    assert cli.main(["generate", "--run", str(run_dir), "--prompt", "the cat", *flags]) == 0
    # The model drafts for itself, so every draft is kept (k = 4, a draft model's default):
    # the prefill's token, a pass of 5, then the 3 left of the 9 asked: 9 / 3 passes.
    err = capsys.readouterr().err
    assert "speculative: 3.00 tokens per target pass, 100.0% of" in err, err
    assert cli.main(["generate", "--run", str(run_dir), "--prompt", "the cat", "--temperature", "0"]) == 0
    assert "speculative" not in capsys.readouterr().err
    # An interactive session reports its totals as it ends: two prompts, 18 tokens, 6 passes.
    monkeypatch.setattr("sys.stdin", _Piped(["the cat", "the cat", ":quit"], lambda: None))
    assert cli.main(["generate", "--run", str(run_dir), "--interactive", *flags]) == 0
    assert "speculative: 3.00 tokens per target pass, 100.0% of" in capsys.readouterr().err


def test_sampled_sequences_are_independent_reproducible_rows(lm):
    prompts = ["the cat", "a bird sang in the tree. the"]
    results = lm.generate(prompts, **SAMPLED)
    assert [r.completions for r in lm.generate(prompts, **SAMPLED)] == [r.completions for r in results]
    for i, (prompt, r) in enumerate(zip(prompts, results, strict=True)):
        assert len(r.completions) == len(r.finish_reasons) == len(r.scores) == 3
        assert len({tuple(c) for c in r.completions}) == 3
        for j in range(3):  # each equals its row sampled alone, keyed (prompt key, j)
            alone = dict(SAMPLED, num_return_sequences=1)
            [a] = lm.generate([prompt], row_ids=[sequence_key(i, j)], **alone)
            assert a.completions == [r.completions[j]] and a.finish_reasons == [r.finish_reasons[j]]
            assert abs(a.scores[0] - r.scores[j]) < 1e-5
    # Sample 0 is the prompt's own row: asking for more samples keeps the first.
    assert lm.generate(prompts, **dict(SAMPLED, num_return_sequences=1))[1].tokens == results[1].tokens
    assert lm.generate(prompts, **dict(SAMPLED, seed=4))[0].completions != results[0].completions


def test_sampled_scores_are_log_probs_of_the_warped_distribution(lm):
    [r] = lm.generate(["the cat"], **SAMPLED)
    for tokens, reason, score in zip(r.completions, r.finish_reasons, r.scores, strict=True):
        ids = r.prompt_tokens + tokens + ([lm.tokenizer.eos_id] if reason == "eos" else [])
        scores = lm.logits([ids])[0].astype(np.float64) / SAMPLED["temperature"]  # full forward
        want = 0.0
        for t in range(len(r.prompt_tokens) - 1, len(ids) - 1):
            row = scores[t].copy()
            row[lm.tokenizer.vocab_size :] = -np.inf  # ids the tokenizer cannot decode
            row[row < np.sort(row)[-SAMPLED["top_k"]]] = -np.inf
            want += row[ids[t + 1]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        assert abs(score - want) < 1e-5


def test_several_greedy_sequences_and_streaming_several_are_errors(lm):
    with pytest.raises(JaxgenError, match="greedy sequences would all be equal"):
        lm.generate(["the cat"], num_return_sequences=2, temperature=0.0)
    with pytest.raises(JaxgenError, match="num_return_sequences: streaming shows one"):
        next(lm.stream("the cat", num_return_sequences=2))


def test_jsonl_lines_hold_every_sample_with_its_reason_and_score(lm, tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    records = [{"id": "a", "prompt": "the cat"}, {"id": 7, "prompt": "the cat", "num_return_sequences": 2}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    options = dict(temperature=0.8, top_k=5, seed=3, strip=False)
    assert generate_jsonl.run(lm, prompts, out, options, progress=False).written == 2
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    for record in records:
        n = record.get("num_return_sequences", 1)
        [want] = lm.generate(["the cat"], row_ids=[record["id"]], num_return_sequences=n, **options)
        line = lines[record["id"]]
        assert line["completions"] == want.texts and line["finish_reasons"] == want.finish_reasons
        assert line["scores"] == want.scores and len(want.texts) == n


class _Piped(io.StringIO):
    """Piped stdin that calls `on_read` before handing out each line."""

    def __init__(self, lines, on_read):
        super().__init__("".join(line + "\n" for line in lines))
        self.on_read = on_read

    def __next__(self):
        self.on_read()
        return super().__next__()


@contextlib.contextmanager
def _compilations():
    """The names of the functions XLA compiles inside the block, in order."""
    names = []

    def listen(event, seconds, **labels):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(labels.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_interactive_session_compiles_the_decode_program_once(run_dir, lm, capsys, monkeypatch):  # noqa: F811
    prompts = [
        "the cat",
        "a bird sang in the tree. the",
        "the cat sat on the mat. the dog ate the bone. a bird",
    ]
    assert len({loop.bucket(len(lm.tokenizer.encode(p))) for p in prompts}) == 3  # lengths 2, 8, 16
    lines = [prompts[0], ":set temperature 0.7", prompts[1], ":set top-p 0.8", "", prompts[2], ":quit", "x"]
    # max_new_tokens=20 (buffer 32) with top-p on: a decode program no other test compiles.
    flags = ["--interactive", "--max-new-tokens", "20", "--top-p", "0.9", "--seed", "5"]
    with _compilations() as compiled:
        so_far = []  # compilations before each line is read
        monkeypatch.setattr("sys.stdin", _Piped(lines, lambda: so_far.append(len(compiled))))
        assert cli.main(["generate", "--run", str(run_dir), *flags]) == 0
    assert compiled.count("jit(begin)") == compiled.count("jit(resume)") == 1
    assert so_far[1] == len(compiled)  # nothing at all compiled after the first prompt
    # Prompt k samples as row k, every prompt padded to the room max_new_tokens leaves: 64 - 20.
    settings = [
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=0.7, top_p=0.8),
    ]
    want = ""
    for k, (prompt, options) in enumerate(zip(prompts, settings, strict=True)):
        [r] = lm.generate([prompt], row_ids=[k], max_new_tokens=20, seed=5, prompt_buckets=(44,), **options)
        want += prompt + r.text + "\n"
    assert capsys.readouterr().out == want


def test_interactive_errors_and_ctrl_c_keep_the_session(lm, capsys, monkeypatch):
    def interrupted(prompt, **options):
        yield "ab"
        raise KeyboardInterrupt  # Ctrl-C while the completion streams

    monkeypatch.setattr(lm, "stream", interrupted)
    lines = ["x", ":set temperature hot", ":set top_q 0.5", ":frobnicate", ":set seed", "y"]
    assert interactive.run(lm, {}, lines) == 0
    captured = capsys.readouterr()
    assert captured.out == "xab\nyab\n"
    errors = captured.err.splitlines()
    assert errors[0] == "(stopped)" and errors[-1] == "(stopped)"
    assert errors[1] == "error: temperature 'hot': expected a number"
    assert errors[2] == "error: unknown option 'top_q' (did you mean 'top_p'?)"
    assert "unknown command" in errors[3] and "expected :set KEY VALUE" in errors[4]


def test_parse_option_reads_a_value_as_its_flag_does():
    assert parse_option("top-p", "0.9") == 0.9 and parse_option("top_k", "5") == 5
    assert (
        parse_option("early_stopping", "Never") == "never" and parse_option("early_stopping", "true") is True
    )
    assert parse_option("stop", r"\n\n") == ("\n\n",) and parse_option("control", "a=b") == {"a": "b"}
    with pytest.raises(JaxgenError, match="top_k '0.5': expected an integer"):
        parse_option("top_k", "0.5")
    with pytest.raises(JaxgenError, match="early_stopping 'maybe': expected true, false or never"):
        parse_option("early_stopping", "maybe")
