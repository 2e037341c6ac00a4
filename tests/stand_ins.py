"""Stand-in commands for the GPU scripts' CPU tests (bench/gpu_pending.sh, bench/train_pending.sh): small shell
scripts named like the real commands, first on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def stand_in_env(tmp_path: Path, **commands: str) -> dict[str, str]:
    """os.environ with a folder of stand-ins first on PATH: one executable shell script per `name=body`."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in commands.items():
        path = folder / name.replace("_", "-")
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}
