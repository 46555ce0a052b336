"""Config tree: YAML loading, extends, overrides, and one-line rejections."""

import pathlib

import pytest

from jaxgen.cli import main
from jaxgen.config import Config, check_no_placeholders, load_config, to_yaml
from jaxgen.errors import JaxgenError

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_dir_is_not_empty():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.name == path.stem


def test_extends_merges_deeply_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model: {preset: tiny, num_layers: 1}\ntrain: {steps: 7, batch_size: 4}\n"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {steps: 9}\n")
    config = load_config(tmp_path / "child.yaml", ["model.d_model=128", "optimizer.name=lion"])
    assert (config.train.steps, config.train.batch_size) == (9, 4)
    assert (config.model.num_layers, config.model.d_model, config.model.vocab_size) == (1, 128, 512)
    assert config.optimizer.name == "lion"
    assert config.name == "child"


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(None, ["model.preset=llama3-8b", "train.steps=5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    again = load_config(path)
    assert again.model == config.model.model_copy(update={"preset": None})
    assert again.train == config.train


def test_string_fields_take_override_text_as_typed():
    # YAML would read "ROMEO:" as a mapping and "123" as a number; a string field means text.
    config = load_config(
        None,
        [
            "train.sample_prompt=ROMEO:",
            "name=123",
            "tokenizer.path=null",
            "generate.control_template=<{key}>",
        ],
    )
    assert config.train.sample_prompt == "ROMEO:"
    assert config.name == "123"
    assert config.tokenizer.path is None  # an optional string still takes null
    assert config.generate.control_template == "<{key}>"
    assert load_config(None, ["train.steps=7", "generate.stop=[a, b]"]).generate.stop == ("a", "b")
    # every item of a list of strings is text too: YAML would make `yes` True and `3` a number
    assert load_config(None, ["tokenizer.control_tokens=[yes, 3]"]).tokenizer.control_tokens == ("yes", "3")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_hedas=3"], "model.num_hedas: unknown key (did you mean 'model.num_heads'?)"),
        (["trian.steps=3"], "trian: unknown key (did you mean 'train'?)"),
        (["model.num_heads=5"], "model.num_heads: 5 does not divide d_model=64"),
        (["model.num_kv_heads=3"], "model.num_kv_heads: 3 does not divide num_heads=4"),
        (["train.steps=-1"], "train.steps: Input should be greater than 0 (got -1)"),
        (["train.batch_size=abc"], "train.batch_size: Input should be a valid integer"),
        (["model.preset=gpt3"], "model.preset: unknown value 'gpt3'"),
        (["optimizer.name=adam"], "optimizer.name: Input should be"),
        (["mesh.data=0"], "mesh.data: 0 is not a positive size"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: only one mesh axis may be -1"),
        (
            ["generate.num_beams=2", "generate.num_return_sequences=3"],
            "generate.num_return_sequences: 3 exceeds",
        ),
        (["train.steps"], "expected key=value"),
    ],
)
def test_rejections_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(JaxgenError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("name", ["gpt2_124m.yaml", "llama3_8b_v5e256.yaml"])
def test_placeholders_must_be_set_before_running(name):
    config = load_config(ROOT / "configs" / name)
    with pytest.raises(JaxgenError, match=r"^(data|tokenizer)\.\w+: '.*<.*>.*' is a placeholder; set it"):
        check_no_placeholders(config)
    filled = load_config(
        ROOT / "configs" / name,
        ["data.train_files=[corpus.txt]", "data.data_dir=prepared", "tokenizer.path=tok.model"],
    )
    check_no_placeholders(filled)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(JaxgenError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(JaxgenError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "typo.yaml").write_text("train:\n  stpes: 3\n")
    with pytest.raises(
        JaxgenError, match=r"typo.yaml: train.stpes: unknown key \(did you mean 'train.steps'\?\)"
    ):
        load_config(tmp_path / "typo.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(JaxgenError, match=r":1: refused: YAML tag !!python/object/apply:os.system "):
        load_config(path)


def test_cli_config_show_and_errors(capsys, tmp_path):
    assert main(["config", "show", str(CONFIGS[0]), "train.steps=3"]) == 0
    shown = capsys.readouterr().out
    assert "steps: 3" in shown
    assert main(["config", "show", str(CONFIGS[0]), "train.stepz=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'train.steps'" in err and err.count("\n") == 1


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "finetune", "generate", "eval", "data", "convert", "plan", "bench", "config"):
        assert name in out
