"""Offline generation from a JSONL file of prompts, resumable and crash-safe.

Input lines: `{"id": ..., "prompt": "text" | [token ids], ...per-line option overrides}`,
or `"messages": [{"role", "content"}, ...]` instead of "prompt": a conversation rendered
by the model's chat format (`LanguageModel.chat_prompt`) for the next assistant turn.
Output lines: `{"id", "prompt" | "messages", "completions": [...], "finish_reasons": [...],
"scores": [...], "finish_reason", "tokens"}` where completions are post-processed (strip,
min_length, banned_words, deduplicate from the `generate` config) and `finish_reasons` and
`scores` (`GenerationResult.scores`: beam scores, or sampled log-probabilities) are those of
the completions kept; `finish_reason` is the first (best) returned sequence's, `tokens`
counts generated tokens of all returned sequences.

Bad lines: the input is read a line at a time as bytes (data/lines.py), and each line is
checked before any decoding: invalid UTF-8 or JSON, a NUL byte, a line over 8 MiB, wrong
types, a missing field, a duplicate id, an unknown or invalid option, an empty prompt, a
prompt that does not fit `max_len` (unless `truncate_prompt`). A bad line, or one whose
generation fails, is reported as `file:line: why` and skipped (listed in the summary and in
`<output>.errors.jsonl` as {"line", "id", "error"}), or stops the run with `strict`. So
every non-blank input line ends as one output line or one errors-file entry; the errors
file is rewritten by each run, as the bad lines are found again.

Memory: the input is read in windows of `window_records` records (at least 4 batches);
each window is grouped, decoded and written before the next is read, so peak memory does
not grow with the file: what does is 8 bytes per id (line_ids.py) and the "file:line: why"
of each bad line. Output follows the input window by window (in a window, lines of one
option group together, in input order).

Resuming: ids already in the output are skipped. Each batch is appended, flushed and
fsynced, so a kill loses at most the batch in flight; a torn last line (killed while
writing) is cut off on restart. Sampling keys come from (seed, line id, sample index), so
a resumed run writes what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator

from rich.progress import MofNCompleteColumn, TextColumn, TimeRemainingColumn

from jaxgen.config import GenerateConfig
from jaxgen.data import lines
from jaxgen.data.chat import check_messages
from jaxgen.decode import request
from jaxgen.errors import JaxgenError
from jaxgen.inference.line_ids import IdSet, done_ids, key
from jaxgen.metrics import progress_bar

_RECORD_KEYS = ("id", "prompt", "messages")  # every other key is a generate option
_LOCATION = ("_line", "_number")  # where a record came from ("file:line", line number)
# Options each row of a continuously refilled batch may set for itself.
_PER_ROW = ("max_new_tokens",)
# Records read, grouped and decoded at a time: enough rows to keep continuous refill busy
# (a window ends with its batch draining), few enough that memory is a window's, not a file's.
WINDOW_RECORDS = 4096
_RESOLVED = 1024  # distinct per-line option sets resolved before the cache starts afresh


@dataclasses.dataclass
class Summary:
    written: int = 0
    skipped: int = 0  # already in the output
    tokens: int = 0
    seconds: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)  # "file:line: why" of each bad line


def errors_path(output_path) -> pathlib.Path:
    """Where a run lists the input lines it skipped: `<output>.errors.jsonl`."""
    output_path = pathlib.Path(output_path)
    return output_path.with_name(output_path.name + ".errors.jsonl")


class BadLines:
    """Where bad lines go: raised (strict), or kept in `failures` and the errors file."""

    def __init__(self, path: pathlib.Path, failures: list[str], strict: bool):
        self._path, self._failures, self._strict = path, failures, strict
        self._file = None
        path.unlink(missing_ok=True)  # a run finds the input's bad lines again: list them afresh

    def add(self, where: str, number: int, record_id, problem: str) -> None:
        if self._strict:
            raise JaxgenError(f"{where}: {problem}")
        self._failures.append(f"{where}: {problem}")
        if self._file is None:
            self._file = open(self._path, "w", encoding="utf-8")  # noqa: SIM115 (closed by `close`)
        entry = {"line": number, "id": record_id, "error": problem}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()

    def record(self, record: dict, problem: str) -> None:
        self.add(record["_line"], record["_number"], record["id"], problem)

    def close(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()


def read_prompts(
    path: pathlib.Path, bad: BadLines, check: Callable[[dict], str | None] | None = None
) -> Iterator[dict]:
    """Valid records of `path` (with their location), read as they are asked for; a bad
    line goes to `bad`.

    `check(record)`, when given, says why an otherwise valid record is bad (or None), so
    bad lines are reported in file order whatever found them.
    """
    if not path.is_file():  # here, not at the first record: before any output is opened
        raise JaxgenError(f"{path}: cannot read prompts (no such file)")
    return _records(path, bad, check)


def _records(path: pathlib.Path, bad: BadLines, check) -> Iterator[dict]:
    seen = IdSet()
    options = set(GenerateConfig.model_fields)
    for line in lines.read_jsonl(path):
        record = line.record
        problem = line.problem or _check_record(record, seen, options)
        if not problem and check is not None:
            problem = check(record)
        if problem:
            record_id = record.get("id") if isinstance(record, dict) else None
            bad.add(line.where, line.number, record_id if _valid_id(record_id) else None, problem)
            continue
        seen.add(key(record["id"]))
        yield record | {"_line": line.where, "_number": line.number}


def _valid_id(record_id) -> bool:
    return isinstance(record_id, str | int) and not isinstance(record_id, bool)


def _check_record(record, seen: IdSet, options: set) -> str | None:
    if not isinstance(record, dict) or "id" not in record or ("prompt" in record) == ("messages" in record):
        return 'expected an object with "id" and "prompt" (or "messages", not both)'
    if not _valid_id(record["id"]):
        return "id must be a string or an integer"
    if key(record["id"]) in seen:
        return f"duplicate id {record['id']!r}"
    if "messages" in record:
        try:
            check_messages(record["messages"], "messages")
        except JaxgenError as e:
            return str(e)
    prompt = record.get("prompt", "")
    if not isinstance(prompt, str) and not (
        isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return "prompt must be a string or a list of token ids"
    if "prompt" in record and not prompt:
        return "empty prompt"
    unknown = set(record) - set(_RECORD_KEYS) - options
    if unknown:
        return f"unknown option {sorted(unknown)[0]!r}"
    return None


def _check_prompt(lm, record: dict, options: dict, chat: bool, requests: dict) -> str | None:
    """Why the record cannot be generated (an invalid option, a prompt that does not fit), or
    None: checked before decoding, so only good lines reach a continuously refilled group."""
    overrides = _overrides(record)
    options_key = json.dumps(overrides, sort_keys=True)
    if options_key not in requests:  # resolved once per distinct set of per-line options
        if len(requests) >= _RESOLVED:  # lines that each set a seed must not grow it per line
            requests.clear()
        try:
            requests[options_key] = lm.resolve(**(options | overrides))
        except JaxgenError as e:
            requests[options_key] = e
    req = requests[options_key]
    if isinstance(req, JaxgenError):
        return str(req)
    try:
        ids = lm.encode_prompt(_prompt(lm, record, chat), req.options, "prompt")
        new = request.new_tokens(req, [ids])
        request.fit_prompt(lm.config.model, ids, new, req.options, "prompt")
    except JaxgenError as e:
        return str(e)
    return None


def _overrides(record: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The record's per-line generate options (but those in `ignore`)."""
    return {k: v for k, v in record.items() if k not in (*_RECORD_KEYS, *_LOCATION, *ignore)}


