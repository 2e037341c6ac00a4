"""Submit the QuestA recipe to Slurm: stage 1, stage 2 chained with afterok, then an evaluation job.

    python slurm/submit.py --runs-root /lustre/runs/questa --image /lustre/images/questa-nemo.sqsh \\
        --mounts /lustre:/lustre --nodes 8 --gpus-per-node 8 --time 04:00:00 [--dry-run] [key=value ...]

Each stage trains into <runs-root>/<stage>; a later stage starts from the one before it
(train.parent_stage), so no path is edited by hand between stages. Overrides after the options apply to every
stage. `--dry-run` prints the sbatch lines, the per-node launch command and each stage's resolved config, and
submits nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(SLURM_DIR))
from launch import DEFAULT_PORT_BASE, LaunchPlan, torchrun_argv  # noqa: E402  (this folder is not a package)

STAGES = ("questa_partial_50", "questa_partial_50_25")


@dataclass(frozen=True)
class Job:
    """One sbatch submission: its options, script and questa-nemo arguments."""

    name: str
    script: str  # train.sbatch | eval.sbatch
    args: list[str]  # what the script passes to questa-nemo: --config-name NAME key=value ...
    after: str | None  # name of the job this one waits for (afterok)


def plan_jobs(ns: argparse.Namespace) -> list[Job]:
    """The chain of jobs: the stages in order, then the evaluation of every stage's run."""
    root = Path(ns.runs_root)
    jobs, previous = [], None
    for stage in ns.stages:
        args = ["--config-name", stage, f"train.run_dir={root / stage}"]
        if previous is not None:
            args.append(f"train.parent_stage={root / previous}")
        jobs.append(Job(stage, "train.sbatch", args + ns.overrides, after=previous))
        previous = stage
    if ns.eval_config and ns.stages:
        runs = ",".join(str(root / s) for s in ns.stages)
        args = [
            "--config-name",
            ns.eval_config,
            f"eval.checkpoints=[{runs}]",
            f"eval.output_dir={root / 'eval'}",
        ]
        jobs.append(Job("eval", "eval.sbatch", args, after=previous))
    return jobs


def job_env(ns: argparse.Namespace) -> dict[str, str]:
    """What common.sh reads: the container or venv to run in (and the container's working directory), where
    this folder is, and where each restart's trainer log goes."""
    env = {"QUESTA_SLURM_DIR": str(SLURM_DIR), "QUESTA_LOG_DIR": str(Path(ns.runs_root) / "logs")}
    if ns.image:
        env["QUESTA_IMAGE"] = ns.image
        env["QUESTA_WORKDIR"] = ns.workdir or ns.runs_root
        if ns.mounts:
            env["QUESTA_MOUNTS"] = ns.mounts
    else:
        env["QUESTA_VENV"] = ns.venv
    return env


def sbatch_argv(ns: argparse.Namespace, job: Job, dependency: str | None) -> list[str]:
    """The sbatch command line of one job; `dependency` is the job id it waits for (afterok)."""
    log_dir = Path(ns.runs_root) / "logs"
    argv = ["sbatch", "--parsable", f"--job-name=questa-{job.name}", f"--nodes={ns.nodes}"]
    argv.append(f"--output={log_dir}/%x-%j.out")
    if ns.gpus_per_node:
        argv.append(f"--gpus-per-node={ns.gpus_per_node}")
    if ns.time:
        argv.append(f"--time={ns.time}")
    if job.script == "train.sbatch":
        argv.append(f"--signal=B:USR1@{ns.signal_secs}")
    for flag in ("partition", "account", "qos"):
        if getattr(ns, flag):
            argv.append(f"--{flag}={getattr(ns, flag)}")
    if dependency:
        argv.append(f"--dependency=afterok:{dependency}")
    return argv + [str(SLURM_DIR / job.script), *job.args]


def launch_preview(ns: argparse.Namespace, job: Job) -> str:
    """The torchrun line node 0 will run (host and port are the allocation's; shown symbolically)."""
    endpoint = f"$FIRST_HOST:$(({DEFAULT_PORT_BASE} + SLURM_JOB_ID % 10000))"
    plan = LaunchPlan(ns.nodes, 0, ns.gpus_per_node or 1, endpoint)
    python = "python" if ns.image else str(Path(ns.venv) / "bin" / "python")
    command = "train" if job.script == "train.sbatch" else "eval"
    return shlex.join(torchrun_argv(plan, [command, *job.args], python=python))


def resolved_config(ns: argparse.Namespace, job: Job) -> str:
    """The config the job will run, composed and validated here as the trainer will at start, as YAML.

    Raises ConfigError naming the key, so a bad config fails before it waits in the queue. Reads no model
    file (the model's shapes are checked where the trainer builds it), so it works on a login node that cannot
    see the model. Needs questa-nemo in this Python; without it, says so.
    """
    try:
        from omegaconf import OmegaConf

        from questa_nemo.config import load_config
    except ImportError as e:
        return f"(not checked: {e}; install questa-nemo here to check configs before submitting)"
    name, overrides = job.args[1], job.args[2:]
    world = ns.nodes * (ns.gpus_per_node or 1)
    return OmegaConf.to_yaml(OmegaConf.structured(load_config(name, overrides, world_size=world)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-root", required=True, help="shared folder: one run_dir per stage, logs/, eval/")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", help="container image built from our Dockerfile (pyxis/enroot)")
    where.add_argument(
        "--venv", help="bare metal: a venv with questa-nemo installed, on a shared file system"
    )
    p.add_argument(
        "--mounts", default="", help="--container-mounts, e.g. /lustre/data:/data,/lustre/runs:/runs"
    )
    p.add_argument(
        "--workdir", default=None, help="the trainers' working directory in the container (default: --runs-root)"
    )
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU-only nodes (one process per node)")
    p.add_argument("--time", default=None, help="time limit per job (each requeue gets a new one)")
    p.add_argument("--signal-secs", type=int, default=600, help="USR1 this many seconds before the limit")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument(
        "--stages",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(STAGES),
        help="comma-separated",
    )
    p.add_argument("--eval-config", default="eval_default", help="'' for no evaluation job")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    p.add_argument("--no-check", action="store_true", help="do not compose and validate the configs here")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    env = job_env(ns)
    job_ids: dict[str, str] = {}
    for job in plan_jobs(ns):
        try:
            config = "(not checked: --no-check)" if ns.no_check else resolved_config(ns, job)
        except ValueError as e:  # questa_nemo.config.ConfigError
            print(f"submit: {job.name}: config error: {e}", file=sys.stderr)
            return 2
        if ns.dry_run:
            dependency = f"<{job.after} job id>" if job.after else None
            argv_ = sbatch_argv(ns, job, dependency)
            print(f"# {job.name}\n{shlex.join(['env', *(f'{k}={v}' for k, v in env.items()), *argv_])}")
            print(f"# launch on each node (node 0 shown):\n{launch_preview(ns, job)}")
            print(f"# resolved config:\n{config}")
            continue
        argv_ = sbatch_argv(ns, job, job_ids.get(job.after) if job.after else None)
        Path(ns.runs_root, "logs").mkdir(parents=True, exist_ok=True)
        out = subprocess.run(argv_, env={**os.environ, **env}, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"submit: sbatch failed for {job.name}: {out.stderr.strip()}", file=sys.stderr)
            return out.returncode
        job_ids[job.name] = out.stdout.strip().split(";")[0]
        print(f"{job.name}: job {job_ids[job.name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
