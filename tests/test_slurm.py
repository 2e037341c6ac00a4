"""Slurm launch: the torchrun command derived from SLURM_*, the submit script's dry run, and a real Slurm.

The `slurm` tests need the one-node Slurm that .ci/slurm_up.sh starts (CI's .ci/run does); they read its
env file and skip with the reason when it is not there. They submit the embedded default through
slurm/submit.py and slurm/train.sbatch from the venv the tests run in, on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
ENV_FILE = Path(os.environ.get("QUESTA_SLURM_ENV", "/tmp/questa-slurm/slurm.env"))
FAST = ["train.steps=4", "train.warmup.steps=10", "world.rl_problems=64", "world.eval_problems=32"]
# The Slurm tests check the job mechanics, not learning: smaller steps, calibration and no final evaluation.
SMALL = [
    "train.prompts_per_step=2", "rollout.n_samples=4", "world.calib_problems_per_length=2",
    "train.validation_samples=1", "train.final_eval=false", "train.progress_bar=false",
]  # fmt: skip


_LOADED: dict[str, object] = {}


def _load(name: str):
    """slurm/<name>.py as a module. submit.py imports `launch` by name, and tests/dist has a `launch` module
    of its own that other test files import: slurm's modules sit in sys.modules only while one is loading."""
    spec = importlib.util.spec_from_file_location(name, SLURM_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = {key: sys.modules.get(key) for key in ("launch", name)}
    sys.modules.update(_LOADED)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    _LOADED[name] = module
    return module


launch = _load("launch")


# ------------------------------------------------------------------------------------------ launch.py
@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu[003-010,12]", "gpu003"), ("node7", "node7"), ("a-1,b2", "a-1"), ("dgx[1,4]", "dgx1"),
        ("node[01-04]-ib", "node01-ib"), ("rack[1-2]-n[07-08],x", "rack1-n07"),
    ],
)  # fmt: skip
def test_first_host_of_a_slurm_hostlist(nodelist, host):
    assert launch.first_host(nodelist) == host


