"""The ids a `generate --input` run has seen, in 8 bytes each whatever the file size.

Two sets grow with the input: the ids read so far (a repeated id is a bad line) and the
ids already in the output (a resumed run skips them). As Python sets of strings they cost
~100 bytes an id (~100 MB for 1M lines); here each id is a 64-bit BLAKE2b digest of its
JSON form, kept in a sorted numpy array plus a small set of recent ones merged in when
full: 8 bytes an id (8 MB for 1M lines, twice that while merging). Two distinct ids share a
digest with probability ~n^2 / 2^65 (3e-8 for a million ids), which would report the later
one as a duplicate or skip it as done.

`done_ids` reads the output a line at a time, so resuming from a multi-GB output holds one
line, not the file.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from jaxgen.errors import JaxgenError

_RECENT = 1 << 16  # digests kept in a set before merging into the sorted array


def key(record_id) -> str:
    """The id as its JSON text: 1 and "1" are different ids."""
    return json.dumps(record_id)


def _digest(text: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))


class IdSet:
    """A set of id keys (`key(id)`), held as sorted 64-bit digests."""

    def __init__(self):
        self._sorted = np.empty(0, np.uint64)
        self._recent: set[np.uint64] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, text: str) -> bool:
        return self._has(_digest(text))

    def add(self, text: str) -> None:
        digest = _digest(text)
        if self._has(digest):
            return
        self._recent.add(digest)
        if len(self._recent) >= _RECENT:  # one O(n) merge per 65,536 ids keeps lookups a bisection
            merged = np.concatenate([self._sorted, np.fromiter(self._recent, np.uint64, len(self._recent))])
            merged.sort()  # in place: the merge holds the old and the new array, no more
            self._sorted, self._recent = merged, set()

    def _has(self, digest: np.uint64) -> bool:
        if digest in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, digest))
        return i < len(self._sorted) and self._sorted[i] == digest


def done_ids(path: pathlib.Path) -> IdSet:
    """Ids already written to `path`; a torn (unterminated or unparsable) last line is cut off."""
    ids = IdSet()
    if not path.exists():
        return ids
    end, torn_from = 0, None  # torn_from: (offset, line number) of a run of unparsable lines
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # one line in memory at a time, however long
            if not line.endswith(b"\n"):
                break  # killed while writing the last line
            try:
                record = json.loads(line)
            except ValueError:  # invalid JSON or UTF-8
                # Only the last lines can be torn (a newline from an older run after them).
                torn_from = torn_from or (end, number)
                end += len(line)
                continue
            if torn_from is not None:  # an unparsable line before a good one was never ours
                raise _not_output(path, torn_from[1])
            try:
                ids.add(key(record["id"]))
            except (KeyError, TypeError):
                raise _not_output(path, number) from None
            end += len(line)
    good = torn_from[0] if torn_from is not None else end
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids


def _not_output(path: pathlib.Path, number: int) -> JaxgenError:
    return JaxgenError(f"{path}:{number}: not an output line of jaxgen generate")
