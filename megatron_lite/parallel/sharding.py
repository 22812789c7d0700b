"""The placement every parameter carries: its full (serial) shape, which piece of it this rank holds
(cuts along named mesh axes), how its gradient is reduced, and whether it is a copy of a tied tensor.

This is what makes initialisation, gradient comparison and checkpoints independent of the layout:
a full parameter is defined once (by name and init rule), and each rank's tensor is a pure function
of it and the rank's coordinates. Gradient sync, ZeRO-1, the global norm and checkpoint ownership
read the same descriptor (`spec_of(param)`), so a new kind of parameter (an expert sharded over `ep`
and averaged over `edp`) needs no special case anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup


DENSE_DATA_PARALLEL = "dp_cp"  # dense gradients: averaged over the data (and context) parallel ranks
EXPERT_DATA_PARALLEL = "edp_cp"  # expert gradients: over the DP ranks that hold the same experts
BASE_AXES = ("edp", "ep", "cp", "tp")  # the axes a parameter can be replicated over (pp: one stage each)
_VIEW_PARTS = {"dp": ("edp", "ep"), "dp_cp": ("edp", "ep", "cp"), "edp_cp": ("edp", "cp")}


@dataclass(frozen=True)
class Shard:
    """Dim `dim` of the (padded) full tensor is cut into `num_chunks` pieces over the ranks of `axis`;
    with fewer pieces than ranks, `replicas` consecutive ranks of the axis hold the same piece."""

    dim: int
    axis: str
    num_chunks: int
    chunk_index: int
    axis_size: int
    padded_size: int | None = None  # size of `dim` after zero padding (vocabulary padded to a multiple of TP)

    @property
    def replicas(self) -> int:
        return self.axis_size // self.num_chunks


@dataclass(frozen=True)
class Reduction:
    """A reduction of the gradient over the layout group `group`: "avg" (the data-parallel average,
    bucketed and overlapped with backward; ZeRO-1 shards the optimizer over this group) or "sum" (ranks
    of the group hold partial gradients of the same values: replicated KV heads, sequence-parallel norm
    weights, the two halves of a tied embedding; summed after the average)."""

    group: str
    op: str


@dataclass(frozen=True)
class Tie:
    """The parameter is one of several copies of the same tensor on different pipeline stages (a tied
    input/output embedding). `key` names that tensor (checkpoint key and init stream); only the primary
    copy counts in the norm and is written to checkpoints."""

    key: str
    primary: bool


@dataclass(frozen=True)
class ShardSpec:
    """Where one parameter lives and how its gradient becomes final; every consumer (initialisation,
    gradient sync, ZeRO-1, clipping, checkpoints) reads this descriptor and nothing else.

    full_shape:  the full, unpadded serial tensor.
    shards:      (dim, axis) cuts of it held by this rank (none: every rank holds the whole tensor).
    reductions:  how the gradient is reduced: one "avg" over a data-parallel group first, then "sum"s.
    tie:         set on the copies of a tied tensor.
    init:        "normal" (std), "zeros" or "ones"; applied to the full tensor, padding stays zero.
    init_name:   name whose seed stream generates the values (default: the parameter's own name).
    """

    full_shape: tuple[int, ...]
    shards: tuple[Shard, ...] = ()
    reductions: tuple[Reduction, ...] = (Reduction(DENSE_DATA_PARALLEL, "avg"),)
    tie: Tie | None = None
    init: str = "normal"
    std: float = 0.02
    init_name: str | None = None

    def __post_init__(self):
        dims = [s.dim for s in self.shards]
        if len(set(dims)) != len(dims) or len({s.axis for s in self.shards}) != len(self.shards):
            raise ValueError(f"a parameter is cut at most once per dim and per axis, got {self.shards}")
        for s in self.shards:
            if not 0 <= s.dim < len(self.full_shape):
                raise ValueError(f"shard dim {s.dim} outside a tensor of shape {self.full_shape}")
            if s.num_chunks < 1 or s.num_chunks > s.axis_size or s.axis_size % s.num_chunks:
                raise ValueError(f"cannot cut dim {s.dim} into {s.num_chunks} pieces over {s.axis}={s.axis_size} "
                                 f"ranks: the number of pieces must divide the axis size")
            padded = s.padded_size if s.padded_size is not None else self.full_shape[s.dim]
            if padded < self.full_shape[s.dim] or padded % s.num_chunks:
                raise ValueError(f"dim {s.dim} of size {self.full_shape[s.dim]} (padded {padded}) does not split "
                                 f"into {s.num_chunks} equal pieces")
            if not 0 <= s.chunk_index < s.num_chunks:
                raise ValueError(f"chunk {s.chunk_index} of {s.num_chunks}")
        ops = [r.op for r in self.reductions]
        if any(op not in ("avg", "sum") for op in ops) or ops.count("avg") > 1 or "avg" in ops[1:]:
            raise ValueError(f"reductions must be one 'avg' first, then 'sum's, got {self.reductions}")

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        for s in self.shards:
            shape[s.dim] = self._padded(s) // s.num_chunks
        return tuple(shape)

    def _padded(self, s: Shard) -> int:
        return s.padded_size if s.padded_size is not None else self.full_shape[s.dim]

    def shard_on(self, axis: str) -> Shard | None:
        return next((s for s in self.shards if s.axis == axis), None)

    @property
    def data_parallel(self) -> str | None:
        """The group the gradient is averaged over (and ZeRO-1 shards the optimizer state over)."""
        return self.reductions[0].group if self.reductions and self.reductions[0].op == "avg" else None

    @property
    def partial_sums(self) -> tuple[str, ...]:
        return tuple(r.group for r in self.reductions if r.op == "sum")

    # The TP cut, for code that deals with tensor parallelism alone (gathers, tests).
    @property
    def dim(self) -> int | None:
        tp = self.shard_on("tp")
        return None if tp is None else tp.dim

    @property
    def num_chunks(self) -> int:
        tp = self.shard_on("tp")
        return 1 if tp is None else tp.num_chunks

    @property
    def chunk_index(self) -> int:
        tp = self.shard_on("tp")
        return 0 if tp is None else tp.chunk_index

    @property
    def padded_dim_size(self) -> int:
        return self._padded(self.shard_on("tp"))



def tp_shard(dim: int, tp: CommGroup, num_chunks: int | None = None, padded_size: int | None = None) -> Shard:
    """Cut `dim` over TP (default one piece per rank; fewer: consecutive ranks share a piece)."""
    num_chunks = num_chunks or tp.size
    if num_chunks > tp.size or tp.size % num_chunks:
        raise ValueError(f"cannot cut into {num_chunks} pieces over tp={tp.size}: the number of pieces must divide "
                         "the TP size")
    return Shard(dim, "tp", num_chunks, tp.rank * num_chunks // tp.size, tp.size, padded_size)


def partial_over_tp(replicas: int, tp_size: int) -> str:
    """The group summing a gradient held partially by `replicas` consecutive TP ranks."""
    return "tp" if replicas == tp_size else f"tp/{replicas}"


def _reductions(partial: str | None, data_parallel: str = DENSE_DATA_PARALLEL) -> tuple[Reduction, ...]:
    return (Reduction(data_parallel, "avg"),) + ((Reduction(partial, "sum"),) if partial else ())


def column_spec(full_shape, tp: CommGroup, num_chunks: int | None = None, **kwargs) -> ShardSpec:
    """Shard dim 0 (output features); with num_chunks < tp.size, consecutive TP ranks share a chunk and
    hold partial gradients of it."""
    shard = tp_shard(0, tp, num_chunks)
    partial = partial_over_tp(shard.replicas, tp.size) if shard.replicas > 1 else None
    return ShardSpec(full_shape=tuple(full_shape), shards=(shard,), reductions=_reductions(partial), **kwargs)


def row_spec(full_shape, tp: CommGroup, **kwargs) -> ShardSpec:
    return ShardSpec(full_shape=tuple(full_shape), shards=(tp_shard(1, tp),), **kwargs)


def replicated_spec(full_shape, partial_over_tp: bool = False, **kwargs) -> ShardSpec:
    """Whole on every TP rank; `partial_over_tp`: each TP rank's gradient is a part of the sum (its
    sequence slice under SP)."""
    return ShardSpec(full_shape=tuple(full_shape), reductions=_reductions("tp" if partial_over_tp else None), **kwargs)


def tied(spec: ShardSpec, key: str, primary: bool) -> ShardSpec:
    """The spec of one copy of a tied tensor split over the pipeline ends: its gradient is summed with
    the other copy's over the embedding group, its values start from `key`'s init stream."""
    return replace(spec, tie=Tie(key, primary), init_name=key,
                   reductions=spec.reductions + (Reduction("embedding", "sum"),))


def holds_canonical_copy(spec: ShardSpec, coordinates: dict[str, int], sizes, partitioned: bool = False,
                         axes: tuple[str, ...] = BASE_AXES) -> bool:
    """Whether this rank holds the copy of its values that counts once among the ranks that differ only
    along `axes` (global norm: the axes it is summed over; checkpoint writer: all of them): the first of
    the ranks holding the same values along every such axis the parameter is replicated over; along the
    axes of its data-parallel group every rank counts when `partitioned` (ZeRO-1: each holds another part
    of the state). A tied tensor counts on its primary copy only."""
    if spec.tie is not None and not spec.tie.primary:
        return False
    data_parallel = _VIEW_PARTS.get(spec.data_parallel, (spec.data_parallel,)) if partitioned else ()
    for axis in axes:
        if getattr(sizes, axis) == 1:
            continue
        shard = spec.shard_on(axis)
        if shard is not None:
            if coordinates[axis] % shard.replicas:
                return False
        elif axis not in data_parallel and coordinates[axis] != 0:
            return False
    return True


def make_param(spec: ShardSpec, dtype=torch.float32, device=None) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.empty(spec.local_shape, dtype=dtype, device=device))
    param.shard_spec = spec
    return param


def spec_of(param: torch.Tensor) -> ShardSpec:
    spec = getattr(param, "shard_spec", None)
    if spec is None:
        return replicated_spec(tuple(param.shape))
    return spec


def _pad(full: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if size == full.shape[dim]:
        return full
    pad_shape = list(full.shape)
    pad_shape[dim] = size - full.shape[dim]
    return torch.cat([full, full.new_zeros(pad_shape)], dim=dim)


def shard_of(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's piece of a full serial tensor (the inverse of `unshard`)."""
    if tuple(full.shape) != spec.full_shape:
        raise ValueError(f"full tensor shape {tuple(full.shape)} does not match spec {spec.full_shape}")
    for s in spec.shards:
        full = _pad(full, s.dim, spec._padded(s)).chunk(s.num_chunks, dim=s.dim)[s.chunk_index]
    return full.contiguous()


