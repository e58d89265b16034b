"""Atomic writes: every file and folder sdlora writes appears whole under its name or not at all.

Each writer gets a fresh hidden name beside the target (`.NAME.<uuid>.tmp`, on the same file system, so
the final rename is atomic), writes there, and renames on success; on any failure, Ctrl-C included, the
temporary is removed and whatever stood under the target before is left as it was. Fresh names are opened
exclusively, not made by mkstemp/mkdtemp, whose 0600/0700 modes would outlive the rename: results get the
permissions the user's umask gives any new file. Listings (datasets, the library) skip hidden names, so a
temporary that a killed process leaves behind is never offered as a result.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path` (not yet created) for a writer that takes a file name;
    rename it over `path` when the block ends without error (replacing an existing file). The file gets
    the mode any new file gets (0666 less the umask): some writers (safetensors) create theirs 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the cleanup's own failure (a read-only folder) must not hide the error that matters
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator:
    """Yield a binary file opened exclusively beside `path`; closed and renamed over `path` on success."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        yield f


@contextmanager
def atomic_folder(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh empty folder beside `path`; on success it becomes `path`. An existing `path` is an
    error unless it is an empty folder, or `replace` is set: then the old folder is moved aside first and
    deleted only once the new one is in place (a crash in between leaves one of them whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            if replace:
                old = _temporary_beside(path)
                os.replace(path, old)
            else:
                path.rmdir()  # only an empty folder may be taken over; anything else raises here
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_temporary(path: Path) -> bool:
    """A name this module gives its temporaries, or any hidden name: listings leave them out."""
    return path.name.startswith(".")
