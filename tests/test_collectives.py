"""The loop's collectives (model/parallel.py) and the NCCL-strict guard, over two gloo ranks (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import torchrun  # noqa: E402


@pytest.mark.slow
def test_loop_collectives_and_the_nccl_strict_guard():
    assert "OK" in torchrun("collectives_worker.py")


# A process that starts its groups through init_distributed and leaves without tearing them down: the exit
# hook tears them down while the interpreter is whole. The checker is registered first, so (atexit runs last
# in, first out) it runs after the hook and sees what the hook left.
_EXIT_CHILD = """
import atexit, sys, time, torch
atexit.register(lambda: print("INITIALIZED_AT_EXIT", torch.distributed.is_initialized(), flush=True))
from questa_nemo.config import ModelConfig
from questa_nemo.model import parallel
parallel.init_distributed(ModelConfig(params_dtype="fp32"))
assert torch.distributed.is_initialized()
if sys.argv[1].endswith("nothreads"):  # Python 3.12 at interpreter shutdown: no new thread may start
    import threading
    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")
    threading.Timer.start = refuse
if sys.argv[1].startswith("hang"):  # a teardown that never returns (a peer gone mid-collective)
    parallel.EXIT_TEARDOWN_S = 1.0
    parallel.destroy_distributed = lambda: time.sleep(600)
print("LEAVING", flush=True)
"""


def _exit_child(mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", _EXIT_CHILD, mode], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize("mode", ["normal", "normal_nothreads"])
def test_process_groups_are_torn_down_at_exit(mode):
    """Also where no thread may start at exit (Python 3.12, as NeMo containers run): the hook used to raise
    there before tearing anything down."""
    done = _exit_child(mode)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LEAVING" in done.stdout and "INITIALIZED_AT_EXIT False" in done.stdout, done.stdout
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("mode", ["hang", "hang_nothreads"])
def test_a_teardown_that_blocks_at_exit_ends_the_process_with_status_1(mode):
    started = time.monotonic()
    done = _exit_child(mode)
    assert time.monotonic() - started < 60
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    if mode == "hang" and sys.version_info < (3, 12):  # our timer thread
        assert "teardown at exit did not finish in 1 s" in done.stderr, done.stderr[-3000:]
    else:  # no thread starts at exit (3.12+): faulthandler's watchdog, where every thread stood, the hook among them
        assert "Timeout (0:00:01)!" in done.stderr and "_teardown_at_exit" in done.stderr, done.stderr[-3000:]
