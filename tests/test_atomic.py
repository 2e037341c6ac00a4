"""questa_nemo/atomic.py, the one atomic-publish helper: a failed or killed writer leaves the old output whole
and nothing half-written under the published name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from questa_nemo.atomic import atomic_dir, atomic_path, publish_dir, write_text_atomic


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "gone.txt").write_text("old")
        assert not out.exists()  # nothing published until the block ends
    with pytest.raises(FileExistsError):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert _tree(out) == {"a.txt": "new"}  # no file of the old folder survives
    assert _hidden(tmp_path) == []


def test_a_failing_writer_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert _tree(out) == {"a.txt": "old"}
    file = tmp_path / "f.json"
    write_text_atomic(file, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(file) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert file.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_atomic_path_creates_the_parent_and_takes_a_writer_that_opens_the_file(tmp_path):
    target = tmp_path / "deep" / "er" / "x.bin"
    with atomic_path(target) as tmp:
        assert not tmp.exists() and tmp.parent == target.parent
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _hidden(target.parent) == []


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from questa_nemo.atomic import atomic_dir, atomic_path

    kind, out, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if kind == "dir":
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            ready.write_text("writing")
            time.sleep(60)
    else:
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            ready.write_text("writing")
            time.sleep(60)
    """
)


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_writer_leaves_the_old_output(tmp_path, kind):
    """SIGKILL mid-write (no cleanup runs): the published name still holds the old output, whole."""
    out = tmp_path / ("out" if kind == "dir" else "out.txt")
    if kind == "dir":
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("old")
    else:
        write_text_atomic(out, "old")
    ready = tmp_path / "ready"
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, kind, str(out), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the writer died before writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    if kind == "dir":
        assert _tree(out) == {"a.txt": "old"}
    else:
        assert out.read_text() == "old"
    # the dead writer's temporary sibling is hidden and is never read as the output
    assert all(name.startswith(f".{out.name}.tmp-") for name in _hidden(tmp_path))


def test_publish_dir_killed_between_its_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    """The one window of a folder swap: the old folder moved aside, the new one not yet in. The old folder
    survives whole under a hidden name; no half-written folder is ever under the published name."""
    final, new = tmp_path / "ckpt", tmp_path / "ckpt.tmp-x"
    final.mkdir()
    (final / "a.txt").write_text("old")
    new.mkdir()
    (new / "a.txt").write_text("new")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(new, final)
    monkeypatch.setattr(os, "replace", real_replace)
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.old-")]
    assert _tree(aside) == {"a.txt": "old"} and not final.exists()
    publish_dir(new, final)  # a retry publishes the new folder
    assert _tree(final) == {"a.txt": "new"}
