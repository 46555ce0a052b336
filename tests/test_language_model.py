"""Python API, CLI generate (streaming and resumable JSONL) and eval, on a tiny run directory."""

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import pytest

import jaxgen
from jaxgen import cli
from jaxgen.checkpoint import save_params
from jaxgen.cli.app import build_parser
from jaxgen.cli.options import from_args
from jaxgen.config import load_config
from jaxgen.data.tokenizer_training import train_tokenizer
from jaxgen.decode import speculative
from jaxgen.errors import JaxgenError
from jaxgen.evaluate import perplexity as evaluate
from jaxgen.inference import jsonl as generate_jsonl
from jaxgen.inference import language_model
from jaxgen.model.transformer import init_params
from jaxgen.tokenizer.sentencepiece import load_tokenizer
from jaxgen.tokenizer.text import continuation

TEXT = "the cat sat on the mat. the dog ate the bone. a bird sang in the tree.\n" * 30


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("gen")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    config = load_config(
        None,
        [
            "model.preset=tiny", "model.vocab_size=256", "model.dtype=float32",
            f"data.train_files=[{root / 'corpus.txt'}]", f"data.data_dir={root / 'prepared'}",
            "tokenizer.vocab_size=80", "generate.batch_size=4", "generate.max_new_tokens=8",
        ],
    )  # fmt: skip
    tokenizer_path = train_tokenizer(config)
    params = jax.tree.map(
        lambda x: 4.0 * x, jax.jit(init_params, static_argnums=0)(config.model, jax.random.key(0))
    )
    save_params(root / "run", config, params, tokenizer_path=tokenizer_path)
    return root / "run"


@pytest.fixture(scope="module")
def lm(run_dir):
    return jaxgen.load(run_dir)


def test_load_logits_and_generate(lm):
    tokens = np.asarray([lm.tokenizer.encode("the cat sat")], np.int32)
    logits = lm.logits(tokens)
    assert logits.dtype == np.float32 and logits.shape == (1, tokens.shape[1], 256)
    results = lm.generate(["the cat", "a bird sang in", [5, 6, 7]], temperature=0.0)
    assert [len(r.tokens) for r in results] == [8, 8, 8]
    assert all(r.finish_reason == "length" and isinstance(r.text, str) for r in results)
    # greedy's first token is the argmax of the full forward pass's last logits
    assert results[0].tokens[0] == int(np.argmax(lm.logits([lm.tokenizer.encode("the cat")])[0, -1]))
    # max_length counts the prompt (as in Hugging Face)
    [r] = lm.generate([[5, 6, 7]], temperature=0.0, max_length=7)
    assert r.tokens == results[2].tokens[:4]


def test_beam_results_and_control_prefix(lm):
    [r] = lm.generate(["the cat"], num_beams=3, num_return_sequences=2, max_new_tokens=4)
    assert len(r.completions) == 2 and len(r.scores) == 2 and r.scores[0] >= r.scores[1]
    [plain] = lm.generate(["x the cat"], temperature=0.0)
    [controlled] = lm.generate(["the cat"], temperature=0.0, control={"x": "y"}, control_template="{key} ")
    assert controlled.prompt_tokens == plain.prompt_tokens and controlled.tokens == plain.tokens


