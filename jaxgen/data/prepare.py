"""`jaxgen data prepare`: tokenize the configured sources into a TFDS array_record dataset.

Layout under `<data_dir>/<data.name>/`: `tokenizer.model` (when trained here) and
`jaxgen_tokens/1.0.0/` (a TFDS dataset: shards, dataset_info.json, features.json,
metadata.json with our fingerprint and per-split statistics).

Pretraining splits hold one token stream `eos d1 eos d2 eos ...` in CHUNK_TOKENS
records (the leading eos makes the first document's first token a target too, so
every character of the split is predicted once). SFT splits hold one record per
example: `tokens` (bos, prompt, response, eos) and `loss_mask` (1 on response and eos).
Preference splits hold one record per pair: both sequences back to back, with `loss_mask`
and `pair` (1 chosen, 2 rejected); see data/preference.py.

Re-running on unchanged inputs is a no-op: the fingerprint covers input contents
(size + mtime as a shortcut, sha256 otherwise), the tokenizer file and the config
fields that change the records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator

import numpy as np
from rich.progress import DownloadColumn, TextColumn, TransferSpeedColumn

from jaxgen.data import builder, documents, sources
from jaxgen.data.catalog import catalog_digest
from jaxgen.data.documents import Counts
from jaxgen.data.encode import encode_all
from jaxgen.data.preference import write_preference
from jaxgen.data.sft import write_sft
from jaxgen.data.tokenizer_training import (
    tokenizer_dir,
    tokenizer_fingerprint,
    tokenizer_path,
    tokenizer_up_to_date,
    train_tokenizer,
)
from jaxgen.errors import JaxgenError
from jaxgen.metrics import progress_bar
from jaxgen.tokenizer import load_tokenizer

FORMAT_VERSION = 2  # 2: sft splits count the characters of trained parts only
_ENCODE_CHARS = 1 << 18  # text per encode_batch call: large enough to amortise the call
_PARALLEL_BYTES = 16 << 20  # below this, starting worker processes costs more than it saves
# Fields that only steer the input pipeline: changing them must not rebuild the dataset.
_PIPELINE_FIELDS = {
    "name",
    "data_dir",
    "shuffle_seed",
    "num_epochs",
    "worker_count",
    "read_threads",
    "prefetch",
    # Only decides whether a bad line stops prepare: a dataset written under `skip` holds the
    # same records as one under `strict` would, and its stored counts say what was skipped.
    "bad_lines",
}


# Formats written one record per example (or pair), each a prepared dataset `kind` of its own.
_RECORD_FORMATS = {"sft": write_sft, "preference": write_preference}

# The running counts of a split are also its final record (one definition of the fields).
SplitStats = Counts


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    tokenizer_path: pathlib.Path
    dataset_dir: pathlib.Path
    splits: dict[str, SplitStats]
    kind: str  # "pretrain", "sft" or "preference"
    rebuilt: bool  # False when prepare found everything up to date


def dataset_dir(config) -> pathlib.Path:
    return tokenizer_dir(config) / builder.DATASET_NAME / builder.VERSION


def read_metadata(config) -> dict | None:
    """The prepared dataset's metadata.json, or None when there is none."""
    path = dataset_dir(config) / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def split_stats(config, split: str) -> SplitStats:
    """Statistics of a prepared split, read back from the dataset's metadata."""
    meta = read_metadata(config)
    if meta is None:
        raise JaxgenError(f"{dataset_dir(config)}: no prepared dataset (run `jaxgen data prepare`)")
    if split not in meta["splits"]:
        raise JaxgenError(f"{dataset_dir(config)}: no split {split!r} (has {sorted(meta['splits'])})")
    return SplitStats(**meta["splits"][split])


def _info(config, meta: dict, rebuilt: bool) -> DatasetInfo:
    splits = {name: SplitStats(**s) for name, s in meta["splits"].items()}
    return DatasetInfo(pathlib.Path(meta["tokenizer"]), dataset_dir(config), splits, meta["kind"], rebuilt)


