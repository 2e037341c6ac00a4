"""Atomic writes: build the output at a temporary sibling path, rename it into place only when complete.

A crash, a full disk or a bad input then leaves either the old output or nothing, never half of a new one.
`os.replace` is atomic within one filesystem, which a sibling path guarantees.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _temp_sibling(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{kind}-"
    if kind == "dir":
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `path` when the block exits without an error.

    With `overwrite` an existing `path` is replaced (removed just before the rename); without it an existing
    `path` is an error raised before any work is done.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    tmp = _temp_sibling(path, "dir")
    try:
        yield tmp
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; it replaces `path` when the block exits cleanly."""
    path = Path(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (not created) for a writer that insists on opening the file itself."""
    path = Path(path)
    tmp = _temp_sibling(path, "tmp")
    tmp.unlink()
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