@pytest.mark.parametrize(
    "prompts, options, message",
    [
        (["the cat"], dict(temperature=-1.0), "temperature"),
        (["the cat"], dict(top_p=0.0), "top_p"),
        (["the cat"], dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (["the cat"], dict(max_new_tokens=100), "max_len=64"),
        (["the cat"], dict(beams=2), "unknown option 'beams'"),
        (["the " * 70], dict(), "exceed the model's max_len"),
    ],
)
def test_bad_input_is_a_one_line_user_error(lm, prompts, options, message):
    with pytest.raises(JaxgenError, match=message):
        lm.generate(prompts, **options)


def test_empty_prompt_starts_from_bos_and_needs_one(lm):
    [r] = lm.generate([""], temperature=0.0)
    assert r.prompt_tokens == [lm.tokenizer.bos_id] and len(r.tokens) == 8
    bare = jaxgen.inference.LanguageModel(lm.config, lm.params, tokenizer=None, mesh=lm.mesh)
    with pytest.raises(JaxgenError, match="prompt 0: empty prompt"):
        bare.generate([[]])


def test_long_prompt_truncated_from_the_left_when_configured(lm):
    long = "the cat sat on the mat. " * 20
    [r] = lm.generate([long], truncate_prompt=True, temperature=0.0)
    ids = lm.tokenizer.encode(long)
    assert r.prompt_tokens == ids[-(64 - 8) :]
    assert len(r.tokens) == 8 or r.finish_reason == "eos"


def _write_prompts(path, n, bad_lines=()):
    lines = [json.dumps({"id": i, "prompt": f"the cat {'sat ' * (i % 5)}"}) for i in range(n)]
    for at, text in bad_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_resume_after_a_crash_and_a_torn_line(lm, tmp_path):
    prompts, out, ref = tmp_path / "p.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    _write_prompts(prompts, 14, bad_lines=[(3, "{not json"), (6, json.dumps({"id": 99}))])
    options = dict(temperature=0.9, top_k=20, batch_size=4)
    full = generate_jsonl.run(lm, prompts, ref, options, progress=False)
    assert full.written == 14 and len(full.failures) == 2
    assert full.failures[0].startswith(f"{prompts}:4: not valid JSON")
    assert full.failures[1].startswith(f"{prompts}:7: ") and '"id" and "prompt"' in full.failures[1]

    class Crash(Exception):
        pass

    def crash_after_two(n):
        if n == 2:
            raise Crash

    with pytest.raises(Crash):
        generate_jsonl.run(lm, prompts, out, options, progress=False, on_batch=crash_after_two)
    assert len(out.read_text().splitlines()) == 8
    with open(out, "a") as f:  # killed in the middle of writing the next line
        f.write('{"id": 12, "prompt": "the ca')
    resumed = generate_jsonl.run(lm, prompts, out, options, progress=False)
    assert resumed.skipped == 8 and resumed.written == 6
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == list(range(14))
    # a resumed run writes exactly what an uninterrupted one does
    want = {line["id"]: line for line in map(json.loads, ref.read_text().splitlines())}
    assert all(line == want[line["id"]] for line in lines)
    assert set(lines[0]) >= {"id", "prompt", "completions", "finish_reason", "tokens"}


def test_stream_adds_up_to_generate_and_never_shows_a_stop_string(lm):
    [free] = lm.generate(["the cat"], temperature=0.0, max_new_tokens=8)
    assert len(free.text) > 6
    stop = free.text[3:6]
    [want] = lm.generate(["the cat"], temperature=0.0, max_new_tokens=8, stop=[stop])
    assert want.text == free.text[: free.text.index(stop)] and want.finish_reason == "stop"
    pieces = list(lm.stream("the cat", chunk=1, temperature=0.0, max_new_tokens=8, stop=[stop]))
    assert "".join(pieces) == want.text


class _DummyPrefixTokenizer:
    """Decodes like SentencePiece with a dummy prefix: words joined by spaces, none leading."""

    words = ["the", "cat", "sat"]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_completion_text_keeps_the_space_decoding_it_alone_would_drop():
    assert _DummyPrefixTokenizer().decode([2]) == "sat"
    assert continuation(_DummyPrefixTokenizer(), [0, 1], [2]) == " sat"
    assert continuation(_DummyPrefixTokenizer(), [], [2]) == "sat"


def test_postprocess_filters(lm):
    opts = lm.config.generate.model_copy(update=dict(min_length=3, banned_words=("bad",), deduplicate=True))
    assert generate_jsonl.postprocess([" ok! ", "no", "a bad one", "ok!", "fine"], opts) == ["ok!", "fine"]


def test_cli_generate_streams_and_writes_jsonl(run_dir, tmp_path, capsys):
    code = cli.main(
        ["generate", "--run", str(run_dir), "--prompt", "the cat", "--temperature", "0", "--chunk", "3"]
    )
    assert code == 0
    streamed = capsys.readouterr().out.rstrip("\n")
    [want] = jaxgen.load(run_dir).generate(["the cat"], temperature=0.0)
    assert streamed == "the cat" + want.text  # the prompt, then its completion
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    _write_prompts(prompts, 3, bad_lines=[(1, "[1, 2]")])
    args = ["generate", "--run", str(run_dir), "--input", str(prompts), "--output", str(out), "--no-progress"]
    assert cli.main([*args, "--control", "tone=calm", "--stop", "."]) == 1  # one malformed line
    assert "p.jsonl:2:" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 3
    assert cli.main([*args, "--control", "oops"]) == 1
    assert "--control 'oops'" in capsys.readouterr().err


def test_generate_flags_set_only_the_options_given():
    def parse(*flags):
        return from_args(build_parser().parse_args(["generate", "--run", "r", "--prompt", "x", *flags]))

    assert parse() == {}  # unset flags leave the run's config to decide
    got = parse(
        "--top-k", "5", "--max-length", "9", "--early-stopping", "Never", "--stop", ".", "--stop", "!"
    )
    assert got == {"top_k": 5, "max_length": 9, "early_stopping": "never", "stop": (".", "!")}
    got = parse("--early-stopping", "false", "--control", "a=b=c")
    assert got == {"early_stopping": False, "control": {"a": "b=c"}}
    with pytest.raises(JaxgenError, match="--control 'oops'"):
        parse("--control", "oops")


def test_stop_and_banned_flags_read_backslash_escapes():
    def parse(*flags):
        return from_args(build_parser().parse_args(["generate", "--run", "r", "--prompt", "x", *flags]))

    got = parse("--stop", r"\n\n", "--stop", r"a\tb", "--banned", r"back\\slash", "--banned", "café")
    assert got == {"stop": ("\n\n", "a\tb"), "banned": ("back\\slash", "café")}
    with pytest.raises(JaxgenError, match=r"--stop 'x\\\\': bad backslash escape"):
        parse("--stop", "x\\")


def test_eval_perplexity_matches_logits(lm, run_dir, tmp_path):
    text = "the cat sat on the mat."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = evaluate.perplexity_of_text(lm, tmp_path / "t.txt", batch_size=8)
    ids = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]
    logits = lm.logits([ids])[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1))
    assert result["tokens"] == len(ids) - 1
    assert abs(result["nats_per_token"] - nll / (len(ids) - 1)) < 1e-5
    assert abs(result["bits_per_byte"] - nll / math.log(2) / len(text.encode())) < 1e-5
    assert cli.main(["eval", "perplexity", "--run", str(run_dir), "--text", str(tmp_path / "t.txt")]) == 0
    assert json.loads((run_dir / "eval" / "perplexity-t.json").read_text())["tokens"] == len(ids) - 1


