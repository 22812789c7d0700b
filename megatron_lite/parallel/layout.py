"""The parallel layout: named mesh axes, built once from a DeviceMesh and passed explicitly.

Axes, outer to inner: pp, dp, cp, tp (rank order as Megatron's: TP innermost, so TP ranks are
neighbours on one node, then context, then data, then pipeline parallelism). Expert parallelism is
carved from data parallelism: dp = edp x ep with ep inner, so the ranks of an EP group are DP
neighbours, and `edp` groups the DP ranks that hold the same experts.

Groups are named and looked up with `layout.group(name)`:
    pp, dp, cp, tp, ep, edp   one axis each
    dp_cp, edp_cp             flattened views: gradients of dense / expert parameters are reduced over
                              these when the sequence is split over CP ranks too
    tp/<r>                    blocks of r consecutive TP ranks (every proper divisor r of tp): the
                              ranks that hold the same KV-head chunk when TP exceeds the KV heads
    embedding                 first and last pipeline stage of one (dp, cp, tp) position (tied embeddings)
    world                     every rank
A view equal to an axis (dp_cp with cp=1, edp with ep=1) is that axis's group itself, so no process
group is created twice and byte counters keep the axis name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from megatron_lite.parallel.comm import CommGroup, CommStats
from megatron_lite.parallel.host_memory import retain_freed_host_memory

MESH_DIM_NAMES = ("pp", "edp", "ep", "cp", "tp")  # the DeviceMesh dims; dp = (edp, ep) flattened
AXES = ("pp", "dp", "cp", "tp", "ep", "edp")
FLATTENED = {"dp": ("edp", "ep"), "dp_cp": ("edp", "ep", "cp"), "edp_cp": ("edp", "cp")}


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1  # carved from dp: must divide it

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def size(self, axis: str) -> int:
        """Size of an axis or of a flattened view (`dp_cp`, `edp_cp`)."""
        parts = FLATTENED.get(axis, (axis,))
        total = 1
        for part in parts:
            total *= getattr(self, part)
        return total

    def describe(self) -> str:
        extra = "".join(f" {a}={getattr(self, a)}" for a in ("cp", "ep") if getattr(self, a) > 1)
        return f"tp={self.tp} pp={self.pp} dp={self.dp}{extra}"


def check_sizes(sizes: ParallelSizes, world_size: int) -> None:
    """Raise ValueError naming the bad value and the fix; called before any collective."""
    for f in fields(ParallelSizes):
        value = getattr(sizes, f.name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"parallel.{f.name} must be a positive integer, got {value!r}")
    if sizes.dp % sizes.ep:
        raise ValueError(f"parallel.ep={sizes.ep} must divide parallel.dp={sizes.dp}: expert parallelism is carved "
                         f"from the data-parallel ranks; choose ep among {_divisors(sizes.dp)}")
    if sizes.world_size != world_size:
        cp = f"*{sizes.cp}" if sizes.cp > 1 else ""
        raise ValueError(
            f"world size {world_size} does not equal tp*pp*dp{'*cp' if cp else ''} = {sizes.tp}*{sizes.pp}*{sizes.dp}"
            f"{cp} = {sizes.world_size}; launch {sizes.world_size} processes or change parallel.tp/pp/dp so "
            f"that their product is {world_size}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def coordinates_of(rank: int, sizes: ParallelSizes) -> dict[str, int]:
    """A global rank's coordinate on every axis (pp, dp, cp, tp, ep, edp), without any process group."""
    tp = rank % sizes.tp
    cp = (rank // sizes.tp) % sizes.cp
    dp = (rank // (sizes.tp * sizes.cp)) % sizes.dp
    pp = rank // (sizes.tp * sizes.cp * sizes.dp)
    return {"pp": pp, "dp": dp, "cp": cp, "tp": tp, "ep": dp % sizes.ep, "edp": dp // sizes.ep}


def rank_at(sizes: ParallelSizes, pp: int = 0, dp: int = 0, tp: int = 0, cp: int = 0) -> int:
    return ((pp * sizes.dp + dp) * sizes.cp + cp) * sizes.tp + tp


def virtual_stage(rank: int, chunk: int, num_stages: int) -> int:
    """Megatron's numbering: model chunk `chunk` on pipeline rank `rank` is virtual stage chunk * p + rank."""
    return chunk * num_stages + rank


def stage_location(vstage: int, num_stages: int) -> tuple[int, int]:
    """(pipeline rank, chunk) that hosts virtual stage ``vstage``."""
    return vstage % num_stages, vstage // num_stages


STAGE_MAPPINGS = ("loop", "v")  # Megatron's numbering above, or ZBV's V (two chunks per rank)


def stage_of(rank: int, chunk: int, num_stages: int, mapping: str = "loop") -> int:
    """The virtual stage of model chunk `chunk` on pipeline rank `rank`: "loop" as `virtual_stage`; "v":
    chunk 0 is stage `rank`, chunk 1 stage 2p - 1 - rank (the last rank holds the V's turn)."""
    if mapping == "v":
        return rank if chunk == 0 else 2 * num_stages - 1 - rank
    return virtual_stage(rank, chunk, num_stages)


def location(stage: int, num_stages: int, mapping: str = "loop") -> tuple[int, int]:
    """(pipeline rank, chunk) that hosts virtual stage `stage` under `mapping` (see `stage_of`)."""
    if mapping == "v":
        return (stage, 0) if stage < num_stages else (2 * num_stages - 1 - stage, 1)
    return stage_location(stage, num_stages)


def group_ranks(sizes: ParallelSizes, rank: int, name: str) -> tuple[int, ...]:
    """The global ranks of the group `name` that `rank` belongs to, in group-rank order (closed form:
    the reference the DeviceMesh groups are tested against)."""
    here = coordinates_of(rank, sizes)
    world = range(sizes.world_size)
    if name == "world":
        return tuple(world)
    if name == "embedding":
        if sizes.pp == 1 or 0 < here["pp"] < sizes.pp - 1:
            return (rank,)
        return tuple(rank_at(sizes, pp, here["dp"], here["tp"], here["cp"]) for pp in (0, sizes.pp - 1))
    if name.startswith("tp/"):
        block = int(name[3:])
        first = rank - here["tp"] % block
        return tuple(range(first, first + block))
    varying = set(FLATTENED.get(name, (name,)))
    if not varying <= set(AXES):
        raise ValueError(f"unknown group {name!r}")
    fixed = [a for a in ("pp", "cp", "tp", "ep", "edp") if a not in varying]
    return tuple(r for r in world if all(coordinates_of(r, sizes)[a] == here[a] for a in fixed))


@dataclass
class ParallelLayout:
    """Sizes, this rank's coordinates and its named process groups.

    `serial()` gives the one-process layout without torch.distributed, which is the reference every
    parallel layout must reproduce.
    """

    sizes: ParallelSizes
    rank: int
    groups: dict[str, CommGroup]
    stats: CommStats
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None

    def group(self, name: str) -> CommGroup:
        try:
            return self.groups[name]
        except KeyError:
            raise ValueError(f"the layout has no group {name!r}; it has {sorted(self.groups)}") from None

    # The three axes every layer and the step touch, as shorthands for group(name).
    @property
    def tp(self) -> CommGroup:
        return self.groups["tp"]

    @property
    def pp(self) -> CommGroup:
        return self.groups["pp"]

    @property
    def dp(self) -> CommGroup:
        return self.groups["dp"]

    @property
    def coordinates(self) -> dict[str, int]:
        return coordinates_of(self.rank, self.sizes)

    @classmethod
    def from_groups(cls, sizes: ParallelSizes, rank: int, stats: CommStats, groups: dict[str, CommGroup] | None = None,
                    device: torch.device | str = "cpu") -> "ParallelLayout":
        """A layout from given groups; every group not given is this rank alone (tests, tools)."""
        names = set(AXES) | set(FLATTENED) | {"embedding", "world"} | _tp_block_names(sizes.tp)
        full = {name: CommGroup.single(name, stats) for name in names}
        full.update(groups or {})
        return cls(sizes=sizes, rank=rank, groups=full, stats=stats, device=torch.device(device))

    @classmethod
    def serial(cls, device: torch.device | str = "cpu") -> "ParallelLayout":
        return cls.from_groups(ParallelSizes(), 0, CommStats(), device=device)

    @classmethod
    def from_mesh(cls, sizes: ParallelSizes, device_type: str | None = None,
                  retain_host_memory: bool = False) -> "ParallelLayout":
        """Build the layout on an initialised default process group (gloo on CPU, NCCL on CUDA).
        `retain_host_memory` (CPU): also raise glibc's mmap/trim thresholds for this whole process
        (parallel/host_memory.py), a process-wide side effect the caller must ask for."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        check_sizes(sizes, dist.get_world_size())
        from torch.distributed.device_mesh import init_device_mesh

        device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
        shape = tuple(getattr(sizes, dim) for dim in MESH_DIM_NAMES)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
        rank = dist.get_rank()
        stats = CommStats()
        groups: dict[str, CommGroup] = {}
        by_parts: dict[tuple[str, ...], CommGroup] = {}  # one group per set of non-trivial mesh dims
        for dim in MESH_DIM_NAMES:
            # Without expert parallelism the edp dim is the data-parallel axis, and is called so.
            name = "dp" if dim == "edp" and sizes.ep == 1 else dim
            groups[dim] = by_parts[(dim,)] = _mesh_group(name, mesh[dim], stats)
        for name, parts in FLATTENED.items():
            nontrivial = tuple(p for p in parts if getattr(sizes, p) > 1)
            if not nontrivial:
                groups[name] = CommGroup.single(name, stats)
            elif nontrivial not in by_parts:
                by_parts[nontrivial] = _mesh_group(name, mesh[nontrivial]._flatten(name), stats)
            groups.setdefault(name, by_parts.get(nontrivial))
        for name in sorted(_tp_block_names(sizes.tp)):
            groups[name] = _enumerated_group(name, sizes, rank, stats)
        groups["embedding"] = _enumerated_group("embedding", sizes, rank, stats)
        groups["world"] = CommGroup("world", None, sizes.world_size, rank, tuple(range(sizes.world_size)), stats)
        if device_type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
            if retain_host_memory:
                retain_freed_host_memory()
        return cls(sizes=sizes, rank=rank, groups=groups, stats=stats, device=device, mesh=mesh)

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
        """Global rank of the next pipeline stage with the same (dp, cp, tp) coordinates."""
        return None if self.is_last_stage else self.pp.ranks[self.pp.rank + 1]

    @property
    def prev_stage_rank(self) -> int | None:
        return None if self.is_first_stage else self.pp.ranks[self.pp.rank - 1]

    def describe(self) -> str:
        axes = [a for a in ("pp", "dp", "cp", "ep", "tp") if a in ("pp", "dp", "tp") or getattr(self.sizes, a) > 1]
        return f"rank {self.rank}: " + " ".join(f"{a} {self.group(a).rank}/{self.group(a).size}" for a in axes)


def _tp_block_names(tp: int) -> set[str]:
    return {f"tp/{r}" for r in range(2, tp) if tp % r == 0}


def _mesh_group(name: str, submesh, stats: CommStats) -> CommGroup:
    group = submesh.get_group()
    return CommGroup(name=name, group=group, size=submesh.size(), rank=submesh.get_local_rank(),
                     ranks=tuple(dist.get_process_group_ranks(group)), stats=stats)


def _enumerated_group(name: str, sizes: ParallelSizes, rank: int, stats: CommStats) -> CommGroup:
    """A group that is no mesh view: every rank creates every instance of it, in the same order,
    because new_group is collective over the whole world."""
    mine = group_ranks(sizes, rank, name)
    if len(mine) == 1:
        return CommGroup.single(name, stats)
    instances = sorted({g for g in (group_ranks(sizes, r, name) for r in range(sizes.world_size)) if len(g) > 1})
    handle = None
    for ranks in instances:
        created = dist.new_group(list(ranks))
        if ranks == mine:
            handle = created
    return CommGroup(name, handle, len(mine), mine.index(rank), mine, stats)
