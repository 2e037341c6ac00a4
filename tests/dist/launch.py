"""Run a tests/dist worker under `torchrun --standalone --nproc-per-node N` from pytest; fail with its output.

Every worker runs under the NCCL-strict guard (QUESTA_NCCL_STRICT=1, see `strict_env`): model/parallel.py's
`init_distributed` then makes any collective that NCCL would reject (a CPU tensor the loop did not place on
the communication device through model/parallel.py) raise, while gloo still does the arithmetic. A worker
that starts torch.distributed without `init_distributed` calls `parallel.install_nccl_strict_guard()`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

DIST = Path(__file__).parent
REPO = DIST.parent.parent


def strict_env(**extra: str) -> dict[str, str]:
    """The environment of a multi-rank test: this one without torchrun's variables, the repository and
    tests/dist first on PYTHONPATH, one intra-op thread, and the NCCL-strict guard on (unless the environment
    says QUESTA_NCCL_STRICT=0)."""
    path = [str(REPO), str(DIST), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1",
           "QUESTA_NCCL_STRICT": os.environ.get("QUESTA_NCCL_STRICT", "1"), **extra}
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def torchrun(worker: str, *args: str, timeout: int = 120, nproc: int = 2) -> str:
    """Launch in a new session so that a hang is killed together with torchrun's worker processes."""
    env = strict_env()
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
