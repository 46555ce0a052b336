"""JSONL read one line at a time, each line decoded on its own.

A file is read as blocks of bytes cut at newlines before anything is decoded, so a fault
in one line (invalid UTF-8, invalid JSON, a NUL byte, a line over `MAX_LINE_BYTES`) is a
fault of that line only: the reader hands it on as a bad `Line` naming file:line, and the
caller skips and counts it or stops (`data.bad_lines`, `generate --strict`). Memory stays
bounded by the longest allowed line whatever the file size: a longer line is passed over
without being held.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterator

from jaxgen.errors import JaxgenError

# Far above any record a model of today's context lengths can use (a 128k-token record is
# ~0.5 MB of text), far below what would strain memory; a longer line is a bad line.
MAX_LINE_BYTES = 8 << 20
_BLOCK_BYTES = 1 << 20
_FFFD = "\ufffd".encode()


@dataclasses.dataclass(frozen=True)
class Line:
    """One non-blank line of a JSONL file: its record, or why it is a bad line."""

    path: pathlib.Path
    number: int  # 1-based
    record: dict | None  # None for a bad line
    problem: str | None = None  # why the line is bad, without file:line
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD (when replacing)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"

    def error(self) -> JaxgenError:
        """The bad line as the one-line user error: `file:line: why`."""
        return JaxgenError(f"{self.where}: {self.problem}")


def read_jsonl(
    path: pathlib.Path,
    *,
    replace_invalid_utf8: bool = False,
    utf8_hint: str = "",
    advance: Callable[[int], None] | None = None,
) -> Iterator[Line]:
    """Every non-blank line of `path` as a record or a bad line, in file order.

    Args:
        replace_invalid_utf8: invalid UTF-8 becomes U+FFFD (counted in `Line.replaced`)
            instead of making the line bad.
        utf8_hint: appended to the invalid UTF-8 problem (how to get replacement instead).
        advance: called with the size of each block as it is read (progress bars).
    """
    for number, raw in raw_lines(path, advance):
        if raw is None:
            yield Line(path, number, None, f"line longer than {MAX_LINE_BYTES >> 20} MiB")
            continue
        try:
            text, replaced = raw.decode("utf-8"), 0
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", "replace")
            replaced = text.count("\ufffd") - raw.count(_FFFD)
            if text.strip() and not replace_invalid_utf8:
                yield Line(path, number, None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x}){utf8_hint}")
                continue
        if not text.strip():  # blank lines are not records (as `sources.scan_file` counts them)
            continue
        if "\0" in text:  # a NUL byte is never JSON; say so rather than "invalid control character"
            yield Line(path, number, None, "NUL byte in the line")
            continue
        record, problem = parse(text)
        yield Line(path, number, record, problem, replaced)


def parse(text: str) -> tuple[dict | None, str | None]:
    """(record, None) for a JSON object, else (None, why)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    except ValueError as e:  # an integer of more than 4,300 digits
        return None, f"not valid JSON ({str(e).split(';')[0]})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def raw_lines(
    path: pathlib.Path, advance: Callable[[int], None] | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the newline) of every line; None for a line longer than
    `MAX_LINE_BYTES`, which is passed over without being held in memory."""
    number, carry, overlong = 1, b"", False
    with open(path, "rb") as f:
        while data := f.read(_BLOCK_BYTES):
            if advance is not None:
                advance(len(data))
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                piece = data[start:end]
                too_long = overlong or len(carry) + len(piece) > MAX_LINE_BYTES
                yield number, None if too_long else carry + piece
                number, carry, overlong, start = number + 1, b"", False, end + 1
            if not overlong:
                rest = data[start:]
                overlong = len(carry) + len(rest) > MAX_LINE_BYTES
                carry = b"" if overlong else carry + rest
    if overlong or carry:
        yield number, None if overlong else carry