# ----------------------------------------------------------------------------- prepare


def prepare(config, *, progress: bool = True) -> DatasetInfo:
    """Makes sure the tokenizer and the prepared dataset exist and match the inputs.

    Trains the tokenizer first when `tokenizer.path` is None and the trained one is
    missing or stale. Prints what it does when `progress` is True.

    Raises:
        JaxgenError: bad sources (missing/empty files, empty globs, bad UTF-8 when strict,
            malformed JSONL), an unusable tokenizer, or a split without any text.
    """
    say = print if progress else (lambda *a, **k: None)
    data = config.data
    if not data.train_files:
        raise JaxgenError("data.train_files: no training files configured")
    old = read_metadata(config) or {}
    scans = _scan(config, old.get("files", {}))
    tok_path = ensure_tokenizer(config, say, scans)
    tok_sha = _tokenizer_digest(tok_path)
    fingerprint = _fingerprint(config, scans, tok_sha)
    if old.get("fingerprint") == fingerprint and dataset_dir(config).is_dir():
        info = _info(config, old, rebuilt=False)
        for s in info.splits.values():
            if s.bad_at and data.bad_lines == "strict":  # written under `skip`: stop as strict would have
                raise JaxgenError(s.bad_at[0])
        say(f"dataset {dataset_dir(config)} is up to date")
        for name, s in info.splits.items():
            _report_bad_lines(name, s, say)
        return info

    say(f"preparing {dataset_dir(config)} ...")
    tokenizer = load_tokenizer(tok_path)
    kind = data.format if data.format in _RECORD_FORMATS else "pretrain"
    final = dataset_dir(config)
    tmp = final.with_name(f".{final.name}.tmp-{builder.unique_suffix()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        infos, stats = _write_splits(config, tokenizer, scans, tmp, kind, progress)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "kind": kind,
            "chunk_tokens": builder.CHUNK_TOKENS,
            "seq_len": config.train.seq_len,
            "tokenizer": str(tok_path),
            "tokenizer_sha256": tok_sha,
            "files": {path: dataclasses.asdict(scan) for path, scan in scans.items()},
            "splits": {name: dataclasses.asdict(s) for name, s in stats.items()},
        }
        builder.write_metadata(tmp, kind, infos, meta)
        builder.replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, s in stats.items():
        say(f"  {name}: {s.examples:,} examples, {s.tokens:,} tokens, {s.chars:,} chars")
        _report_problems(name, s, say, kind)
        _report_bad_lines(name, s, say)
    return _info(config, meta, rebuilt=True)


def bad_lines(info: DatasetInfo) -> int:
    """JSONL lines skipped as bad over all splits of a prepared dataset."""
    return sum(s.bad_lines for s in info.splits.values())


def _report_bad_lines(name: str, s: SplitStats, say) -> None:
    if not s.bad_lines:
        return
    say(f"  {name}: {s.bad_lines:,} bad lines skipped (data.bad_lines: skip)")
    for where in s.bad_at:
        say(f"  {name}: skipped {where}")
    if s.bad_lines > len(s.bad_at):
        say(f"  {name}: ... and {s.bad_lines - len(s.bad_at):,} more")


def _report_problems(name: str, s: SplitStats, say, kind: str) -> None:
    if s.replaced_chars:
        say(f"  {name}: {s.replaced_chars:,} invalid UTF-8 sequences replaced by U+FFFD")
    if kind == "preference":
        if s.truncated:
            how = "prompts truncated from the left (data.overlong)"
            say(f"  {name}: {s.truncated:,} pairs longer than seq_len + 2 tokens: {how}")
        if s.dropped:
            say(f"  {name}: {s.dropped:,} pairs dropped (too long per data.overlong, or nothing to train on)")
        if s.identical:
            say(f"  {name}: {s.identical:,} pairs dropped: chosen and rejected are the same")
        for where in s.dropped_at:
            say(f"  {name}: dropped {where}")
        return
    if s.truncated:
        say(f"  {name}: {s.truncated:,} records longer than seq_len + 1 tokens truncated (data.overlong)")
    if s.dropped:
        say(f"  {name}: {s.dropped:,} records dropped (too long per data.overlong, or nothing to train on)")


