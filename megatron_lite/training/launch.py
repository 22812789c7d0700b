"""Where a process sits in a multi-process job, from the launcher's environment.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (no torchrun) SLURM
sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODEID and the node list: the master is the first
host of the job's node list (where task 0 runs) and the port is derived from the job id, so every
task computes the same rendezvous without talking to the others.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from collections import defaultdict
from dataclasses import dataclass

import torch.distributed as dist
from omegaconf import OmegaConf

from megatron_lite.parallel import comm
from megatron_lite.parallel.device import DeviceChoice, choose_device, rank_device, visible_gpus
from megatron_lite.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list ("node[3-5,9],gpu1" -> "node3"), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    match = re.match(r"^([^\[]+)\[(\d+)", nodelist)
    return f"{match.group(1)}{match.group(2)}" if match else head


def port_for_job(job_id: str, step_id: str = "0") -> int:
    """A port in [20000, 60000) that all tasks of a job step agree on, different for consecutive jobs
    and for up to 16 steps running at once in one job."""
    job = int(re.sub(r"\D", "", job_id) or 0)
    step = int(re.sub(r"\D", "", step_id) or 0)
    return 20000 + (job * 16 + step % 16) % 40000


def distributed_env(environ=os.environ) -> DistributedEnv | None:
    """The job this process belongs to, or None for a plain single-process (or self-spawning) run."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistributedEnv(
            rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)), node_rank=int(environ.get("GROUP_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"), master_port=int(environ.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    # Only an srun task (SLURM_STEP_ID set) is a rank: the batch script itself also sees SLURM_PROCID=0
    # and the job's task count, and a run started there spawns its ranks itself.
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and tasks > 1:
        job, step = environ.get("SLURM_JOB_ID", "0"), environ.get("SLURM_STEP_ID", "0")
        # The step's nodes, not the job's: an srun on part of the allocation starts task 0 on its own first node.
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        return DistributedEnv(
            rank=int(environ["SLURM_PROCID"]), world_size=tasks,
            local_rank=int(environ.get("SLURM_LOCALID", 0)), node_rank=int(environ.get("SLURM_NODEID", 0)),
            master_addr=environ.get("MASTER_ADDR") or first_host(nodes),
            master_port=int(environ.get("MASTER_PORT") or port_for_job(job, step)),
            source="slurm",
        )
    return None


def ranks_on_this_node(env: DistributedEnv, environ=os.environ) -> int:
    """How many ranks of the job share this node (torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node)."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        match = re.match(r"\d+", environ.get(key, ""))  # SLURM writes "4(x2)" for 4 tasks on each of 2 nodes
        if match and int(match.group()) > 0:
            return int(match.group())
    return env.local_rank + 1


def init_from_env(env: DistributedEnv, timeout_s: float = 600.0, device: str = "auto") -> DeviceChoice:
    """Join the job on the device `parallel.device` asks for (see parallel/device.py): NCCL with one
    GPU per local rank, or gloo on CPU."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    choice = choose_device(device, ranks_on_this_node(env), visible_gpus())
    rank_device(choice, env.local_rank)
    dist.init_process_group(choice.backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return choice


def run_directory_name(time_format: str, environ=os.environ) -> str:
    """The run's output directory name (conf/config.yaml, hydra.run.dir): `slurm-<job id>` inside a
    SLURM job, so that a requeued job finds its own checkpoints again; the start time otherwise."""
    job = environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else datetime.datetime.now().strftime(time_format)


def register_resolvers() -> None:
    """`${run_dir_name:FORMAT}` for the Hydra config; call before Hydra composes it."""
    if not OmegaConf.has_resolver("run_dir_name"):
        OmegaConf.register_new_resolver("run_dir_name", run_directory_name, use_cache=True)


def leave_process_group() -> None:
    """End of a job that succeeded: tear the process group down before the interpreter exits, whose
    finalisation otherwise races gloo's threads ("terminate called without an active exception",
    which fails the SLURM step after the work is done)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def node_name(environ=os.environ) -> str:
    """The node this process runs on: SLURM's name for it (emulated nodes may share a hostname)."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def describe_placement(layout: ParallelLayout) -> str | None:
    """Which ranks (with their pp/dp/tp coordinates) run on which node, and whether every TP group
    stays within one node, where its per-layer all-reduces belong. Collective over the job; None
    for a one-process run."""
    if layout.world_size == 1:
        return None
    mine = (layout.rank, node_name(), layout.pp.rank, layout.dp.rank, layout.tp.rank, layout.tp.ranks)
    rows = comm.all_gather_object(mine, layout.group("world"))
    node_of = {rank: node for rank, node, *_ in rows}
    by_node = defaultdict(list)
    for rank, node, pp, dp, tp, _ in rows:
        by_node[node].append(f"{rank}[pp{pp} dp{dp} tp{tp}]")
    lines = [f"node {node}: {' '.join(ranks)}" for node, ranks in by_node.items()]
    split = sorted({tp_ranks for *_, tp_ranks in rows if len({node_of[r] for r in tp_ranks}) > 1})
    if split:
        lines.append(f"warning: tp groups {split} span nodes; give each node a multiple of tp tasks in rank order")
    else:
        lines.append("every tp group is within one node")
    return "rank placement:\n  " + "\n  ".join(lines)
