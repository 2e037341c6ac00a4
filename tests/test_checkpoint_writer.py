"""A checkpoint writer that dies is an error within seconds, never a hang (model/checkpoint.py's watchdog)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "dist" / "writer_death_worker.py"
REPO = Path(__file__).resolve().parents[1]


def start(tmp_path: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), mode],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"worker exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out:\n{proc.stdout.read()}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    start_t = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the trainer still ran {timeout} s after its checkpoint writer died (a hang):\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - start_t


def forked_writers() -> bool:
    """megatron-core up to 0.16 forks writer processes for a save; 0.17+ writes in threads of the trainer."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    return hasattr(FileSystemWriterAsync, "write_preloaded_data_multiproc")


def test_killed_writer_mid_save_stops_the_trainer_with_the_cause(tmp_path):
    if not forked_writers():
        pytest.skip("megatron-core 0.17+ writes in threads of the trainer: no writer process can die alone")
    how = signal.SIGKILL
    proc = start(tmp_path, "hang")
    wait_for(lambda: any(tmp_path.glob("writer_*")), 300, proc)  # start-up: slow on a busy machine
    for marker in tmp_path.glob("writer_*"):
        os.kill(int(marker.name.split("_")[1]), how)
    code, out, seconds = finish(proc, 30)
    assert code != 0 and "saved" not in out
    assert "CheckpointWriterDied" in out and "checkpoint writer process" in out, out[-3000:]
    assert f"killed by {how.name}" in out
    assert seconds < 30
    assert not (tmp_path / "ckpt").exists()  # nothing published; the temp dir was removed
    assert not list(tmp_path.glob("ckpt.tmp-*"))


def test_missing_psutil_is_named_instead_of_a_hang(tmp_path):
    proc = start(tmp_path, "nopsutil")
    wait_for(lambda: (tmp_path / "saving").exists(), 300, proc)
    code, out, seconds = finish(proc, 30)
    assert code != 0 and "saved" not in out
    assert "psutil is not installed" in out, out[-3000:]
    if forked_writers():  # ours (the watchdog's); thread writers (0.17+) fail with megatron's own message
        assert "checkpoint writer process" in out, out[-3000:]


def test_disk_filling_up_mid_save_is_one_clear_error(tmp_path):
    """A short write inside megatron's forked writers (a full disk; here a file-size cap) surfaces as torch's
    "unexpected pos" deep in a CheckpointException; the trainer names it as a full disk and cleans up."""
    proc = start(tmp_path, "short")
    code, out, _ = finish(proc, 300)
    assert code != 0 and "saved" not in out
    if forked_writers():
        assert "CheckpointDiskFull" in out and "the disk is full or over quota" in out, out[-3000:]
    else:  # 0.17+ keeps only "<class 'OSError'>": free space decides, and a file-size cap leaves plenty
        assert "<class 'OSError'>" in out, out[-3000:]
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob("ckpt.tmp-*"))


_MANAGER_CHILD = """
import time
from questa_nemo.model import mcore_compat
mcore_compat.start_write_results_queue()
from megatron.core.dist_checkpointing.strategies import filesystem_async
assert filesystem_async._results_queue is not None
print(filesystem_async._results_queue._manager._process.pid, flush=True)  # the proxy's manager
time.sleep(600)
"""


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaps yet (an orphan's reaper is this machine's init)."""
    try:
        return "\tZ" in Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].splitlines()[0]
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_writer_manager_exits_with_a_killed_trainer():
    """megatron's checkpoint writer keeps a spawned Manager that ignores SIGTERM (model/checkpoint.py shields it
    from Slurm's signals). A trainer killed by SIGKILL runs no finalizer, and the Manager used to stay alive
    for good; it now ends within seconds of its parent."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _MANAGER_CHILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        assert not _exited(pid)
    finally:
        child.kill()
        child.wait(10)
    deadline = time.monotonic() + 15
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _exited(pid), f"the writer's Manager {pid} outlived its killed parent"
