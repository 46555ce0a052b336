"""Reading local sources: files and globs, UTF-8 with counted replacements, JSONL, SFT and
preference records.

Everything streams: text files are read in ~1 MB blocks cut at line breaks, so memory
stays bounded whatever the file size; JSONL is read a line at a time (data/lines.py).
Every bad input is a one-line JaxgenError naming the file (and line where there is one);
a bad JSONL record is skipped and counted or raised by `data.bad_lines`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from jaxgen.data import lines
from jaxgen.data.catalog import catalog_digest, catalog_texts
from jaxgen.data.chat import ChatTemplate, PlainChat, check_messages
from jaxgen.errors import JaxgenError

T = TypeVar("T")

BLOCK_BYTES = 1 << 20
_MAX_LINE_BYTES = 16 * BLOCK_BYTES  # a longer line is cut (at a character boundary)
_FFFD = "\ufffd".encode()


@dataclasses.dataclass
class Block:
    """Decoded text of a whole number of lines of `path`, starting at line `line` (1-based)."""

    text: str
    path: pathlib.Path
    line: int
    replaced: int  # invalid UTF-8 sequences replaced by U+FFFD in this block
    nbytes: int  # raw size in the file


# ----------------------------------------------------------------------------- files


def is_tfds(pattern: str) -> bool:
    return pattern.startswith("tfds:")


def resolve_files(patterns: Sequence[str], key: str) -> list[pathlib.Path]:
    """Expands paths and globs (sorted) in order; tfds: entries are left to `catalog`.

    Raises:
        JaxgenError: a glob matching nothing, a missing file, an empty file.
    """
    files: list[pathlib.Path] = []
    for pattern in patterns:
        if is_tfds(pattern):
            continue
        if glob.has_magic(pattern):
            matches = sorted(pathlib.Path(p) for p in glob.glob(pattern, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise JaxgenError(f"{key}: {pattern!r} matches no files")
        else:
            matches = [pathlib.Path(pattern)]
        for path in matches:
            if not path.is_file():
                raise JaxgenError(f"{path}: file not found (listed in {key})")
            if path.stat().st_size == 0:
                raise JaxgenError(f"{path}: file is empty (listed in {key})")
            files.append(path)
    return files


def strict_blocks(data) -> bool:
    """Whether invalid UTF-8 stops a whole-file read: text files under `data.strict_utf8`;
    never JSONL, where it makes its line bad (`iter_jsonl`), skipped or not by `data.bad_lines`."""
    return data.strict_utf8 and data.format == "text"


@dataclasses.dataclass
class FileScan:
    """What one pass over a file learns: identity, content hash, sizes in chars and records."""

    size: int
    mtime_ns: int
    sha256: str
    chars: int  # after U+FFFD replacement
    records: int  # non-empty lines


def scan_file(path: pathlib.Path, strict: bool, known: dict | None = None) -> FileScan:
    """Hashes and measures `path`; reuses `known` (a stored scan) when size and mtime match."""
    st = path.stat()
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return FileScan(**known)
    digest = hashlib.sha256()
    chars = records = 0
    for raw, block in _raw_blocks(path, strict):
        digest.update(raw)
        chars += len(block.text)
        records += sum(1 for line in block.text.split("\n") if line.strip())
    return FileScan(st.st_size, st.st_mtime_ns, digest.hexdigest(), chars, records)


def file_digests(config, patterns: Sequence[str]) -> dict[str, str]:
    """{path: sha256} of the files `patterns` name (tfds: sources by their metadata)."""

    out = {}
    for pattern in patterns:
        if is_tfds(pattern):
            out[pattern] = catalog_digest(config, pattern)
    for path in resolve_files(patterns, "data.train_files"):
        out[str(path)] = scan_file(path, strict_blocks(config.data)).sha256
    return out


# ----------------------------------------------------------------------------- decoding


def read_blocks(path: pathlib.Path, strict: bool) -> Iterator[Block]:
    """Streams `path` as decoded blocks of whole lines (the last may lack its newline)."""
    for _, block in _raw_blocks(path, strict):
        yield block


def _raw_blocks(path: pathlib.Path, strict: bool) -> Iterator[tuple[bytes, Block]]:
    line = 1
    carry = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(BLOCK_BYTES)
            if not data:
                break
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) < _MAX_LINE_BYTES:
                    carry = data
                    continue
                cut = _char_boundary(data, len(data))
            raw, carry = data[:cut], data[cut:]
            yield raw, decode(raw, path, line, strict)
            line += raw.count(b"\n")
    if carry:
        yield carry, decode(carry, path, line, strict)


def _char_boundary(data: bytes, end: int) -> int:
    """The largest cut <= end that does not split a UTF-8 sequence."""
    cut = end
    while cut > end - 4 and cut > 0 and 0x80 <= data[cut - 1] < 0xC0:
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose tail was cut off
        cut -= 1
    return cut if cut > 0 else end


def decode(raw: bytes, path: pathlib.Path, line: int, strict: bool) -> Block:
    """UTF-8 decodes `raw`: invalid sequences become U+FFFD (counted) or, strict, an error."""
    try:
        return Block(raw.decode("utf-8"), path, line, 0, len(raw))
    except UnicodeDecodeError as e:
        if strict:
            where = line + raw.count(b"\n", 0, e.start)
            raise JaxgenError(
                f"{path}:{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x}); "
                "set data.strict_utf8: false to replace it with U+FFFD"
            ) from None
    text = raw.decode("utf-8", "replace")
    return Block(text, path, line, text.count("\ufffd") - raw.count(_FFFD), len(raw))


# ----------------------------------------------------------------------------- JSONL


def iter_jsonl(path: pathlib.Path, strict: bool, advance=None) -> Iterator[lines.Line]:
    """Every non-blank line of a JSONL file as a record or a bad line (`lines.read_jsonl`).

    Invalid UTF-8 is replaced by U+FFFD (counted) unless `strict` (data.strict_utf8), when
    it makes the line bad. `advance(nbytes)`, when given, is called as each block is read.
    """
    hint = "; set data.strict_utf8: false to replace it with U+FFFD"
    return lines.read_jsonl(path, replace_invalid_utf8=not strict, utf8_hint=hint, advance=advance)


def read_good(path: pathlib.Path, data, read: Callable[[pathlib.Path, int, dict], T]) -> Iterator[T]:
    """`read(path, line, record)` of each good line. A bad line, or a record `read` refuses
    (a JaxgenError: a wrong or missing field), raises under `data.bad_lines: strict` and is
    otherwise passed over (`data prepare` counts it where it writes the split)."""
    for line in iter_jsonl(path, data.strict_utf8):
        try:
            if line.record is None:
                raise line.error()
            value = read(path, line.number, line.record)
        except JaxgenError:
            if data.bad_lines == "strict":
                raise
            continue
        yield value


def text_field(record: dict, field: str, path: pathlib.Path, lineno: int) -> str:
    """record[field] as a string, or a JaxgenError naming file:line and the field."""
    if field not in record:
        keys = ", ".join(sorted(record)[:8])
        raise JaxgenError(f"{path}:{lineno}: no field {field!r} (the record has: {keys})")
    value = record[field]
    if not isinstance(value, str):
        raise JaxgenError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string")
    return value


def sft_parts(
    record: dict, data, path: pathlib.Path, lineno: int, template: ChatTemplate | None = None
) -> list[tuple[str, bool]]:
    """An SFT record as [(text, trained)]: prompt/response, or chat turns (data.trained_role's
    turns trained), rendered by `template` when given, else by data.turn_header/turn_separator."""
    if data.messages_field in record:
        messages = record[data.messages_field]
        if not isinstance(messages, list) or not messages:
            raise JaxgenError(f"{path}:{lineno}: field {data.messages_field!r} must be a non-empty list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise JaxgenError(f"{path}:{lineno}: message {j} needs a string 'role' and 'content'")
            text_field(m, "content", path, lineno)
        chat = PlainChat.from_data(data) if template is None else template
        try:
            parts = chat.parts(messages, data.trained_role)
        except JaxgenError as e:  # the template's file is named; add the record's
            raise JaxgenError(f"{path}:{lineno}: {e}") from None
        if not any(trained for _, trained in parts):
            raise JaxgenError(f"{path}:{lineno}: no {data.trained_role!r} turn to train on")
        return parts
    if data.prompt_field not in record and data.response_field not in record:
        if data.text_field in record:  # plain text: trained throughout (a style corpus)
            return [(text_field(record, data.text_field, path, lineno), True)]
        raise JaxgenError(
            f"{path}:{lineno}: expected fields {data.prompt_field!r} and {data.response_field!r}"
            f", {data.messages_field!r} or {data.text_field!r}"
        )
    prompt = text_field(record, data.prompt_field, path, lineno)
    response = text_field(record, data.response_field, path, lineno)
    return [(prompt, False), (response, True)]


Turn = str | list[dict]  # a preference record's prompt or completion: text, or chat messages


def preference_fields(record: dict, data, path: pathlib.Path, lineno: int) -> tuple[Turn, Turn, Turn]:
    """(prompt, chosen, rejected) of a preference record, each a string or a list of messages.

    The prompt is `data.prompt_field`, else `data.messages_field`; it may be "" (no prompt).
    A completion given as messages needs the prompt as messages too, and a `data.trained_role`
    turn with some content.

    Raises:
        JaxgenError: naming file:line and the field: a missing field, one that is neither a
            string nor a list of messages, or an empty completion.
    """
    where = f"{path}:{lineno}"
    chat_prompt = data.prompt_field not in record and data.messages_field in record
    key = data.messages_field if chat_prompt else data.prompt_field
    prompt = _turn(record, key, where)
    completions = []
    for field in (data.chosen_field, data.rejected_field):
        value = _turn(record, field, where)
        if isinstance(value, str):
            empty = not value
        else:
            if isinstance(prompt, str):
                raise JaxgenError(
                    f"{where}: field {field!r} is a list of messages but {key!r} is a string; "
                    "give the prompt as messages too"
                )
            trained = [m["content"] for m in value if m["role"] == data.trained_role]
            if not trained:
                raise JaxgenError(f"{where}: field {field!r} has no {data.trained_role!r} turn")
            empty = not any(trained)
        if empty:
            raise JaxgenError(f"{where}: field {field!r} is empty")
        completions.append(value)
    return prompt, completions[0], completions[1]


def _turn(record: dict, field: str, where: str) -> Turn:
    if field not in record:
        keys = ", ".join(sorted(record)[:8])
        raise JaxgenError(f"{where}: no field {field!r} (the record has: {keys})")
    value = record[field]
    if isinstance(value, list):
        return check_messages(value, f"{where}: field {field!r}")
    if not isinstance(value, str):
        raise JaxgenError(
            f"{where}: field {field!r} is {type(value).__name__}, not a string or a list of messages"
        )
    return value


# ----------------------------------------------------------------------------- tokenizer input


def sentence_iterator(config) -> Iterator[str]:
    """Lines of the training text (the tokenizer trainer's input), streamed."""
    data = config.data
    plain = PlainChat.from_data(data)
    for pattern in data.train_files:
        if is_tfds(pattern):
            for text in catalog_texts(config, pattern, default_split="train"):
                yield from _lines(text)
    for path in resolve_files(data.train_files, "data.train_files"):
        if data.format == "text":
            for block in read_blocks(path, data.strict_utf8):
                yield from _lines(block.text)
            continue
        for texts in read_good(path, data, lambda p, n, r: _record_texts(r, data, plain, p, n)):
            for text in texts:
                yield from _lines(text)


def _record_texts(record: dict, data, plain: PlainChat, path: pathlib.Path, lineno: int) -> list[str]:
    """The texts of one JSONL record in the configured format (a bad record raises)."""
    if data.format == "jsonl":
        return [text_field(record, data.text_field, path, lineno)]
    if data.format == "preference":
        texts = []
        for turn in preference_fields(record, data, path, lineno):
            texts += [turn] if isinstance(turn, str) else [text for text, _ in plain.parts(turn)]
        return texts
    return [text for text, _ in sft_parts(record, data, path, lineno)]


def _lines(text: str) -> Iterator[str]:
    for line in text.split("\n"):
        if line.strip():
            yield line