def postprocess(texts: list, opts: GenerateConfig) -> list:
    """Applies the config's filters to completions (token-id completions pass unchanged)."""
    return [text for _, text in _kept(texts, opts)]


def _kept(texts: list, opts: GenerateConfig) -> list[tuple[int, object]]:
    """(index, post-processed completion) of each completion the config's filters keep."""
    out: list[tuple[int, object]] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            out.append((i, text))
            continue
        if opts.strip:
            text = text.strip()
        if len(text) < opts.min_length or any(w in text for w in opts.banned_words):
            continue
        if opts.deduplicate and any(text == kept for _, kept in out):
            continue
        out.append((i, text))
    return out


def _option_groups(records: list[dict], ignore: tuple[str, ...] = ()) -> list[list[dict]]:
    """Records sharing option overrides (but those in `ignore`), in input order."""
    by_options: dict[str, list[dict]] = {}
    for r in records:
        overrides = _overrides(r, ignore)
        by_options.setdefault(json.dumps(overrides, sort_keys=True), []).append(r)
    return list(by_options.values())


def _groups(records: list[dict], batch_size: int) -> list[list[dict]]:
    """Batches of records sharing option overrides, sorted by prompt length within a group."""
    batches = []
    for group in _option_groups(records):
        group = sorted(group, key=_size)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def _size(record: dict) -> int:
    """A record's prompt length in characters (or token ids), for batching similar lengths."""
    if "messages" in record:
        return sum(len(m["content"]) for m in record["messages"])
    return len(record["prompt"])