def test_eval_bleu_and_rouge(tmp_path):
    preds, refs = tmp_path / "out.jsonl", tmp_path / "refs.jsonl"
    preds.write_text(
        json.dumps({"id": 1, "completions": ["the cat sat on the mat"]})
        + "\n"
        + json.dumps({"id": 2, "completions": ["a dog"]})
        + "\n"
    )
    refs.write_text(
        json.dumps({"id": 2, "reference": "a dog barked"})
        + "\n"
        + json.dumps({"id": 1, "references": ["the cat sat on the mat"]})
        + "\n"
    )
    assert cli.main(["eval", "bleu", "--predictions", str(preds), "--references", str(refs)]) == 0
    bleu = json.loads((tmp_path / "out.jsonl.bleu.json").read_text())
    import sacrebleu

    want = sacrebleu.corpus_bleu(
        ["the cat sat on the mat", "a dog"], [["the cat sat on the mat", "a dog barked"]]
    )
    assert abs(bleu["bleu"] - want.score) < 1e-9
    assert cli.main(["eval", "rouge", "--predictions", str(preds), "--references", str(refs)]) == 0
    rouge = json.loads((tmp_path / "out.jsonl.rouge.json").read_text())
    assert abs(rouge["rouge1"] - 100 * (1.0 + 0.8) / 2) < 1e-6  # "a dog" vs "a dog barked": F1 0.8
    refs.write_text(json.dumps({"id": 1, "reference": "x"}) + "\n")
    assert cli.main(["eval", "bleu", "--predictions", str(preds), "--references", str(refs)]) == 1


