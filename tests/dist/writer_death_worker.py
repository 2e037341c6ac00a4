"""A one-rank trainer that saves a checkpoint whose writer dies (tests/test_checkpoint_writer.py).

    python writer_death_worker.py OUT MODE     MODE: hang (the writer waits to be killed) | nopsutil | ok
                                               | short (files capped at 20 kB: the short writes of a full disk)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "nopsutil":
        sys.modules["psutil"] = None  # what a machine without psutil sees: `import psutil` raises ImportError

    sys.path.insert(0, str(Path(__file__).parent))
    from policy_common import build_policy

    from questa_nemo.model.checkpoint import save_checkpoint

    if mode == "hang":
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        real = FileSystemWriterAsync.write_preloaded_data

        def slow_writer(*args, **kwargs):  # runs in the forked writer: announce its pid, wait for the test's kill
            (out / f"writer_{os.getpid()}").write_text("")
            time.sleep(600)
            return real(*args, **kwargs)

        FileSystemWriterAsync.write_preloaded_data = staticmethod(slow_writer)

    policy = build_policy()
    if mode == "short":  # what a full disk does to megatron's writers: a write returns less than it was given
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the cap then fail instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))  # the forked writers inherit it
    (out / "saving").write_text("")
    save_checkpoint(policy, out / "ckpt", step=1)
    print("saved", flush=True)


if __name__ == "__main__":  # megatron spawns a Manager process, which imports this file
    main()
