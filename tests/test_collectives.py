"""The loop's collectives (model/parallel.py) and the NCCL-strict guard, over two gloo ranks (torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import torchrun  # noqa: E402


@pytest.mark.slow
def test_loop_collectives_and_the_nccl_strict_guard():
    assert "OK" in torchrun("collectives_worker.py")