def _scan(config, known: dict) -> dict[str, sources.FileScan]:
    data = config.data
    out = {}
    for key in ("train_files", "validation_files"):
        for path in sources.resolve_files(getattr(data, key), f"data.{key}"):
            out[str(path)] = sources.scan_file(path, sources.strict_blocks(data), known.get(str(path)))
    return out


def ensure_tokenizer(config, say=print, scans: dict | None = None) -> pathlib.Path:
    """The config's tokenizer file: `tokenizer.path`, or the trained one (retrained when stale)."""
    if config.tokenizer.path is not None:
        path = tokenizer_path(config)
        if not path.exists():
            raise JaxgenError(f"tokenizer.path: {path} not found")
        return path
    if scans is None:
        scans = _scan(config, (read_metadata(config) or {}).get("files", {}))
    digests = {p: scans[p].sha256 for p in map(str, sources.resolve_files(config.data.train_files, "-"))}
    for pattern in filter(sources.is_tfds, config.data.train_files):
        digests[pattern] = catalog_digest(config, pattern)
    fingerprint = tokenizer_fingerprint(config, digests)
    if tokenizer_up_to_date(config, fingerprint):
        return tokenizer_path(config)
    say(f"training tokenizer {tokenizer_path(config)} ...")
    return train_tokenizer(config, fingerprint=fingerprint)