def unshard(chunks: list[torch.Tensor], spec: ShardSpec, axis: str = "tp") -> torch.Tensor:
    """The tensor whose `axis` cut is undone, from its chunks listed in chunk order (padding dropped)."""
    shard = spec.shard_on(axis)
    if shard is None:
        return chunks[0]
    full = torch.cat(chunks, dim=shard.dim)
    return full.narrow(shard.dim, 0, spec.full_shape[shard.dim])


def seed_for(seed: int, name: str) -> int:
    """A stable 63-bit seed per (run seed, parameter name); Python's hash() is salted per process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_value(name: str, spec: ShardSpec, seed: int) -> torch.Tensor:
    """The full serial tensor a parameter starts from; identical for every layout."""
    if spec.init == "zeros":
        return torch.zeros(spec.full_shape)
    if spec.init == "ones":
        return torch.ones(spec.full_shape)
    if spec.init != "normal":
        raise ValueError(f"unknown init {spec.init!r} for {name}")
    generator = torch.Generator().manual_seed(seed_for(seed, spec.init_name or name))
    return torch.randn(spec.full_shape, generator=generator) * spec.std


@torch.no_grad()
def initialize_parameters(module: torch.nn.Module, seed: int) -> None:
    """Generate each full parameter from (seed, name) and keep this rank's shard.

    Costs one full tensor at a time on the CPU; fine up to the sizes whose single largest parameter
    fits in host memory, which covers every model in conf/.
    """
    for name, param in module.named_parameters():
        spec = spec_of(param)
        if tuple(param.shape) != spec.local_shape:
            raise ValueError(f"{name}: local shape {tuple(param.shape)} does not match its placement {spec.local_shape}")
        param.copy_(shard_of(full_init_value(name, spec, seed), spec).to(param.dtype))


def gather_full(tensor: torch.Tensor, spec: ShardSpec, groups) -> torch.Tensor:
    """The full serial tensor from every rank's piece (one all-gather per cut axis); padding dropped.
    `groups`: the TP group (a tensor cut over TP only) or the layout (any cut)."""
    group_of = (lambda axis: groups) if isinstance(groups, CommGroup) else groups.group
    full = tensor.detach()
    for shard in reversed(spec.shards):
        g = group_of(shard.axis)
        if g.size == 1:
            full = unshard([full], spec, shard.axis)
            continue
        pieces = comm.all_gather(full.unsqueeze(0), g, dim=0)
        full = unshard([pieces[c * shard.replicas] for c in range(shard.num_chunks)], spec, shard.axis)
    return full