def _prompt(lm, record: dict, chat: bool):
    """The record's prompt for `generate`: a rendered conversation, or the prompt as given."""
    if "messages" in record:
        return lm.chat_prompt(record["messages"])
    if chat and isinstance(record["prompt"], str):  # chat mode: a text prompt is one user turn
        return lm.chat_prompt([{"role": "user", "content": record["prompt"]}])
    return record["prompt"]


def _generate(lm, batch: list[dict], options: dict, bad: BadLines, chat: bool = False):
    """(record, result) pairs; a batch failing on user input is retried line by line."""
    kw = options | _overrides(batch[0])
    try:
        prompts = [_prompt(lm, r, chat) for r in batch]
        results = lm.generate(prompts, row_ids=[r["id"] for r in batch], **kw)
        return list(zip(batch, results, strict=True))
    except JaxgenError as e:
        if len(batch) == 1:
            bad.record(batch[0], str(e))
            return []
    return [pair for r in batch for pair in _generate(lm, [r], options, bad, chat)]


def _refilled(lm, group: list[dict], written: list[dict], options: dict, chat: bool):
    """(record, result) pairs of one option group in input order, decoded with continuous
    refill (`LanguageModel.generate_each`) in rows sized for `written` too (the group's
    records of the window already in the output); None when a record fails before
    decoding starts (the caller then decodes the group in batches, which isolates the bad
    line)."""
    overrides = _overrides(group[0], _PER_ROW)
    default = options.get("max_new_tokens", lm.config.generate.max_new_tokens)
    limits = [r.get("max_new_tokens", default) for r in group]
    try:
        prompts = [_prompt(lm, r, chat) for r in group]
        sized_for = (
            [_prompt(lm, r, chat) for r in written],
            [r.get("max_new_tokens", default) for r in written],
        )
        results = lm.generate_each(
            prompts,
            row_ids=[r["id"] for r in group],
            limits=limits,
            sized_for=sized_for,
            **(options | overrides),
        )
        first = next(results, None)
    except JaxgenError:
        return None

    def in_order():
        ready, upto = {}, 0
        for i, result in itertools.chain([first] if first is not None else [], results):
            ready[i] = result
            while upto in ready:  # lines go to disk in input order, as soon as they can
                yield group[upto], ready.pop(upto)
                upto += 1

    return in_order()


def _written_chunks(lm, groups, options, opts: GenerateConfig, bad: BadLines, chat):
    """Lists of (record, result) to write: up to `batch_size` lines of a continuously refilled
    group at a time, in input order, or one static batch of a group that needs batches.

    `groups`: one window's (pending, written) records per option group. A refilled group
    decodes in the shapes its whole window group gives (rows, prompt and output widths):
    a resumed run's rows then sum in the same order as the uninterrupted run's, and write
    the same bits (XLA's reductions over a cache or batch of another size round
    differently)."""
    for group, written in groups:
        stream = _refilled(lm, group, written, options, chat)
        if stream is None:
            for batch in _groups(group, opts.batch_size):
                yield _generate(lm, batch, options, bad, chat)
            continue
        chunk = []
        for pair in stream:
            chunk.append(pair)
            if len(chunk) >= opts.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _line(record: dict, result, opts: GenerateConfig) -> str:
    completions = result.texts if result.texts is not None else result.completions
    given = "messages" if "messages" in record else "prompt"
    kept = _kept(list(completions), opts)
    out = {
        "id": record["id"],
        given: record[given],
        "completions": [text for _, text in kept],
        "finish_reasons": [result.finish_reasons[i] for i, _ in kept],
        "finish_reason": result.finish_reason,
        "tokens": sum(len(c) for c in result.completions),
    }
    if result.scores is not None:  # aligned with the completions kept, as finish_reasons
        out["scores"] = [result.scores[i] for i, _ in kept]
    return json.dumps(out, ensure_ascii=False) + "\n"


