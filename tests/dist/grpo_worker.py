"""torchrun worker: `questa-nemo train` itself on every rank (the CLI's code path, nothing of the test's own);
its arguments are the command's overrides. Launched by tests/test_grpo_parallel.py and bench/multi_gpu.sh."""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)

from questa_nemo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
