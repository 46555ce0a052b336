"""Files from elsewhere never run code, never exhaust memory, never write outside their place.

Each hostile input is refused with one exact line (docs/RELIABILITY.md lists them). The
last test guards the package source itself: no pickle, eval, exec or trust_remote_code.
"""

import json
import os
import pathlib
import re
import struct

import numpy as np
import pytest
import safetensors.numpy

from jaxgen import checkpoint
from jaxgen.config import load_config
from jaxgen.convert.hf import read_config
from jaxgen.convert.hf_files import SafetensorsReader
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).parent.parent
HF_FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "gpt2-tiny"
TAG_NOTE = "(configs are plain data; jaxgen never builds Python objects from YAML)"


def _refused(reliability, call) -> str:
    """The one line `call` is refused with (counted as a hostile input tried)."""
    reliability["hostile inputs tried"] += 1
    with pytest.raises(JaxgenError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- YAML configs

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train:\n  steps: !!python/object/apply:os.system ['echo pwned']\n",
            f"{{path}}:2: refused: YAML tag !!python/object/apply:os.system {TAG_NOTE}",
        ),
        (
            "name: !!python/name:os.system\n",
            f"{{path}}:1: refused: YAML tag !!python/name:os.system {TAG_NOTE}",
        ),
        (
            "train: !!python/object/new:collections.OrderedDict [[[steps, 1]]]\n",
            f"{{path}}:1: refused: YAML tag !!python/object/new:collections.OrderedDict {TAG_NOTE}",
        ),
        (LAUGHS, "{path}:6: refused: its aliases expand to more than 100,000 values"),
        ("a: &a [1, *a]\n", "{path}:1: refused: a recursive alias (a value that contains itself)"),
        (
            "train:\n  steps: " + "9" * 5000 + "\n",
            "{path}: invalid YAML (Exceeds the limit (4300 digits) for integer string conversion:"
            " value has 5000 digits)",
        ),
        (
            "train:\n  steps: " + "9" * 30 + "\n",
            "{path}: train.steps: 999999999999999999999999999999 is out of range (at most 2**63 - 1)",
        ),
        (
            "optimizer:\n  learning_rate: 1.0e999999\n",
            "{path}: optimizer.learning_rate: inf is not a finite number",
        ),
        ("extends: [a.yaml]\n", "{path}: extends: expected a file name, got list"),
    ],
    ids=[
        "python-apply",
        "python-name",
        "python-new",
        "billion-laughs",
        "recursive",
        "digits",
        "int64",
        "inf",
        "extends-list",
    ],  # fmt: skip
)
def test_hostile_yaml_is_refused(tmp_path, reliability, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert _refused(reliability, lambda: load_config(path)) == message.format(path=path)


def test_hostile_overrides_and_oversized_configs_are_refused(tmp_path, reliability):
    tag = "!!python/object/apply:os.system [echo]"
    assert _refused(reliability, lambda: load_config(None, [f"train.steps={tag}"])) == (
        f"override train.steps: refused: YAML tag !!python/object/apply:os.system {TAG_NOTE}"
    )
    big = tmp_path / "big.yaml"
    with big.open("w") as f:
        os.truncate(f.fileno(), (1 << 20) + 1)  # sparse: refused before it is read
    assert _refused(reliability, lambda: load_config(big)) == (
        f"{big}: 1,048,577 bytes is too large for a config (limit 1,048,576)"
    )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    assert (
        _refused(reliability, lambda: load_config(binary))
        == f"{binary}: not UTF-8 text (byte 0xff at offset 6)"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "name=../../outside",
            "name: '../../outside' is a path, not a plain name (it names a directory jaxgen writes)",
        ),
        ("name=/etc", "name: '/etc' is a path, not a plain name (it names a directory jaxgen writes)"),
        ("data.name=..", "data.name: '..' is a path, not a plain name (it names a directory jaxgen writes)"),
    ],
)
def test_names_that_would_write_outside_their_directory_are_refused(reliability, override, message):
    assert _refused(reliability, lambda: load_config(None, [override])) == message


# ----------------------------------------------------------------------------- safetensors