def _tokenizer_digest(path: pathlib.Path) -> str:
    """sha256 of a tokenizer file, or of the files of a tokenizer directory (Hugging Face)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _fingerprint(config, scans: dict, tokenizer_sha: str) -> str:
    data = config.data.model_dump(mode="json", exclude=_PIPELINE_FIELDS)
    blob = {
        "version": FORMAT_VERSION,
        "chunk": builder.CHUNK_TOKENS,
        "data": data,
        "files": {p: s.sha256 for p, s in scans.items()},
        "tokenizer": tokenizer_sha,
        "seq_len": config.train.seq_len if config.data.format in _RECORD_FORMATS else None,
    }
    for pattern in filter(sources.is_tfds, (*config.data.train_files, *config.data.validation_files)):
        blob[pattern] = catalog_digest(config, pattern)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- splits


@dataclasses.dataclass
class _SplitSource:
    name: str
    files: list[pathlib.Path]
    lo: int
    hi: int
    catalog: list[str]
    default_split: str


def _split_sources(config, scans: dict) -> list[_SplitSource]:
    """Train and (optionally) validation: explicit files, or the tail fraction of the train units."""
    data = config.data
    unit = "chars" if data.format == "text" else "records"
    train_files = sources.resolve_files(data.train_files, "data.train_files")
    total = sum(getattr(scans[str(p)], unit) for p in train_files)
    train_catalog = [p for p in data.train_files if sources.is_tfds(p)]
    if data.validation_files:
        val_files = sources.resolve_files(data.validation_files, "data.validation_files")
        val_catalog = [p for p in data.validation_files if sources.is_tfds(p)]
        return [
            _SplitSource("train", train_files, 0, total, train_catalog, "train"),
            _SplitSource(
                "validation",
                val_files,
                0,
                sum(getattr(scans[str(p)], unit) for p in val_files),
                val_catalog,
                "validation",
            ),
        ]
    if data.validation_fraction == 0 or total == 0:
        return [_SplitSource("train", train_files, 0, total, train_catalog, "train")]
    cut = int(total * (1.0 - data.validation_fraction))  # nanoGPT: data[:int(n * 0.9)]
    return [
        _SplitSource("train", train_files, 0, cut, train_catalog, "train"),
        _SplitSource("validation", train_files, cut, total, [], "validation"),
    ]


def _write_splits(config, tokenizer, scans: dict, tmp: pathlib.Path, kind: str, progress: bool):

    # Import TFDS before rich's refresh thread starts: TFDS swaps `__import__` for a lazy
    # importer while it loads, and rich's thread importing `.markup` then would fail.
    spec = builder.features(kind)
    sources = _split_sources(config, scans)
    total_bytes = sum(scans[str(p)].size for source in sources for p in source.files)
    figures = (DownloadColumn(), TransferSpeedColumn(), TextColumn("{task.fields[tokens]:,} tokens"))
    infos, stats = [], {}
    with progress_bar("{task.description}", *figures, enabled=progress) as bar:
        task = bar.add_task("tokenizing", total=total_bytes or None, tokens=0)
        for source in sources:
            counts = Counts()

            def advance(n: int, counts=counts) -> None:
                bar.update(task, advance=n, tokens=counts.tokens)

            writer = builder.SplitWriter(tmp, source.name, spec)
            write = _RECORD_FORMATS.get(kind, _write_pretrain)
            info = write(config, tokenizer, source, writer, counts, advance)
            if counts.tokens == 0 or counts.examples == 0:
                bad = (
                    f"; {counts.bad_lines:,} bad lines skipped, the first {counts.bad_at[0]}"
                    if counts.bad_at
                    else ""
                )
                raise JaxgenError(
                    f"data: the {source.name} split has no text to train on ({_describe(source)}{bad})"
                )
            infos.append(info)
            stats[source.name] = counts
    return infos, stats


def _describe(source: _SplitSource) -> str:
    names = [str(p) for p in source.files] + source.catalog
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _pretrain_segments(config, source: _SplitSource, counts: Counts, advance) -> Iterator[documents.Segment]:
    fn = documents.text_segments if config.data.format == "text" else documents.jsonl_segments
    yield from fn(source.files, config.data, source.lo, source.hi, counts, advance)
    yield from documents.catalog_segments(config, source.catalog, source.default_split)


def _write_pretrain(config, tokenizer, source: _SplitSource, writer, counts: Counts, advance):
    tok_path = tokenizer_path(config)
    eos = tokenizer.eos_id
    if eos is None:
        raise JaxgenError(f"{tokenizer.path}: the tokenizer has no eos piece (tokenizer.eos_id)")
    stream = builder.StreamWriter(writer)
    stream.extend(np.array([eos], np.int32))
    batches = _batches(_pretrain_segments(config, source, counts, advance))
    for flat, chars, nbytes, docs in encode_all(tokenizer, tok_path, batches, _workers(config, source)):
        stream.extend(flat)
        counts.examples += docs
        counts.chars += chars
        counts.bytes += nbytes
        counts.tokens = stream.tokens
    return stream.finish()


def _workers(config, source: _SplitSource) -> int:
    text = config.data.format == "text"  # then the source's range is in characters, ~bytes
    size = source.hi - source.lo if text else sum(p.stat().st_size for p in source.files)
    return tokenizing_workers(config, size)


def tokenizing_workers(config, nbytes: int) -> int:
    """Processes that tokenize `nbytes` of input: `data.prepare_workers`, or by size."""
    if config.data.prepare_workers:
        return config.data.prepare_workers
    if config.tokenizer.kind == "char":
        # One id per character: shipping ids between processes costs more than encoding
        # them (200 MB bench: 4.6-5.9 MB per CPU-second with 2 workers, 6.9 in-process).
        return 1
    return min(os.cpu_count() or 1, 8) if nbytes > _PARALLEL_BYTES else 1


def _batches(segments: Iterable[documents.Segment]) -> Iterator[list[documents.Segment]]:
    batch, size = [], 0
    for seg in segments:
        batch.append(seg)
        size += len(seg[0])
        if size >= _ENCODE_CHARS or len(batch) >= 16384:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