def _fake_scontrol(tmp_path: Path) -> dict[str, str]:
    """A PATH whose `scontrol show hostnames LIST` prints two hosts of a suffixed hostlist (as Slurm would
    for node[01-02]-ib), and logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.args\n'
                      '[ "$1 $2" = "show hostnames" ] && printf "node01-ib\\nnode02-ib\\n"\n')
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_master_address_comes_from_scontrol_show_hostnames(tmp_path):
    env = {**_fake_scontrol(tmp_path), "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "node[01-02]-ib", "SLURM_JOB_ID": "7"}  # fmt: skip
    plan = launch.plan_from_env(env, nproc_per_node=8)
    assert plan.rdzv_endpoint == "node01-ib:20007"
    assert (tmp_path / "scontrol.args").read_text().split() == ["show", "hostnames", "node[01-02]-ib"]
    # common.sh resolves it on the batch host and hands it over: launch.py then asks nobody
    assert launch.master_addr({"QUESTA_MASTER_ADDR": "head-ib", "SLURM_JOB_NODELIST": "x[1-2]"}) == "head-ib"
    out = subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source {SLURM_DIR}/common.sh; QUESTA_IMAGE=/i.sqsh QUESTA_WORKDIR=/runs '
         'questa_launcher; echo "addr=$QUESTA_MASTER_ADDR"; printf "%s\\n" "${LAUNCHER[@]}"'],
        env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "addr=node01-ib" in out.stdout
    assert "--container-workdir=/runs" in out.stdout.splitlines()


def test_launcher_sets_cuda_connections_and_nccl_settings_unless_set():
    env = launch.trainer_env({"NCCL_DEBUG": "INFO"})
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert env["NCCL_DEBUG"] == "INFO"  # the user's setting wins
    out = subprocess.run([sys.executable, str(SLURM_DIR / "launch.py"), "--dry-run", "--", "train"],
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0 and "CUDA_DEVICE_MAX_CONNECTIONS=1" in out.stdout, out.stderr


def test_each_restart_logs_to_its_own_file(tmp_path):
    script = (f'source {SLURM_DIR}/common.sh; for n in 0 1; do SLURM_RESTART_COUNT=$n questa_log_file; '
              'echo "$QUESTA_LOG"; done')
    env = {**os.environ, "SLURM_JOB_NAME": "questa-s1", "SLURM_JOB_ID": "42", "QUESTA_LOG_DIR": str(tmp_path / "l")}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [f"{tmp_path}/l/questa-s1-42-restart0.log", f"{tmp_path}/l/questa-s1-42-restart1.log"]


def test_one_node_uses_a_standalone_rendezvous_with_the_nodes_gpus():
    plan = launch.plan_from_env({"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "8"})
    argv = launch.torchrun_argv(plan, ["train", "--config-name", "questa_partial_50"], python="py")
    assert argv == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node=8", "--standalone",
        "-m", "questa_nemo.cli", "train", "--config-name", "questa_partial_50",
    ]  # fmt: skip


def test_several_nodes_rendezvous_at_the_first_host_with_slurms_node_rank():
    env = {
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[017-020]",
        "SLURM_JOB_ID": "123456",
    }
    argv = launch.torchrun_argv(launch.plan_from_env(env, nproc_per_node=8), ["train"], python="py")
    assert "--nnodes=4" in argv and "--node-rank=2" in argv and "--nproc-per-node=8" in argv
    assert "--rdzv-backend=static" in argv
    assert f"--rdzv-endpoint=gpu017:{20000 + 123456 % 10000}" in argv
    assert "--standalone" not in argv


def test_outside_slurm_and_without_gpus_it_is_one_cpu_process():
    plan = launch.plan_from_env({})
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node) == (1, 0, 1)


def test_a_node_rank_outside_the_job_is_an_error():
    with pytest.raises(ValueError, match="SLURM_NODEID=4"):
        launch.plan_from_env({"SLURM_NNODES": "4", "SLURM_NODEID": "4"})


@pytest.mark.slow
def test_two_node_static_rendezvous_really_starts(tmp_path):
    """Two launchers on this machine as nodes 0 and 1 of one job: torchrun accepts our flags and ranks meet."""
    procs = []
    for node in (0, 1):
        env = {
            **os.environ,
            "SLURM_NNODES": "2",
            "SLURM_NODEID": str(node),
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": str(os.getpid()),
        }
        cmd = [sys.executable, str(SLURM_DIR / "launch.py"), "--nproc-per-node=1", "--", "--help"]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for out in outputs:
        assert "--nnodes=2" in out and "usage: questa-nemo" in out


# ------------------------------------------------------------------------------------------ submit.py
def test_dry_run_prints_the_chain_the_launch_and_the_resolved_config(tmp_path):
    out = subprocess.run(
        [
            sys.executable, str(SLURM_DIR / "submit.py"), "--dry-run", "--runs-root", str(tmp_path),
            "--image", "/images/questa.sqsh", "--mounts", "/lustre:/lustre", "--nodes", "2",
            "--time", "04:00:00", "--stages", "default,default", "--eval-config", "", "rollout.n_samples=6",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    sbatch = [line for line in out.stdout.splitlines() if line.startswith("env ")]
    assert len(sbatch) == 2
    assert "QUESTA_IMAGE=/images/questa.sqsh" in sbatch[0] and "QUESTA_MOUNTS=/lustre:/lustre" in sbatch[0]
    assert "--signal=B:USR1@600" in sbatch[0] and "--time=04:00:00" in sbatch[0] and "--nodes=2" in sbatch[0]
    assert "--dependency" not in sbatch[0] and "--dependency=afterok:" in sbatch[1]
    assert f"train.parent_stage={tmp_path / 'default'}" in sbatch[1]
    assert "python -m torch.distributed.run --nproc-per-node=8 --nnodes=2 --node-rank=0" in out.stdout
    assert out.stdout.count("n_samples: 6") == 2  # the override reached both stages' resolved configs
    assert not (tmp_path / "logs").exists()  # nothing was submitted


def test_submit_refuses_a_bad_config_before_queueing_anything(tmp_path):
    out = subprocess.run(
        [
            sys.executable, str(SLURM_DIR / "submit.py"), "--runs-root", str(tmp_path), "--venv", sys.prefix,
            "--stages", "default", "--eval-config", "", "train.no_such_key=1",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "config error" in out.stderr and "train.no_such_key" in out.stderr
    assert not (tmp_path / "logs").exists()


def test_dry_run_of_the_questa_recipe_chains_both_stages_and_the_evaluation(tmp_path):
    out = subprocess.run(
        [
            sys.executable, str(SLURM_DIR / "submit.py"), "--dry-run", "--no-check", "--runs-root", str(tmp_path),
            "--venv", sys.prefix,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    sbatch = [line for line in out.stdout.splitlines() if line.startswith("env ")]
    assert [line.split("--job-name=")[1].split()[0] for line in sbatch] == [
        "questa-questa_partial_50", "questa-questa_partial_50_25", "questa-eval",
    ]  # fmt: skip
    assert "train.sbatch --config-name questa_partial_50 " in sbatch[0]
    assert "--dependency=afterok:" in sbatch[1] and "--dependency=afterok:" in sbatch[2]
    assert f"train.parent_stage={tmp_path / 'questa_partial_50'}" in sbatch[1]
    assert "eval.sbatch --config-name eval_default" in sbatch[2]
    assert "--signal=B:USR1@600" in sbatch[1] and "--signal" not in sbatch[2]


# ------------------------------------------------------------------------------------------ real Slurm
def _slurm_env() -> dict[str, str]:
    if not ENV_FILE.is_file():
        pytest.skip(f"no Slurm started: {ENV_FILE} missing (run .ci/slurm_up.sh; .ci/run does)")
    values = dict(line.split("=", 1) for line in ENV_FILE.read_text().split("\n") if "=" in line)
    env = {**os.environ, "SLURM_CONF": values["SLURM_CONF"]}
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
    if state.returncode != 0 or state.stdout.strip() not in ("idle", "mix", "alloc"):
        pytest.skip(f"Slurm from {ENV_FILE} does not answer: {state.stderr.strip() or state.stdout.strip()}")
    return env


def _job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as key -> value (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _submit_default(tmp_path: Path, env: dict[str, str], overrides: list[str]) -> tuple[str, Path]:
    """Submit the embedded default through slurm/submit.py (bare metal, this venv, CPU); job id and run dir."""
    out = subprocess.run(
        [
            sys.executable, str(SLURM_DIR / "submit.py"), "--runs-root", str(tmp_path), "--venv", sys.prefix,
            "--nodes", "1", "--gpus-per-node", "0", "--stages", "default", "--eval-config", "", *overrides,
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.split("job ")[-1].strip(), tmp_path / "default"


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _arm_dirs(run_dir: Path) -> list[Path]:
    """Where the trainer writes metrics, checkpoints and DONE: run_dir/<arm> per train.arms entry, else run_dir.

    Read from the config.yaml the trainer writes into run_dir at start; [] before it exists.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    cfg = yaml.safe_load(path.read_text())
    if not cfg:  # written atomically by the trainer; an empty read would be a bug there, not a state to wait on
        raise AssertionError(f"{path} is empty")
    arms = cfg["train"].get("arms") or {}
    return [run_dir / arm for arm in arms] or [run_dir]


