"""The parallel layout: pipeline x data x tensor ranks, built once from a DeviceMesh and passed explicitly.

Rank order follows Megatron: TP innermost (TP ranks are neighbours, so on one node), then DP, then PP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lite.parallel.comm import CommGroup, CommStats
from megatron_lite.parallel.host_memory import retain_freed_host_memory

MESH_DIM_NAMES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def check_sizes(sizes: ParallelSizes, world_size: int) -> None:
    """Raise ValueError naming the bad value and the fix; called before any collective."""
    for name in ("tp", "pp", "dp"):
        value = getattr(sizes, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
    if sizes.world_size != world_size:
        raise ValueError(
            f"world size {world_size} does not equal tp*pp*dp = {sizes.tp}*{sizes.pp}*{sizes.dp} = "
            f"{sizes.world_size}; launch {sizes.world_size} processes or change parallel.tp/pp/dp so "
            f"that their product is {world_size}"
        )


def coordinates_of(rank: int, sizes: ParallelSizes) -> dict[str, int]:
    """(pp, dp, tp) coordinates of a global rank in the mesh, without any process group."""
    return {
        "tp": rank % sizes.tp,
        "dp": (rank // sizes.tp) % sizes.dp,
        "pp": rank // (sizes.tp * sizes.dp),
    }


def rank_at(sizes: ParallelSizes, pp: int, dp: int, tp: int) -> int:
    return (pp * sizes.dp + dp) * sizes.tp + tp


@dataclass
class ParallelLayout:
    """Sizes, this rank's coordinates and the process groups of one process.

    `serial()` gives the one-process layout without torch.distributed, which is the reference every
    parallel layout must reproduce.
    """

    sizes: ParallelSizes
    rank: int
    tp: CommGroup
    pp: CommGroup
    dp: CommGroup
    stats: CommStats
    # First and last pipeline stage of this (dp, tp) position: they sum the gradients of tied
    # input/output embeddings. Size 1 on middle stages and without pipeline parallelism.
    embedding: CommGroup | None = None
    world: CommGroup | None = None  # every rank of the job (metadata and job-wide agreement)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None

    def __post_init__(self):
        if self.embedding is None:
            self.embedding = CommGroup.single("embedding", self.stats)
        if self.world is None:
            size = self.sizes.world_size
            joined = size > 1 and dist.is_initialized()
            self.world = (CommGroup("world", None, size, self.rank, tuple(range(size)), self.stats) if joined
                          else CommGroup.single("world", self.stats))

    @classmethod
    def serial(cls, device: torch.device | str = "cpu") -> "ParallelLayout":
        stats = CommStats()
        return cls(
            sizes=ParallelSizes(),
            rank=0,
            tp=CommGroup.single("tp", stats),
            pp=CommGroup.single("pp", stats),
            dp=CommGroup.single("dp", stats),
            stats=stats,
            device=torch.device(device),
        )

    @classmethod
    def from_mesh(cls, sizes: ParallelSizes, device_type: str | None = None) -> "ParallelLayout":
        """Build the layout on an initialised default process group (gloo on CPU, NCCL on CUDA)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        check_sizes(sizes, dist.get_world_size())
        from torch.distributed.device_mesh import init_device_mesh

        device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
        mesh = init_device_mesh(device_type, (sizes.pp, sizes.dp, sizes.tp), mesh_dim_names=MESH_DIM_NAMES)
        rank = dist.get_rank()
        stats = CommStats()
        groups = {}
        for dim in MESH_DIM_NAMES:
            group = mesh.get_group(dim)
            groups[dim] = CommGroup(
                name=dim,
                group=group,
                size=mesh.size(MESH_DIM_NAMES.index(dim)),
                rank=mesh.get_local_rank(dim),
                ranks=tuple(dist.get_process_group_ranks(group)),
                stats=stats,
            )
        if device_type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
            retain_freed_host_memory()
        embedding = _embedding_group(sizes, rank, stats)
        return cls(sizes=sizes, rank=rank, stats=stats, device=device, mesh=mesh, embedding=embedding, **groups)

    @property
    def world_size(self) -> int:
        return self.sizes.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    @property
    def next_stage_rank(self) -> int | None:
        """Global rank of the next pipeline stage with the same (dp, tp) coordinates."""
        return None if self.is_last_stage else self.pp.ranks[self.pp.rank + 1]

    @property
    def prev_stage_rank(self) -> int | None:
        return None if self.is_first_stage else self.pp.ranks[self.pp.rank - 1]

    def describe(self) -> str:
        return (
            f"rank {self.rank}: pp {self.pp.rank}/{self.pp.size} dp {self.dp.rank}/{self.dp.size} "
            f"tp {self.tp.rank}/{self.tp.size}"
        )


def _embedding_group(sizes: ParallelSizes, rank: int, stats: CommStats) -> CommGroup:
    """Group {first stage, last stage} for this rank's (dp, tp); every rank creates every group, in
    the same order, because new_group is collective over the whole world."""
    mine = CommGroup.single("embedding", stats)
    if sizes.pp == 1:
        return mine
    here = coordinates_of(rank, sizes)
    for dp in range(sizes.dp):
        for tp in range(sizes.tp):
            ranks = (rank_at(sizes, 0, dp, tp), rank_at(sizes, sizes.pp - 1, dp, tp))
            group = dist.new_group(list(ranks))
            if rank in ranks:
                mine = CommGroup("embedding", group, 2, ranks.index(rank), ranks, stats)
    assert mine.size == 2 or 0 < here["pp"] < sizes.pp - 1
    return mine
