"""Per-node launcher: turn the SLURM_* environment into a torchrun command for `questa-nemo <command> ...`.

The batch scripts run this once per node (`srun --ntasks-per-node=1 python slurm/launch.py -- train ...`); it
execs torchrun, which starts one trainer process per GPU. Standard library only, so it runs in any Python that
has torch (a NeMo container, a venv) before anything of ours is imported.

Preemption: Slurm signals every process of the job step with SIGUSR1 (the batch script forwards its
`--signal=B:USR1@...` with `scancel --signal=USR1`). torchrun would die on SIGUSR1 (the default action) and take
its workers down before they save, so the launcher ignores SIGUSR1 before exec'ing torchrun; the trainer
processes install their own handler (finish the step, save, exit 3) and so override the inherited disposition.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
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


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist: "gpu[003-010,12],cpu1" -> "gpu003" (zero padding kept)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise ValueError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


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
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    master_addr = first_host(nodelist) if nodelist else "localhost"
    if port is None:
        port = DEFAULT_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 10000
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"SLURM_NODEID={node_rank} is outside SLURM_NNODES={nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    return LaunchPlan(nnodes, node_rank, nproc_per_node, f"{master_addr}:{port}")


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
    print(shlex.join(cmd), file=sys.stdout if ns.dry_run else sys.stderr, flush=True)
    if ns.dry_run:
        return 0
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execv(cmd[0], cmd)
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