def test_bench_generate_prints_one_json_line_per_setting(capsys):
    args = ["bench", "generate", "--batch", "2", "--prompt-len", "4", "--new-tokens", "6"]
    assert cli.main([*args, "model.preset=tiny", "model.dtype=float32"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["setting"] for line in lines] == ["cached_decode", "full_forward_per_token"]
    assert lines[0]["decode_tokens_per_s"] > 0 and lines[1]["cached_speedup"] > 0


def test_bench_generate_times_each_requested_sampler(capsys):
    args = ["bench", "generate", "--batch", "1", "--prompt-len", "4", "--new-tokens", "6", "--no-baseline"]
    args += ["--sample", "top_p=0.9", "--sample", "temperature=0.7,top_k=5"]
    assert cli.main([*args, "model.preset=tiny", "model.dtype=float32"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["strategy"] for line in lines] == [
        "greedy", "temperature=1.0 top_p=0.9", "temperature=0.7 top_k=5"
    ]  # fmt: skip
    assert all(line["decode_tokens_per_s"] > 0 for line in lines)


def test_the_draft_decodes_in_the_weight_format_asked(lm, run_dir, monkeypatch):
    drafted_with = []  # the dtypes of the draft's weights in each speculative call
    run = speculative.generate_ids

    def spy(*a, draft_params=None, **kw):
        drafted_with.append({str(x.dtype) for x in jax.tree.leaves(draft_params)})
        return run(*a, draft_params=draft_params, **kw)

    monkeypatch.setattr(speculative, "generate_ids", spy)
    options = dict(temperature=0.0, max_new_tokens=4, speculative="draft", draft_run=str(run_dir))
    lm.generate(["the cat"], **options)
    lm.generate(["the cat"], weights="int8", **options)
    assert "int8" not in drafted_with[0] and "int8" in drafted_with[1]


def test_bench_generate_speculative_times_the_draft_in_the_targets_format(
    run_dir, tmp_path, capsys, monkeypatch
):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the mat. the cat"}\n{"prompt": "a bird"}\n')
    args = ["bench", "generate", "--speculative", "draft", "--run", str(run_dir), "--draft-run", str(run_dir)]
    args += ["--prompts", str(prompts), "--new-tokens", "6", "--rounds", "1", "--num-speculative-tokens", "2"]
    drafted_with = set()  # the dtypes of the draft's weights in each speculative call
    run = speculative.generate_ids

    def spy(*a, draft_params=None, **kw):
        drafted_with.update(str(x.dtype) for x in jax.tree.leaves(draft_params))
        return run(*a, draft_params=draft_params, **kw)

    monkeypatch.setattr(speculative, "generate_ids", spy)
    assert cli.main([*args, "--weights", "int8"]) == 0
    timed, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary["ids_identical"] and timed["weights"] == "int8" and "int8" in drafted_with
    # The model drafts for itself, so it keeps every draft: 1 + 3 + 2 tokens, 3 passes a prompt.
    assert timed["acceptance"] == 1.0 and timed["tokens_per_pass"] == 2.0
    assert cli.main([*args, "--weights", "int8,float32"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "error: --weights: --speculative times one format (got int8,float32)"
    )


@pytest.mark.parametrize(
    ("spec", "named"),
    [("top_q=0.9", "'top_q=0.9'"), ("top_p=high", "top_p='high'"), ("top_p=1.5", "top_p: 1.5"),
     ("temperature=0", "greedy")],
)  # fmt: skip
def test_bench_generate_rejects_a_bad_sample_option_in_one_line(spec, named, capsys):
    assert cli.main(["bench", "generate", "--sample", spec, "model.preset=tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and named in err and err.startswith("error: ")


def test_eval_perplexity_of_a_prepared_split(tmp_path):
    from jaxgen.data import prepare, split_stats

    (tmp_path / "corpus.txt").write_text(
        "the cat sat on the mat. the dog ate the bone.\n" * 60, encoding="utf-8"
    )
    config = load_config(
        None,
        [
            "model.preset=tiny", "model.vocab_size=256", "model.dtype=float32", "train.seq_len=32",
            f"data.train_files=[{tmp_path / 'corpus.txt'}]", f"data.data_dir={tmp_path / 'prepared'}",
            "tokenizer.vocab_size=50", "eval.batch_size=8",
        ],
    )  # fmt: skip
    prepare(config)
    params = jax.jit(init_params, static_argnums=0)(config.model, jax.random.key(0))
    save_params(tmp_path / "run", config, params, tokenizer_path=train_tokenizer(config))
    result = evaluate.perplexity_of_split(jaxgen.load(tmp_path / "run"), "validation")
    stats = split_stats(config, "validation")
    assert result["tokens"] == stats.tokens - 1  # every token but the stream's first is predicted
    assert abs(result["nats_per_char"] - result["nats_per_token"] * result["tokens"] / stats.chars) < 1e-9
    assert abs(result["nats_per_token"] - math.log(256)) < 0.2  # a random model is near uniform


def test_language_model_keeps_one_copy_of_the_weights(run_dir):
    from jaxgen.checkpoint import load_params
    from jaxgen.model.serving import is_unstacked

    config, stacked = load_params(run_dir)
    size = sum(a.nbytes for a in jax.tree.leaves(stacked))
    want = jax.tree.map(np.asarray, stacked)
    before = sum(a.nbytes for a in jax.live_arrays())
    lm = jaxgen.inference.LanguageModel(config, stacked)
    del stacked
    [r] = lm.generate([[1, 2, 3]], temperature=0.0)  # decoding must not add a second copy
    held = sum(a.nbytes for a in jax.live_arrays()) - before + size
    assert is_unstacked(lm.serving_params) and len(r.tokens) == 8
    assert held < 1.1 * size, (held, size)
    # The stacked view (for export) is rebuilt bit for bit.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, lm.params), want)


def test_generate_each_refills_and_matches_generate(lm, tmp_path):
    prompts = [f"the cat {'sat ' * (i % 5)}" for i in range(9)]
    lengths = dict(temperature=0.0, max_new_tokens=12, batch_size=3)
    want = lm.generate(prompts, **lengths)
    got = dict(lm.generate_each(prompts, **lengths))
    assert [got[i].tokens for i in range(9)] == [w.tokens for w in want]
    # A JSONL file comes back in input order, whatever order the rows finished in.
    path, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    _write_prompts(path, 9)
    generate_jsonl.run(lm, path, out, lengths, progress=False)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(range(9))


def test_speculative_generate_equals_plain_and_checks_the_draft(lm, run_dir, tmp_path):
    prompts = ["the cat sat on the mat. the cat", "a bird", "the dog ate the bone. the dog ate"]
    want = lm.generate(prompts, temperature=0.0, max_new_tokens=10)

    def delta(rows, **options):  # what one call adds to the model's totals
        before = lm.speculation_stats
        got = lm.generate(rows, temperature=0.0, max_new_tokens=10, num_speculative_tokens=3, **options)
        after = lm.speculation_stats
        fields = zip(dataclasses.astuple(before), dataclasses.astuple(after), strict=True)
        return got, speculative.Stats(*(b - a for a, b in fields))

    for options in (dict(speculative="prompt_lookup"), dict(speculative="draft", draft_run=str(run_dir))):
        got, stats = delta(prompts, **options)
        assert [g.tokens for g in got] == [w.tokens for w in want]
        assert stats.tokens == sum(len(g.tokens) for g in got) == 30
        if options["speculative"] == "prompt_lookup":
            # Each row's counts are its own: the batch adds up what each prompt does alone,
            # but for the batch's passes (as many as its slowest row's).
            alone = [delta([p], **options)[1] for p in prompts]
            assert dataclasses.replace(sum(alone, speculative.Stats()), passes=stats.passes) == stats
            assert stats.passes == max(s.passes for s in alone)
    # The model as its own draft keeps every draft (k = 3): 1 + 4 + 4 + 1 tokens, 3 passes after
    # the prefill for each of the 3 rows.
    assert (stats.passes, stats.row_passes, stats.accepted, stats.drafted) == (3, 12, 27, 27)
    # A draft whose tokenizer splits text differently is refused before anything runs.
    corpus = run_dir.parent / "corpus.txt"
    overrides = ["model.preset=tiny", f"data.train_files=[{corpus}]", f"data.data_dir={tmp_path}"]
    config = jaxgen.load_config(None, [*overrides, "tokenizer.vocab_size=60"])
    other = load_tokenizer(train_tokenizer(config))
    with pytest.raises(
        JaxgenError, match=r"^draft_run: d: its tokenizer differs from the model's \(vocab 60 vs 80\)"
    ):
        language_model._check_same_tokenizer(lm.tokenizer, other, "d")
