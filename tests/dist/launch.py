"""Run a tests/dist worker under `torchrun --standalone --nproc-per-node 2` from pytest; fail with its output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

DIST = Path(__file__).parent
REPO = DIST.parent.parent


def torchrun(worker: str, *args: str, timeout: int = 120, nproc: int = 2) -> str:
    """Launch in a new session so that a hang is killed together with torchrun's worker processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(DIST)]), "OMP_NUM_THREADS": "1"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(DIST / worker), *args]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{output[-6000:]}") from None
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"
    return output
