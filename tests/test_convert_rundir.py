"""import-hf -> run directory -> export-hf, through the library and the CLI."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors
import tokenizers
from param_trees import assert_bit_identical
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxgen.checkpoint import load_params
from jaxgen.cli import main
from jaxgen.convert import hf
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer import load_tokenizer
from jaxgen.tokenizer.hf import HFTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.fixture(scope="module")
def gpt2_with_tokenizer(tmp_path_factory) -> pathlib.Path:
    """gpt2-tiny plus a small byte-level BPE tokenizer.json (fits its 512-id vocab)."""
    out = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    shutil.copytree(FIXTURES / "gpt2-tiny", out)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tok.train_from_iterator(["hello world, the quick brown fox"] * 10, trainer)
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_import_export_import_is_bit_identical(name, tmp_path):
    config = hf.import_hf(FIXTURES / name, tmp_path / "run")
    saved, params = load_params(tmp_path / "run")
    assert saved.model == config.model
    _, direct, _ = hf.load_hf(FIXTURES / name, dtype="float32")
    assert_bit_identical(params, direct)

    files = hf.export_hf(tmp_path / "run", tmp_path / "out")
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    with (
        safetensors.safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as ours,
        safetensors.safe_open(FIXTURES / name / "model.safetensors", framework="numpy") as theirs,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for key in theirs.keys():
            np.testing.assert_array_equal(ours.get_tensor(key), theirs.get_tensor(key), err_msg=key)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (511, 511)  # kept from generation_config

    hf.import_hf(tmp_path / "out", tmp_path / "run2")
    assert_bit_identical(load_params(tmp_path / "run2")[1], params)


def test_tokenizer_travels_with_the_model(gpt2_with_tokenizer, tmp_path):
    config, _, tokenizer = hf.load_hf(gpt2_with_tokenizer, dtype="float32")
    assert isinstance(tokenizer, HFTokenizer) and 257 < tokenizer.vocab_size <= config.model.vocab_size
    hf.import_hf(gpt2_with_tokenizer, tmp_path / "run")
    in_run = load_tokenizer(tmp_path / "run")
    assert in_run.encode("hello world") == tokenizer.encode("hello world")
    files = hf.export_hf(tmp_path / "run", tmp_path / "out")
    assert "tokenizer.json" in files
    assert load_tokenizer(tmp_path / "out").encode("the fox") == tokenizer.encode("the fox")


def test_import_into_a_non_empty_directory_writes_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(JaxgenError, match="already exists and is not empty"):
        hf.import_hf(FIXTURES / "gpt2-tiny", tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging directory left behind


def test_failed_import_leaves_no_output(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURES / "gpt2-tiny", broken)
    (broken / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(JaxgenError, match="BertModel is not implemented"):
        hf.import_hf(broken, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_import_and_export(tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                "import-hf",
                str(FIXTURES / "llama-tiny"),
                str(tmp_path / "run"),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert "imported llama (2 layers, d_model 64, bfloat16)" in capsys.readouterr().out
    config, params = load_params(tmp_path / "run")
    assert config.model.param_dtype == "bfloat16"
    assert params["lm_head"].dtype == np.dtype("bfloat16")

    assert (
        main(["convert", "export-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--max-shard-gb", "1e-4"])
        == 0
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with safetensors.safe_open(
        tmp_path / "out" / index["weight_map"]["lm_head.weight"], framework="numpy"
    ) as f:
        assert f.get_tensor("lm_head.weight").dtype == np.dtype("bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", "import-hf", str(tmp_path / "nowhere"), str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith("config.json: not found") and "\n" not in err
    assert main(["convert", "export-hf", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_classic_gpt2_recipe_end_to_end(gpt2_with_tokenizer):
    """`jaxgen.load(HF_DIR).generate(prompt, max_length=..., num_beams=5, early_stopping=True)`."""
    import jaxgen

    lm = jaxgen.load(gpt2_with_tokenizer, dtype="float32")
    (result,) = lm.generate(["hello world, the"], max_length=20, num_beams=5, early_stopping=True)
    prompt = lm.tokenizer.encode("hello world, the")
    assert result.prompt_tokens == prompt
    assert 1 <= len(result.tokens) <= 20 - len(prompt)
    assert result.text == lm.tokenizer.decode(result.tokens)
    assert result.finish_reason in ("length", "eos") and result.scores is not None
