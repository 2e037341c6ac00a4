"""Atomic publishing, the one implementation: write the output under a temporary sibling name, rename it into
place only when complete. A crash, a full disk or a bad input then leaves the old output (or nothing), never
half of a new one. `os.replace` is atomic within one filesystem, which a sibling path guarantees.

Standard library only, at the bottom of the package beside config.py, so every layer (model/, data/, ckpt/,
train/, eval/, bench/) publishes through it:
- `atomic_path(path)`: a temporary sibling for a writer that opens the file itself (torch.save, savefig, ...);
- `write_text_atomic(path, text)`: the common case of a small text or JSON file;
- `atomic_dir(path)`: a temporary sibling folder that becomes `path`;
- `publish_dir(tmp, final)`: the rename step alone, for a folder whose temporary name several processes
  agreed on (model/checkpoint.py: every rank writes into it, rank 0 publishes).

Files are fsynced before their rename and the parent folder after it, so a power loss cannot publish a name
pointing at unwritten data. A folder replacing an older one is swapped in two renames (old aside, new in): a
crash between them leaves the old folder under `.<name>.old-*` and no `<name>`; nothing is ever half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (not created) to write; it replaces `path` when the block exits cleanly.

    On an error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        if tmp.is_file():
            fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` by a file holding `text` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`, its sibling; an older `final` is moved aside, then removed."""
    fsync_path(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        _remove(old)


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder that becomes `path` when the block exits without an error.

    With `overwrite` an existing `path` is replaced (`publish_dir`); without it an existing `path` is an error
    raised before any work is done. On an error the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        publish_dir(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)