def run(lm, input_path, output_path, options: dict | None = None, *, progress: bool = True,
        on_batch: Callable[[int], None] | None = None, chat: bool = False,
        strict: bool = False, window: int = WINDOW_RECORDS) -> Summary:  # fmt: skip
    """Generates for every not-yet-written line of `input_path` into `output_path`.

    Args:
        lm: a `LanguageModel`.
        options: generate options over the run config's defaults (per-line keys win).
        chat: a text "prompt" is one user message, rendered as "messages" lines are.
        on_batch: called with the number of batches written so far (progress hooks, tests).
        strict: a bad line stops the run (JaxgenError naming file:line) instead of being
            skipped into `Summary.failures` and `errors_path(output_path)`.
        window: records read and decoded at a time (at least 4 batches): memory holds this
            many records whatever the input's size.
    """
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    summary = Summary()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    opts = lm.resolve(**options).options  # validates the shared options before any work
    output_path.parent.mkdir(parents=True, exist_ok=True)
    bad = BadLines(errors_path(output_path), summary.failures, strict)
    try:
        windows = _pending(
            lm, input_path, output_path, options, chat, bad, summary, max(window, 4 * opts.batch_size)
        )
        chunks = (
            chunk for groups in windows for chunk in _written_chunks(lm, groups, options, opts, bad, chat)
        )
        total = _count_lines(input_path) if progress else None
        _write(chunks, output_path, opts, summary, progress, on_batch, total)
    finally:
        bad.close()
    return summary


def _pending(lm, input_path, output_path, options: dict, chat: bool, bad: BadLines, summary,
             size: int) -> Iterator[list[tuple[list[dict], list[dict]]]]:  # fmt: skip
    """Windows of the input's good records, each read when asked for, as (not yet in the
    output, already written) per option group (the written counted in `summary.skipped`);
    the bad ones go to `bad`.

    Windows are cut and grouped over all good records, written or not, so a resumed run
    groups the rest of a window as the uninterrupted run did and writes the same file.
    """
    done = done_ids(output_path)
    requests: dict = {}

    def check(record: dict) -> str | None:  # lines already written were good
        return None if key(record["id"]) in done else _check_prompt(lm, record, options, chat, requests)

    records = read_prompts(input_path, bad, check)  # a missing input stops here, before any output
    return _not_done(records, done, size, summary)


def _not_done(records: Iterator[dict], done: IdSet, size: int, summary: Summary):
    """Per window, (records not yet written, records written) of each option group that
    has any not yet written."""
    for window in _windows(records, size):
        # Group order comes from the whole window, so a group whose lines are all written
        # does not let a later group overtake the rest of an earlier one.
        groups = []
        for group in _option_groups(window, ignore=_PER_ROW):
            pending = [r for r in group if key(r["id"]) not in done]
            summary.skipped += len(group) - len(pending)
            if pending:
                groups.append((pending, [r for r in group if key(r["id"]) in done]))
        if groups:
            yield groups


def _windows(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of `size` records (the last shorter), each read only when asked for."""
    records = iter(records)
    while window := list(itertools.islice(records, size)):
        yield window


def _count_lines(path: pathlib.Path) -> int:
    """Non-blank lines of `path` (each ends as an output line or a bad line): the bar's total."""
    return sum(1 for _, raw in lines.raw_lines(path) if raw is None or raw.strip())


def _write(chunks, output_path, opts, summary: Summary, progress: bool, on_batch, total: int | None) -> None:
    """Writes each chunk of (record, result) pairs to the output, flushed and fsynced."""
    start = time.perf_counter()
    figures = (MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    bar = progress_bar("generate", *figures, enabled=progress)
    task = bar.add_task("generate", total=total, rate="")
    with open(output_path, "a", encoding="utf-8") as out, bar:
        for n, pairs in enumerate(chunks, 1):
            out.write("".join(_line(r, res, opts) for r, res in pairs))
            out.flush()
            os.fsync(out.fileno())  # a line counts as done only once it is on disk
            summary.written += len(pairs)
            summary.tokens += sum(sum(len(c) for c in res.completions) for _, res in pairs)
            seconds = time.perf_counter() - start
            rate = f"{summary.written / seconds:.1f} prompts/s  {summary.tokens / seconds:.0f} tokens/s"
            handled = summary.skipped + summary.written + len(summary.failures)
            bar.update(task, completed=handled, rate=rate)
            if on_batch is not None:
                on_batch(n)
    summary.seconds = time.perf_counter() - start
