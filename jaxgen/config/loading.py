"""Loading configs: YAML files with `extends:`, dotted `a.b.c=value` overrides, one-line errors."""

from __future__ import annotations

import difflib
import pathlib
import re
import types
import typing

import pydantic
import yaml

from jaxgen.config import safe_yaml
from jaxgen.config.schema import Config
from jaxgen.errors import JaxgenError


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | pathlib.Path, _seen: tuple[pathlib.Path, ...] = ()) -> dict:
    """Reads a config file as a dict, following `extends:` (relative to the file)."""
    path = pathlib.Path(path).resolve()
    if path in _seen:
        raise JaxgenError(f"{path}: circular extends")
    try:
        if path.stat().st_size > safe_yaml.MAX_BYTES:  # refused before reading it into memory
            size = path.stat().st_size
            raise JaxgenError(
                f"{path}: {size:,} bytes is too large for a config (limit {safe_yaml.MAX_BYTES:,})"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise JaxgenError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise JaxgenError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    data = safe_yaml.safe_load(text, str(path)) or {}
    if not isinstance(data, dict):
        raise JaxgenError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise JaxgenError(f"{path}: extends: expected a file name, got {type(parent).__name__}")
        base = read_yaml(path.parent / parent, (*_seen, path))
        data = _deep_merge(base, data)
    return data


def _field_type(key: str):
    """The schema's type of the field at dotted `key` (None: no such field)."""
    model: typing.Any = Config
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        model = fields[part].annotation
    return model


def _members(annotation) -> tuple:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else (annotation,)


def _parse_value(key: str, raw: str):
    """An override's value as the field takes it: text as typed for string fields, every
    item as text for lists of strings (YAML would make `yes` a boolean), else YAML."""
    members = _members(_field_type(key))
    if str in members and all(m in (str, type(None)) for m in members) and raw not in ("null", "~"):
        return raw
    if any(typing.get_origin(m) in (tuple, list) and typing.get_args(m)[:1] == (str,) for m in members):
        # The safe loader's node tree, before it resolves `yes` or `3`: each item's text.
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
        if isinstance(node, yaml.SequenceNode) and all(isinstance(n, yaml.ScalarNode) for n in node.value):
            return [n.value for n in node.value]
    return safe_yaml.safe_load(raw, f"override {key}", numbered=False) if raw else ""


_KEY = re.compile(r"[^\W\d]\w*(\.[^\W\d]\w*)*")  # section.field names (Python identifiers)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Applies `a.b.c=value` overrides, each value as its field takes it (`_parse_value`)."""
    data = _deep_merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise JaxgenError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        if not _KEY.fullmatch(key):  # the key goes into every message below, so one line
            raise JaxgenError(f"override {item!r}: the key is not a dotted name, e.g. train.steps=100")
        try:
            value = _parse_value(key, raw)
        except yaml.YAMLError:
            raise JaxgenError(f"override {key}: cannot parse value {raw!r}") from None
        except RecursionError:
            raise JaxgenError(f"override {key}: value nested too deeply") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else child
            if not isinstance(child, dict):
                raise JaxgenError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _field_names(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the section that `loc` points into (for 'did you mean')."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
            model = ann
        else:
            break
    return list(model.model_fields)


def _error_line(err: pydantic.ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        valid = _field_names(Config, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?)" if close else ""
        return f"{where}{key}: unknown key{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # our validators start with the field they judge
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier():
            return f"{where}{key}.{field}: {rest}"
        return f"{where}{key}: {msg}"
    return f"{where}{key}: {msg} (got {first.get('input')!r})"


def load_config(
    path: str | pathlib.Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Loads a YAML config (or the defaults when `path` is None) with dotted overrides.

    Raises:
        JaxgenError: one line naming the file, the dotted key and the bad value.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    if path is not None and "name" not in data:
        data["name"] = pathlib.Path(path).stem
    return config_from_dict(data, where=f"{path}: " if path is not None else "")


def config_from_dict(data: dict, where: str = "") -> Config:
    try:
        return Config.model_validate(data)
    except pydantic.ValidationError as e:
        raise JaxgenError(_error_line(e, where)) from None


# Keys that shipped configs leave for the user to fill in, as "<what to put here>".
PLACEHOLDER_KEYS = ("data.train_files", "data.validation_files", "data.data_dir", "tokenizer.path")


def check_no_placeholders(config: Config) -> None:
    """Refuses to run a config whose paths still hold a "<...>" placeholder.

    Raises:
        JaxgenError: naming the first unset dotted key and its placeholder text.
    """
    for key in PLACEHOLDER_KEYS:
        section, field = key.split(".")
        value = getattr(getattr(config, section), field)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, str) and "<" in item and ">" in item:
                raise JaxgenError(f"{key}: {item!r} is a placeholder; set it in the config or as {key}=...")


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, loadable again by `load_config`."""
    data = config.model_dump(mode="json", exclude={"model": {"preset"}})
    return yaml.safe_dump(data, sort_keys=False)
