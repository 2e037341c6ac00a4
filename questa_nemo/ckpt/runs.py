"""Checkpoints inside a training run folder: `<run_dir>/checkpoints/step_<N>/`, complete once its
run_state.json is written (the trainer writes it after the model and optimizer shards)."""

from __future__ import annotations

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
