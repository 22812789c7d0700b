"""Which device and backend a job's ranks use (`parallel.device`), decided before any process starts.

auto: CUDA with NCCL when this node has a GPU for every rank that runs on it, otherwise CPU with gloo
(saying why when GPUs are there but too few). cpu: always gloo on CPU. cuda: NCCL, and a clear error
when the node has fewer GPUs than ranks. Every rank of a job takes the same decision from the same
inputs (its node's GPU count and the ranks per node), so no job mixes backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DeviceChoice:
    type: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"
    note: str = ""  # why auto stayed on CPU although GPUs are there


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_device(requested: str, ranks_on_node: int, gpus: int) -> DeviceChoice:
    """The device of `ranks_on_node` ranks on a node with `gpus` visible CUDA devices (one GPU each)."""
    if requested not in DEVICES:
        raise ValueError(f"parallel.device={requested!r} is not allowed; choose one of {list(DEVICES)}")
    if ranks_on_node < 1:
        raise ValueError(f"ranks on this node must be >= 1, got {ranks_on_node}")
    cpu = DeviceChoice("cpu", "gloo")
    if requested == "cpu":
        return cpu
    if gpus >= ranks_on_node:
        return DeviceChoice("cuda", "nccl")
    if requested == "cuda":
        raise ValueError(f"parallel.device=cuda needs a GPU for each of the {ranks_on_node} ranks on this node but "
                         f"{gpus} {'is' if gpus == 1 else 'are'} visible: lower tp*pp*dp (or the tasks per node) "
                         "to the GPU count, or set parallel.device=cpu")
    if gpus == 0:
        return cpu
    return DeviceChoice("cpu", "gloo", note=f"{ranks_on_node} ranks on this node but only {gpus} GPU"
                        f"{'' if gpus == 1 else 's'}: running on CPU with gloo; lower tp*pp*dp to {gpus} to train "
                        "on the GPUs (or set parallel.device=cpu to silence this)")


def rank_device(choice: DeviceChoice, local_rank: int) -> torch.device:
    """This rank's device (CUDA: one GPU per local rank), made current so NCCL and the caching
    allocator use it."""
    if choice.type != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
