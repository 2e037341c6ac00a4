"""Checkpoints inside a training run folder: `<run_dir>/checkpoints/step_<N>/`, complete once its
run_state.json is written (the trainer writes it after the model and optimizer shards)."""

from __future__ import annotations

import shutil
from pathlib import Path

STATE_FILE = "run_state.json"


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first. Half-written ones never match: they live under a temporary
    name until their final rename, and the state file comes last."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for p in root.glob("step_*") if root.exists() else []:
        if p.name[5:].isdigit() and (p / STATE_FILE).exists():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> str:
    """A run folder stands for its newest checkpoint; anything else is returned as it is."""
    latest = latest_checkpoint(path) if Path(path).is_dir() else None
    return str(latest) if latest is not None else str(path)


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def disk_headroom_warning(checkpoint_bytes: int, free_bytes: int, where: str | Path) -> str | None:
    """A line for the log when the disk at `where` has room for fewer than two more checkpoints of this size
    (a save is written before the one it replaces is removed, and one that does not fit stops the run)."""
    if checkpoint_bytes <= 0 or free_bytes >= 2 * checkpoint_bytes:
        return None
    room = free_bytes // checkpoint_bytes
    gib = 2**30
    return (
        f"[checkpoint] {free_bytes / gib:.1f} GiB free at {where} and a checkpoint takes {checkpoint_bytes / gib:.1f} "
        f"GiB: room for {room} more; a save that does not fit stops the run (the newest checkpoint stays usable)"
    )


def check_disk_headroom(checkpoint: str | Path, run_dir: str | Path) -> str | None:
    """`disk_headroom_warning` for a checkpoint just written under `run_dir`."""
    return disk_headroom_warning(folder_bytes(checkpoint), shutil.disk_usage(run_dir).free, run_dir)