def _start_requeued_now(job_id: str, env: dict[str, str]) -> None:
    """Skip the begin-time delay Slurm gives a requeued job, once the node has let the old run go.

    slurmd revokes the old run's credential at the requeue and refuses a new one created in that same second
    ("Killing non-startable batch JobId=N: Job credential revoked", seen in CI when StartTime=now came within a
    second); Slurm's own delay (about two minutes) is what normally avoids it. So: the node idle again (every
    step of the old run ended), then more than a second past the requeue.
    """
    _wait(
        lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
        == "idle",
        120,
        "the node to be idle after the requeue",
    )
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env=env, check=True)


def _saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def _log(tmp_path: Path) -> str:
    """The batch scripts' logs (*.out, across requeues) and the trainers' (one *.log per restart)."""
    logs = sorted((tmp_path / "logs").glob("*.out")) + sorted((tmp_path / "logs").glob("*.log"))
    return "\n".join(f"==> {p.name}\n{p.read_text()}" for p in logs)


@pytest.mark.slow
@pytest.mark.slurm
def test_embedded_default_runs_to_completion_under_slurm(tmp_path):
    env = _slurm_env()
    job_id, run_dir = _submit_default(tmp_path, env, FAST + SMALL)
    state = _wait(
        lambda: (
            _job(job_id, env).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
            and _job(job_id, env)
        ),
        300,
        f"job {job_id} to end",
    )
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), _log(tmp_path)
    arms = _arm_dirs(run_dir)
    assert arms, f"the trainer wrote no config.yaml into {run_dir}"
    for arm in arms:
        assert (arm / "DONE").is_file(), f"{arm} has no DONE"
        assert _metric_steps(arm) == [1, 2, 3, 4], arm
        assert _saved_steps(arm)[-1] == 4, f"{arm}: no checkpoint of the last step"


@pytest.mark.slow
@pytest.mark.slurm
def test_pre_timeout_signal_saves_requeues_and_resumes_without_losing_a_step(tmp_path):
    env = _slurm_env()
    steps = 8
    overrides = [o for o in FAST if not o.startswith("train.steps=")] + [f"train.steps={steps}"] + SMALL
    job_id, run_dir = _submit_default(tmp_path, env, overrides)
    _wait(lambda: (arms := _arm_dirs(run_dir)) and _metric_steps(arms[0]), 300, "the first GRPO step")
    # What --signal=B:USR1@secs does before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    requeued = _wait(
        lambda: (
            (job := _job(job_id, env)).get("Restarts") == "1" and job.get("JobState") == "PENDING" and job
        ),
        180,
        f"job {job_id} to requeue",
    )
    # The arm that was training when the signal came: stopped part-way, with a checkpoint of its last step.
    (stopped,) = [arm for arm in _arm_dirs(run_dir) if not (arm / "DONE").exists() and _metric_steps(arm)]
    logged = _metric_steps(stopped)
    assert requeued and 1 <= len(logged) < steps, _log(tmp_path)
    assert _saved_steps(stopped)[-1] == logged[-1], (
        "the checkpoint written on the signal must hold every step"
    )
    _start_requeued_now(job_id, env)
    state = _wait(
        lambda: (
            _job(job_id, env).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
            and _job(job_id, env)
        ),
        300,
        f"requeued job {job_id} to end",
    )
    log = _log(tmp_path)
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), log
    assert "restart 1 on" in log  # the batch script saw SLURM_RESTART_COUNT=1
    for arm in _arm_dirs(run_dir):
        assert _metric_steps(arm) == list(range(1, steps + 1)), f"{arm}: a step lost or repeated\n{log}"
        assert (arm / "DONE").is_file()
