"""Where a run directory lives: a local path, or a URL such as `gs://bucket/run`.

Local run directories stay `pathlib.Path`s and behave exactly as they always did. A URL
becomes an `etils.epath.Path`, the path type orbax checkpoints through, so one run directory
is reached by one file layer: epath opens `gs://` objects through fsspec's gcsfs (installed
by the `gcs` extra, which the `tpu` extra includes), orbax writes arrays there with
TensorStore's own GCS driver. A pod then needs no gcsfuse mount.

An object store differs from a disk where the callers here care: an object is written whole
or not at all (no temp file + rename needed, and nothing can be appended), a "directory" is
a name prefix (renaming one copies every object under it), and there are no symlinks.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

from etils import epath

RunPath = pathlib.Path | epath.Path

# `scheme://`: what separates a URL from a local path (a Windows drive letter has no `//`).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names objects in a store (`gs://...`) rather than a local file."""
    return not isinstance(path, pathlib.Path) and bool(_URL.match(str(path)))


def run_path(where: str | os.PathLike) -> RunPath:
    """`gs://bucket/run` (any `scheme://`) -> epath.Path; anything else -> pathlib.Path."""
    if isinstance(where, pathlib.Path | epath.Path):
        return where
    return epath.Path(str(where)) if is_url(where) else pathlib.Path(where)


def write_whole(path: RunPath, text: str) -> None:
    """Writes `path` so that a reader sees the old content or the new, never a part.

    Locally through a temp file and a rename; an object store's write is already whole.
    """
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def remove(path: RunPath) -> None:
    """Removes a file, link or directory tree at `path` (nothing when there is none)."""
    if is_url(path):
        if path.is_dir():
            path.rmtree()
        elif path.exists():
            path.unlink()
    elif path.is_symlink() or path.is_file():
        path.unlink()  # a link itself, never what it points to
    elif path.is_dir():
        shutil.rmtree(path)


def move(source: RunPath, target: RunPath) -> None:
    """Moves a file or directory; on an object store this copies then deletes every object."""
    if is_url(source):
        source.rename(target)
    else:
        os.replace(source, target)
