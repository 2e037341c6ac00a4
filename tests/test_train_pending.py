"""bench/train_pending.sh (the training rows written without a GPU, one detached run) on CPU with stand-in
commands: every part runs in order whatever the one before returned, the log names each with its exit
status, and the run says when it is done."""

from __future__ import annotations

import subprocess
from pathlib import Path

from stand_ins import stand_in_env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_pending.sh"


def test_parts_run_in_order_and_the_run_says_it_is_done(tmp_path):
    # the test run fails: the rows still run
    env = stand_in_env(tmp_path, nvidia_smi="echo 'stand-in GPU, 700 W'\n",
                       python3='echo "python3 $*"\ncase "$*" in *tests/test_linear.py*) exit 1;; esac\n')  # fmt: skip
    run = tmp_path / "run"
    subprocess.run(["bash", str(SCRIPT), str(run)], env=env, timeout=60, check=True)
    log = (run / "run.log").read_text()
    steps = [line.split(":")[0].split()[-1] for line in log.splitlines() if line.startswith("[train_pending]")]
    assert steps == [
        "tests", "train_32k", "train_8k", "train_8k_accum8", "grpo_lpk_compile", "grpo_lpk_triton"
    ]
    assert "tests: rc=1" in log and "train_32k: rc=0" in log
    assert "chunk=32768,lpk=triton,qkvrope=1" in log and "chunk=32768,lpk=compile,qkvrope=0" in log
    assert "lpk=triton,accum=8" in log and "qkvrope=1,keepswiglu=1" in log
    assert "32768/hf:recompute=full,compile=1,attn=fa4" in log and "--logprob-kernels triton" in log
    assert (run / "done").exists()