def _safetensors(path: pathlib.Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
DESERIALIZE = "cannot read safetensors (Error while deserializing header: {})"


@pytest.mark.parametrize(
    "header, data, header_len, problem",
    [
        ({"a": F32x4}, b"\0" * 8, None, "incomplete metadata, file not fully covered"),
        (
            {"a": F32x4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
            b"\0" * 24,
            None,
            "invalid offset for tensor `b`",
        ),
        ({"a": {**F32x4, "shape": [5]}}, b"\0" * 16, None, "invalid shape, data type, or offset for tensor"),
        (
            {"a": {**F32x4, "dtype": "F64"}},
            b"\0" * 16,
            None,
            "invalid shape, data type, or offset for tensor",
        ),
        ({"a": F32x4}, b"\0" * 16, 10**6, "invalid header length"),
        ({"a": F32x4}, b"\0" * 16, 2**63, "header too large"),
        (
            {"a": {**F32x4, "shape": [2**40, 2**40]}},
            b"\0" * 16,
            None,
            "overflow computing buffer size from shape and/or element type",
        ),
    ],
    ids=[
        "past-end",
        "overlap",
        "wrong-shape",
        "wrong-dtype",
        "header-longer-than-file",
        "huge-header",
        "overflow",
    ],
)
def test_safetensors_with_lying_headers_are_refused(tmp_path, reliability, header, data, header_len, problem):
    _safetensors(tmp_path / "model.safetensors", header, data, header_len)
    message = _refused(reliability, lambda: SafetensorsReader(tmp_path))
    assert message == f"{tmp_path / 'model.safetensors'}: " + DESERIALIZE.format(problem)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", 7])
def test_a_shard_index_naming_files_outside_the_directory_is_refused(tmp_path, reliability, shard):
    index = {"weight_map": {"a": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    safetensors.numpy.save_file({"a": np.zeros(2, np.float32)}, tmp_path.parent / "outside.safetensors")
    assert _refused(reliability, lambda: SafetensorsReader(tmp_path)) == (
        f"{tmp_path / 'model.safetensors.index.json'}: weight_map: {shard!r} is not a file name in {tmp_path}"
    )


# ----------------------------------------------------------------------------- HF directories


def _hf_dir(tmp_path: pathlib.Path, **changes) -> pathlib.Path:
    hf = json.loads((HF_FIXTURE / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **changes}))
    return tmp_path


def test_custom_model_code_is_refused(tmp_path, reliability):
    hf_dir = _hf_dir(tmp_path, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (hf_dir / "modeling_evil.py").write_text("raise SystemExit('ran model code')\n")
    assert _refused(reliability, lambda: read_config(hf_dir)) == (
        f"{hf_dir / 'config.json'}: auto_map: 'modeling_evil.EvilForCausalLM' is custom model code;"
        " jaxgen never runs model code from a model directory (convert it to a supported architecture"
        " with transformers)"
    )


def test_hostile_config_json_is_refused(tmp_path, reliability):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"n_layer": ' + b"9" * 5000 + b"}")
    assert _refused(reliability, lambda: read_config(tmp_path)) == (
        f"{path}: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion:"
        " value has 5000 digits)"
    )
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    assert _refused(reliability, lambda: read_config(tmp_path)).startswith(
        f"{path}: invalid JSON (maximum recursion"
    )
    path.write_bytes(b'{"model_type": "gpt2\xff"}')
    assert (
        _refused(reliability, lambda: read_config(tmp_path)) == f"{path}: not UTF-8 (byte 0xff at offset 20)"
    )


# ----------------------------------------------------------------------------- tokenizers


def test_corrupt_and_enormous_tokenizers_are_refused(tmp_path, reliability):
    junk = tmp_path / "junk.model"
    junk.write_bytes(os.urandom(4096))
    assert _refused(reliability, lambda: load_tokenizer(junk)) == f"{junk}: not a SentencePiece model"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    assert _refused(reliability, lambda: load_tokenizer(hf)).startswith(
        f"{hf / 'tokenizer.json'}: cannot load tokenizer ("
    )
    for path in (tmp_path / "huge.model", hf / "tokenizer.json"):
        with path.open("w") as f:
            os.truncate(f.fileno(), (256 << 20) + 1)  # sparse: refused before it is read
        loading = path if path.suffix == ".model" else hf
        assert _refused(reliability, lambda: load_tokenizer(loading)) == (  # noqa: B023
            f"{path}: 268,435,457 bytes is too large for a tokenizer file (limit 268,435,456)"
        )


# ----------------------------------------------------------------------------- run directories


@pytest.mark.parametrize("name", ["metrics.jsonl", "tokenizer.model", "checkpoints"])
def test_a_symlink_leading_out_of_a_run_directory_is_refused(tmp_path, tiny_config, reliability, name):
    run = tmp_path / "run"
    checkpoint.write_run_config(run, tiny_config)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / name).symlink_to(outside)
    expected = (
        f"{run.resolve() / name}: a symlink to {outside.resolve()}, outside the run directory; jaxgen"
        " reads and writes only inside it"
    )
    assert _refused(reliability, lambda: checkpoint.write_run_config(run, tiny_config)) == expected
    assert _refused(reliability, lambda: checkpoint.read_run_config(run)) == expected
    (run / name).unlink()
    (run / name).symlink_to(run / "config.yaml")  # a link inside the run is fine
    assert checkpoint.read_run_config(run).model == tiny_config.model.model_copy(update={"preset": None})


# ----------------------------------------------------------------------------- the source itself

_FORBIDDEN = re.compile(
    r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bdill\b|(?<![\w.])eval\(|(?<![\w.])exec\("
    r"|trust_remote_code|yaml\.load\(|yaml\.unsafe_load|torch\.load|allow_pickle\s*=\s*True"
)


def test_the_package_never_unpickles_evals_or_runs_remote_code():
    hits = []
    for path in sorted((ROOT / "jaxgen").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _FORBIDDEN.search(code) and "_Loader" not in code:
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert hits == []
