"""Turning source files into documents (pretraining) or records (SFT), one split at a time.

A split is a range of "units" over the concatenated inputs: characters for text files
(so a validation fraction of one file is exactly its last characters, as nanoGPT's
`data[int(n * 0.9):]`), non-empty lines (records) for JSONL. Documents stream as
segments `(text, end)`: `end` marks the end of a document, where an eos goes.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from jaxgen.data import sources
from jaxgen.data.catalog import catalog_texts
from jaxgen.errors import JaxgenError

Segment = tuple[str, bool]


@dataclasses.dataclass
class Counts:
    """Size of one split, counted while it is written (exported as `SplitStats`).

    chars/bytes count the split's text, for nats per char/byte. examples: documents
    (pretraining) or kept records (SFT) or pairs (preference); tokens: tokens written (with
    eos separators / bos+eos); replaced_chars: invalid UTF-8 replaced by U+FFFD; dropped /
    truncated: SFT records longer than seq_len + 1, preference pairs longer than seq_len + 2
    (per `data.overlong`); identical: preference pairs dropped because chosen == rejected;
    dropped_at: "file:line (why)" of the first few dropped preference pairs. bad_lines:
    JSONL lines skipped as bad (`data.bad_lines: skip`); bad_at: the first few, each
    "file:line: why", stored with the split so an up-to-date dataset still reports them.
    """

    examples: int = 0
    tokens: int = 0
    chars: int = 0
    bytes: int = 0
    replaced_chars: int = 0
    dropped: int = 0
    truncated: int = 0
    identical: int = 0
    dropped_at: list[str] = dataclasses.field(default_factory=list)
    bad_lines: int = 0
    bad_at: list[str] = dataclasses.field(default_factory=list)


BAD_LINES_SHOWN = 10  # bad lines listed in a split's statistics (all are counted)


def bad_record(error: JaxgenError, data, counts: Counts) -> None:
    """Handles one bad JSONL record by `data.bad_lines`: raised when strict, else counted
    (the first `BAD_LINES_SHOWN` kept with their file:line) and skipped by the caller."""
    if data.bad_lines == "strict":
        raise error
    counts.bad_lines += 1
    if len(counts.bad_at) < BAD_LINES_SHOWN:
        counts.bad_at.append(str(error))


class Splitter:
    """Cuts streamed text into document segments by `data.documents`.

    file: the whole text is one document. line: each non-blank line is one.
    blank_lines: runs of non-blank lines separated by blank lines (newlines inside kept).
    """

    def __init__(self, mode: str):
        self._mode = mode
        self._partial = ""  # an unfinished line (line / blank_lines modes)
        self._in_doc = False

    def feed(self, text: str) -> list[Segment]:
        if self._mode == "file":
            return [(text, False)] if text else []
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return self._lines(lines)

    def end(self) -> list[Segment]:
        """Ends the current document (at the end of a file or of the split's range)."""
        if self._mode == "file":
            return [("", True)]
        out = self._lines([self._partial]) if self._partial else []
        self._partial = ""
        if self._in_doc:
            out.append(("", True))
            self._in_doc = False
        return out

    def _lines(self, lines: list[str]) -> list[Segment]:
        if self._mode == "line":
            return [(line, True) for line in lines if line.strip()]
        out = []
        for line in lines:
            if line.strip():
                out.append(("\n" + line if self._in_doc else line, False))
                self._in_doc = True
            elif self._in_doc:
                out.append(("", True))
                self._in_doc = False
        return out


def text_segments(
    files: Sequence[pathlib.Path],
    data,
    lo: int,
    hi: int,
    counts: Counts,
    advance: Callable[[int], None],
) -> Iterator[Segment]:
    """Document segments of characters [lo, hi) of the concatenated text files."""
    pos = 0
    for path in files:
        splitter = Splitter(data.documents)
        for block in sources.read_blocks(path, data.strict_utf8):
            advance(block.nbytes)
            n = len(block.text)
            a, b = max(lo - pos, 0), min(hi - pos, n)
            pos += n
            if a >= b:
                if pos >= hi:
                    break
                continue
            text = block.text if (a, b) == (0, n) else block.text[a:b]
            if block.replaced:
                counts.replaced_chars += min(block.replaced, text.count("\ufffd"))
            yield from splitter.feed(text)
        yield from splitter.end()
        if pos >= hi:
            return


def jsonl_records(
    files: Sequence[pathlib.Path],
    data,
    lo: int,
    hi: int,
    counts: Counts,
    advance: Callable[[int], None],
) -> Iterator[tuple[pathlib.Path, int, dict]]:
    """(path, line, record) for records [lo, hi) of the concatenated JSONL files.

    A bad line counts as a record of the range it falls in (as `sources.scan_file` counts
    non-blank lines), so each bad line is reported by exactly one split (`bad_record`).
    """
    index = 0
    for path in files:
        for line in sources.iter_jsonl(path, data.strict_utf8, advance):
            if index >= hi:
                return
            if index >= lo:
                if line.record is None:
                    bad_record(line.error(), data, counts)
                else:
                    counts.replaced_chars += line.replaced
                    yield path, line.number, line.record
            index += 1


def read_records(
    records: Iterable[tuple[pathlib.Path, int, dict]], read: Callable, data, counts: Counts
) -> Iterator:
    """`read(path, line, record)` of each record; one it refuses (a JaxgenError: a wrong or
    missing field) is a bad line (`bad_record`). Called as records stream, so bad lines are
    counted in file order whichever check found them."""
    for path, lineno, record in records:
        try:
            yield read(path, lineno, record)
        except JaxgenError as e:
            bad_record(e, data, counts)


def jsonl_segments(files, data, lo, hi, counts, advance) -> Iterator[Segment]:
    """Pretraining documents from JSONL: one per record, its `data.text_field`."""
    records = jsonl_records(files, data, lo, hi, counts, advance)
    for text in read_records(
        records, lambda p, n, r: sources.text_field(r, data.text_field, p, n), data, counts
    ):
        yield text, True


def catalog_segments(config, patterns: Sequence[str], default_split: str) -> Iterator[Segment]:
    """Pretraining documents from `tfds:` sources: one per example."""

    for pattern in patterns:
        for text in catalog_texts(config, pattern, default_split):
            yield text, True
