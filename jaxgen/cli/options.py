"""`jaxgen generate`'s sampling flags, derived from the fields of `GenerateConfig`.

The schema declares each option once (name, type); a field added there becomes a flag
here. Every flag defaults to None and an unset flag is left out of the options, so the
run's `generate` section (or a JSONL line's own options) decides.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing

from jaxgen.config import GenerateConfig
from jaxgen.errors import JaxgenError

_HELP = {
    "max_length": "prompt + new tokens (as in Hugging Face); wins over --max-new-tokens"
}  # the one option outside GenerateConfig
# Fields the command line has not offered so far (set them in the config or per JSONL
# line): giving them flags changes the CLI, a decision to make on its own.
_NO_FLAG = frozenset(
    {"control_template", "prompt_buckets", "truncate_prompt", "strip", "min_length", "banned_words",
     "deduplicate"}
)  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fields() -> dict[str, typing.Any]:
    """Option name -> annotation, for the options that have a flag."""
    fields = {n: f.annotation for n, f in GenerateConfig.model_fields.items() if n not in _NO_FLAG}
    # `generate` takes this one option outside GenerateConfig (decode.request.EXTRA_OPTIONS,
    # not imported: the parser is built for every command, and decode pulls in JAX).
    return {"max_length": int, **fields}


def _words(values: dict[str, object]):
    """An argparse type taking one of `values`' keys (any case) to its value."""

    def parse(text: str):
        if text.lower() in values:
            return values[text.lower()]
        *head, last = values
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(head)} or {last}" if head else f"expected {last}"
        )

    return parse


def _scalar(annotation):
    """The argparse type of one value: int/float/str, or the words of bool and Literal."""
    if typing.get_origin(annotation) is typing.Annotated:  # constrained, e.g. PositiveInt
        annotation = typing.get_args(annotation)[0]
    if annotation in (int, float, str):
        return annotation
    members = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(annotation) if m is not type(None)]  # None: unset anyway
        if len(members) == 1:
            return _scalar(members[0])
    values: dict[str, object] = {}
    for member in members:
        if member is bool:
            values |= {"true": True, "false": False}
        elif typing.get_origin(member) is typing.Literal:
            values |= {str(v).lower(): v for v in typing.get_args(member)}
        else:
            raise TypeError(f"GenerateConfig: no command-line form for {annotation}")
    return _words(values)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option; tuple and dict options are repeatable (dicts as KEY=VALUE)."""
    for name, annotation in _fields().items():
        field = GenerateConfig.model_fields.get(name)
        described = field.description if field is not None else None
        help_text = described or _HELP.get(name) or f"overrides the config's generate.{name}"
        origin = typing.get_origin(annotation)
        if origin is tuple:
            kind = {"action": "append", "type": _scalar(typing.get_args(annotation)[0])}
        elif origin is dict:
            kind = {"action": "append", "metavar": "KEY=VALUE"}
        else:
            kind = {"type": _scalar(annotation)}
        if "action" in kind:
            help_text += " (repeatable)"
        if origin is tuple and typing.get_args(annotation)[0] is str:
            help_text += "; backslash escapes as in Python: \\n, \\t, \\\\"
        parser.add_argument(_flag(name), help=help_text, **kind)


def from_args(args: argparse.Namespace) -> dict:
    """The options set on the command line, as `generate` takes them."""
    out = {}
    for name, annotation in _fields().items():
        value = getattr(args, name)
        if value is None:
            continue
        if typing.get_origin(annotation) is tuple:
            value = tuple(_unescape(_flag(name), v) if isinstance(v, str) else v for v in value)
        elif typing.get_origin(annotation) is dict:
            value = dict(_key_value(_flag(name), item) for item in value)
        out[name] = value
    return out


def names() -> list[str]:
    """The options that have a flag (and that `:set` takes in interactive mode)."""
    return list(_fields())


def parse_option(name: str, text: str):
    """One option's value read from text as its flag reads it (`:set top_p 0.9`).

    `name` may be spelt as the flag is (`top-p`); a repeatable option gets one value (a
    one-item tuple, or a one-key dict from KEY=VALUE).
    """
    key = name.removeprefix("--").replace("-", "_")
    fields = _fields()
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1)
        raise JaxgenError(f"unknown option {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    annotation = fields[key]
    origin = typing.get_origin(annotation)
    if origin is dict:
        return dict([_key_value(_flag(key), text)])
    kind = _scalar(typing.get_args(annotation)[0] if origin is tuple else annotation)
    try:
        value = kind(text)
    except argparse.ArgumentTypeError as e:
        raise JaxgenError(f"{key} {text!r}: {e}") from None
    except ValueError:
        raise JaxgenError(f"{key} {text!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if origin is tuple:
        return (_unescape(_flag(key), value) if isinstance(value, str) else value,)
    return value


def _unescape(flag: str, text: str) -> str:
    """Backslash escapes (`\\n`, `\\t`, `\\\\`, `\\u00e9`) read as in a Python string literal,
    so `--stop '\\n\\n'` stops at a blank line; other characters pass through unchanged."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise JaxgenError(f"{flag} {text!r}: bad backslash escape ({e.reason})") from None


def _key_value(flag: str, item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise JaxgenError(f"{flag} {item!r}: expected key=value")
    return key, value
