"""Per-node launcher: turn the SLURM_* environment into a torchrun command for `questa-nemo <command> ...`.

The batch scripts run this once per node (`srun --ntasks-per-node=1 python slurm/launch.py -- train ...`); it
execs torchrun, which starts one trainer process per GPU. Standard library only, so it runs in any Python that
has torch (a NeMo container, a venv) before anything of ours is imported.

Preemption: Slurm signals every process of the job step with SIGUSR1 (the batch script forwards its
`--signal=B:USR1@...` with `scancel --signal=USR1`). torchrun would die on SIGUSR1 (the default action) and take
its workers down before they save, so the launcher ignores SIGUSR1 before exec'ing torchrun; the trainer
processes install their own handler (finish the step, save, exit 3) and so override the inherited disposition.

Rendezvous host: the first host of the allocation, as `scontrol show hostnames "$SLURM_JOB_NODELIST"` gives
it. common.sh runs scontrol on the batch host (a container may have no scontrol) and passes the answer in
QUESTA_MASTER_ADDR; without it this script asks scontrol itself, and only without scontrol reads the hostlist.

Environment for the trainers (`trainer_env`, each only where not already set): CUDA_DEVICE_MAX_CONNECTIONS=1
(Megatron wants one hardware queue on Hopper with TP or CP > 1, so that its communication kernels are
scheduled before the compute they overlap with), TORCH_NCCL_AVOID_RECORD_STREAMS=1 (frees collective buffers
without recordStream's delay, as NeMo sets) and NCCL_DEBUG=WARN (NCCL's warnings in the log; INFO to debug).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT_BASE = 20000  # rendezvous port = base + job id % 10000: two jobs sharing a node do not collide


@dataclass(frozen=True)
class LaunchPlan:
    """Where this node sits in the job and how many trainer processes it starts."""

    nnodes: int
    node_rank: int
    nproc_per_node: int
    rdzv_endpoint: (
        str  # "<first host of the allocation>:<port>": torchrun's static rendezvous (several nodes)
    )


TRAINER_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_DEBUG": "WARN",
}


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist, the fallback when scontrol is not there: "gpu[003-010,12],cpu1" ->
    "gpu003", "node[01-04]-ib" -> "node01-ib", "rack[1-2]-n[07-08]" -> "rack1-n07" (zero padding kept)."""
    text = nodelist.strip()
    if not text or text[0] in ",[]":
        raise ValueError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}")
    host, i = [], 0
    while i < len(text) and text[i] != ",":  # the first entry: text and [ranges] groups up to a top-level comma
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                raise ValueError(f"SLURM_JOB_NODELIST: unclosed bracket in {nodelist!r}")
            host.append(re.split(r"[,-]", text[i + 1 : end])[0])
            i = end + 1
        else:
            host.append(text[i])
            i += 1
    return "".join(host)


def master_addr(env: Mapping[str, str]) -> str:
    """The rendezvous host: QUESTA_MASTER_ADDR (common.sh, from scontrol on the batch host), else the first
    of `scontrol show hostnames $SLURM_JOB_NODELIST`, else the first host of the hostlist read here; outside
    Slurm, localhost."""
    if env.get("QUESTA_MASTER_ADDR"):
        return env["QUESTA_MASTER_ADDR"]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "localhost"
    scontrol = shutil.which("scontrol", path=env.get("PATH", os.defpath))
    if scontrol:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60, env=dict(env))
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    return first_host(nodelist)


def trainer_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with TRAINER_ENV's settings added where `env` does not set them."""
    return {**TRAINER_ENV, **env}


def plan_from_env(
    env: Mapping[str, str], nproc_per_node: int | None = None, port: int | None = None
) -> LaunchPlan:
    """Read the job's shape from SLURM_* variables; outside Slurm this is one node on localhost.

    nproc_per_node defaults to the GPUs Slurm gave this node (SLURM_GPUS_ON_NODE), else 1 (a CPU run).
    """
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    node_rank = int(env.get("SLURM_NODEID", "0"))
    if nproc_per_node is None:
        nproc_per_node = int(env.get("SLURM_GPUS_ON_NODE") or 1)
    host = master_addr(env) if nnodes > 1 else "localhost"
    if port is None:
        port = DEFAULT_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 10000
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"SLURM_NODEID={node_rank} is outside SLURM_NNODES={nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    return LaunchPlan(nnodes, node_rank, nproc_per_node, f"{host}:{port}")


def torchrun_argv(plan: LaunchPlan, questa_args: list[str], python: str = sys.executable) -> list[str]:
    """The torchrun command line (as `python -m torch.distributed.run`, so it uses this Python's torch).

    One node uses a standalone rendezvous on a free port; several nodes use the static rendezvous at the
    first host, with this node's rank from Slurm, so global ranks follow the node order of the allocation.
    """
    argv = [python, "-m", "torch.distributed.run", f"--nproc-per-node={plan.nproc_per_node}"]
    if plan.nnodes == 1:
        argv.append("--standalone")
    else:
        argv += [
            f"--nnodes={plan.nnodes}",
            f"--node-rank={plan.node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={plan.rdzv_endpoint}",
        ]
    return argv + ["-m", "questa_nemo.cli", *questa_args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="launch.py [--nproc-per-node N] [--port P] [--dry-run] -- <questa-nemo command> [args ...]",
    )
    parser.add_argument("--nproc-per-node", type=int, default=None, help="default: SLURM_GPUS_ON_NODE or 1")
    parser.add_argument("--port", type=int, default=None, help="rendezvous port (default: from the job id)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("questa_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    questa_args = ns.questa_args[1:] if ns.questa_args[:1] == ["--"] else ns.questa_args
    if not questa_args:
        parser.error("give the questa-nemo command after --, e.g. -- train --config-name default")
    cmd = torchrun_argv(plan_from_env(os.environ, ns.nproc_per_node, ns.port), questa_args)
    env = trainer_env(os.environ)
    settings = " ".join(f"{k}={env[k]}" for k in TRAINER_ENV)
    print(f"{settings} {shlex.join(cmd)}", file=sys.stdout if ns.dry_run else sys.stderr, flush=True)
    if ns.dry_run:
        return 0
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execve(cmd[0], cmd, env)
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
