"""Attribute control: records tagged `{"attributes": {"style": "formal"}}` get control tokens.

The data step prepends `<style=formal>` (`generate.control_template`) to such a record,
as an untrained part: the model learns to continue in the style the token names, never
to predict the token itself. Generation prepends the same text (decode/request.py), so
`jaxgen generate --control style=formal` asks for what training showed. `collect` lists
the attribute values of the training files, so `jaxgen finetune` can add their tokens
to the tokenizer before anything is encoded.
"""

from __future__ import annotations

import pathlib

from jaxgen.data import sources
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer.text import control_prefix


def attributes_of(record: dict, field: str, path: pathlib.Path, lineno: int) -> dict[str, str]:
    """The record's attributes ({} when it has none); a JaxgenError naming file:line when
    they are not a mapping of strings to strings."""
    value = record.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise JaxgenError(
            f'{path}:{lineno}: field {field!r} must map strings to strings, e.g. {{"style": "formal"}}'
            f" (got {_short(value)})"
        )
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def record_prefix(record: dict, data, template: str, path: pathlib.Path, lineno: int) -> str:
    """The control text to prepend to one record ("" without attributes)."""
    return control_prefix(attributes_of(record, data.attributes_field, path, lineno), template)


def collect(config) -> dict[str, list[str]]:
    """{attribute: sorted values} over the training files' records (JSONL formats only)."""
    data = config.data
    if data.format == "text":
        return {}
    found: dict[str, set[str]] = {}
    for path in sources.resolve_files(data.train_files, "data.train_files"):
        read = lambda p, n, r: attributes_of(r, data.attributes_field, p, n)  # noqa: E731
        for found_here in sources.read_good(path, data, read):
            for key, value in found_here.items():
                found.setdefault(key, set()).add(value)
    return {key: sorted(values) for key, values in sorted(found.items())}


def control_tokens(attributes: dict[str, list[str]], template: str) -> list[str]:
    """The control token of every (attribute, value), in a stable order."""
    return [control_prefix({key: value}, template) for key, values in attributes.items() for value in values]
