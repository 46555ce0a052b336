"""`tfds:NAME/CONFIG[:SPLIT]` sources: TFDS catalog datasets already prepared in `data.data_dir`.

Only files on disk are read (`tfds.builder_from_directory`); the catalog's builder code,
which would try to download, is never called. Without TensorFlow only datasets
prepared with `file_format="array_record"` can be read.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterator

import tensorflow_datasets as tfds

from jaxgen.errors import JaxgenError


def parse(pattern: str, default_split: str) -> tuple[str, str]:
    """'tfds:wikitext/wikitext-103-raw-v1:test' -> ('wikitext/wikitext-103-raw-v1', 'test')."""
    spec = pattern.removeprefix("tfds:")
    name, _, split = spec.partition(":")
    if not name:
        raise JaxgenError(f"data: {pattern!r} names no dataset (expected tfds:NAME/CONFIG[:SPLIT])")
    return name, split or default_split


def catalog_dir(config, pattern: str) -> pathlib.Path:
    """The newest prepared version directory of the dataset `pattern` names."""
    name, _ = parse(pattern, "train")
    root = pathlib.Path(config.data.data_dir) / name
    versions = sorted(
        (p for p in root.glob("*") if (p / "dataset_info.json").is_file()),
        key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")),
    )
    if not versions:
        raise JaxgenError(
            f"data: {pattern}: not prepared in {root} (jaxgen never downloads; prepare it with "
            f"`tfds build {name} --data_dir {config.data.data_dir} --file_format array_record` "
            "on a machine with network access)"
        )
    return versions[-1]


def _source(config, pattern: str, default_split: str):

    path = catalog_dir(config, pattern)
    _, split = parse(pattern, default_split)
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise JaxgenError(f"data: {pattern}: no split {split!r} (has {sorted(builder.info.splits)})")
    try:
        return builder.as_data_source(split=split)
    except (NotImplementedError, ValueError) as e:
        raise JaxgenError(
            f"data: {pattern}: cannot read without TensorFlow ({str(e).splitlines()[0]}); "
            "it must be prepared with file_format=array_record"
        ) from None


def catalog_texts(config, pattern: str, default_split: str) -> Iterator[str]:
    """The `data.text_field` of each example of the split, in order."""
    field = config.data.text_field
    source = _source(config, pattern, default_split)
    for i in range(len(source)):
        example = source[i]
        if field not in example:
            raise JaxgenError(f"data: {pattern}: example {i} has no field {field!r} ({sorted(example)})")
        value = example[field]
        yield value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def catalog_digest(config, pattern: str) -> str:
    """Identity of a prepared dataset: its metadata and its files' sizes and mtimes."""
    path = catalog_dir(config, pattern)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    blob = json.dumps([pattern, str(path), files])
    return hashlib.sha256(blob.encode()).hexdigest()
