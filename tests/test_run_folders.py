"""Run-folder helpers (ckpt/runs.py): which checkpoints count, and the log line when the disk runs short."""

from pathlib import Path

from questa_nemo.ckpt.runs import (
    STATE_FILE,
    checkpoint_dirs,
    disk_headroom_warning,
    folder_bytes,
    latest_checkpoint,
)

GIB = 2**30


def test_only_checkpoints_with_their_state_file_count(tmp_path):
    for step, complete in ((2, True), (10, True), (11, False)):
        folder = tmp_path / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoints" / "step_12.tmp-abc").mkdir()
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2, 10]  # numeric order, not text order
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_10"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_folder_bytes_counts_every_file_below(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.distcp").write_bytes(b"\0" * 1000)
    (tmp_path / "metadata.json").write_bytes(b"{}")
    assert folder_bytes(tmp_path) == 1002


def test_disk_headroom_warning_only_when_fewer_than_two_more_fit():
    assert disk_headroom_warning(2 * GIB, 4 * GIB, Path("/runs/a")) is None
    line = disk_headroom_warning(2 * GIB, 3 * GIB, Path("/runs/a"))
    assert line is not None and "3.0 GiB free at /runs/a" in line and "room for 1 more" in line
    assert "room for 0 more" in disk_headroom_warning(2 * GIB, GIB, "/runs/a")
    assert disk_headroom_warning(0, 0, "/runs/a") is None  # nothing written yet: nothing to compare
