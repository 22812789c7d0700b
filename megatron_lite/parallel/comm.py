"""Every collective and point-to-point transfer of the framework goes through this module.

Each call is counted (payload bytes and calls per group and operation) in the `CommStats` of the
layout, so tests can check communication volume against analytic formulas. Groups of size one
short-circuit without touching torch.distributed, so the serial reference runs the same code.

The autograd regions are Megatron's conjugate pairs:
  copy_to_group          identity forward, all-reduce backward   (enter a column-parallel block)
  reduce_from_group      all-reduce forward, identity backward   (leave a row-parallel block)
  gather_from_sequence   all-gather forward, reduce-scatter backward (SP: enter a column block)
  reduce_scatter_to_sequence  reduce-scatter forward, all-gather backward (SP: leave a row block)
  scatter_to_sequence    split forward, all-gather backward       (SP: after the embedding; any dim)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch 2.13 renamed these; older releases (still common on GPU clusters) only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Payload bytes and call counts per (group name, operation)."""

    bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def record(self, group: str, op: str, tensor: torch.Tensor) -> None:
        self.bytes[(group, op)] += tensor.numel() * tensor.element_size()
        self.calls[(group, op)] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def report(self) -> dict[str, int]:
        return {f"{group}/{op}": n for (group, op), n in sorted(self.bytes.items())}


@dataclass
class CommGroup:
    """One process group with this rank's position in it and the shared byte counter."""

    name: str
    group: object | None
    size: int
    rank: int
    ranks: tuple[int, ...]
    stats: CommStats

    @classmethod
    def single(cls, name: str, stats: CommStats) -> "CommGroup":
        return cls(name=name, group=None, size=1, rank=0, ranks=(0,), stats=stats)


# ----------------------------------------------------------------------------- plain collectives


def all_reduce(tensor: torch.Tensor, g: CommGroup, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce; op in {sum, max, avg}. Returns the tensor."""
    if g.size == 1:
        return tensor
    g.stats.record(g.name, "all_reduce", tensor)
    if op == "avg":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=g.group)
        tensor.div_(g.size)
    else:
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op, group=g.group)
    return tensor


def all_gather(tensor: torch.Tensor, g: CommGroup, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's tensor along `dim` (in group-rank order)."""
    if g.size == 1:
        return tensor
    g.stats.record(g.name, "all_gather", tensor)
    chunk = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((g.size * chunk.shape[0],) + tuple(chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
    _all_gather_single(out, chunk, group=g.group)
    return out.movedim(0, dim)


def reduce_scatter(tensor: torch.Tensor, g: CommGroup, dim: int = 0) -> torch.Tensor:
    """Sum over ranks, each keeping its own slice of `dim` (which must divide by the group size)."""
    if g.size == 1:
        return tensor
    if tensor.shape[dim] % g.size:
        raise ValueError(f"reduce_scatter over {g.name}: dim {dim} of size {tensor.shape[dim]} is not divisible by {g.size}")
    g.stats.record(g.name, "reduce_scatter", tensor)
    full = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((full.shape[0] // g.size,) + tuple(full.shape[1:]), dtype=full.dtype, device=full.device)
    _reduce_scatter_single(out, full, group=g.group)
    return out.movedim(0, dim)


def split_for_rank(tensor: torch.Tensor, g: CommGroup, dim: int) -> torch.Tensor:
    """This rank's slice of `dim`; no communication."""
    if g.size == 1:
        return tensor
    if tensor.shape[dim] % g.size:
        raise ValueError(f"cannot split dim {dim} of size {tensor.shape[dim]} over {g.name}={g.size}")
    return tensor.chunk(g.size, dim=dim)[g.rank].contiguous()


def barrier() -> None:
    """Wait for every rank of the job (no-op without torch.distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(tensor: torch.Tensor, g: CommGroup, src_group_rank: int = 0) -> torch.Tensor:
    if g.size == 1:
        return tensor
    g.stats.record(g.name, "broadcast", tensor)
    dist.broadcast(tensor, src=g.ranks[src_group_rank], group=g.group)
    return tensor


# ----------------------------------------------------------------------------- autograd regions


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.g), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        return all_reduce(x.contiguous(), g)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, dim):
        ctx.g, ctx.dim = g, dim
        return all_gather(x, g, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.g, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, dim):
        ctx.g, ctx.dim = g, dim
        return reduce_scatter(x, g, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.g, ctx.dim), None, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, dim):
        ctx.g, ctx.dim = g, dim
        return split_for_rank(x, g, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.g, ctx.dim), None, None


def copy_to_group(x: torch.Tensor, g: CommGroup) -> torch.Tensor:
    return x if g.size == 1 else _CopyToGroup.apply(x, g)


def reduce_from_group(x: torch.Tensor, g: CommGroup) -> torch.Tensor:
    return x if g.size == 1 else _ReduceFromGroup.apply(x, g)


def gather_from_sequence(x: torch.Tensor, g: CommGroup, dim: int = 1) -> torch.Tensor:
    return x if g.size == 1 else _GatherFromSequence.apply(x, g, dim)


def reduce_scatter_to_sequence(x: torch.Tensor, g: CommGroup, dim: int = 1) -> torch.Tensor:
    return x if g.size == 1 else _ReduceScatterToSequence.apply(x, g, dim)


def scatter_to_sequence(x: torch.Tensor, g: CommGroup, dim: int = 1) -> torch.Tensor:
    return x if g.size == 1 else _ScatterToSequence.apply(x, g, dim)


# ----------------------------------------------------------------------------- point to point


@dataclass(frozen=True)
class P2POp:
    """One send or receive of a pipeline transfer; `peer` is a rank within the group `g`."""

    is_send: bool
    tensor: torch.Tensor
    peer: int
    tag: int = 0


def start_p2p(ops: list[P2POp], g: CommGroup) -> list:
    """Post sends and receives together (one batch, as NCCL needs to avoid ordering deadlocks).

    Returns the work handles; the caller waits on a receive before using its buffer and keeps a
    send's tensor alive until its handle completes.
    """
    if not ops:
        return []
    batch = []
    for op in ops:
        g.stats.record(g.name, "send" if op.is_send else "recv", op.tensor)
        fn = dist.isend if op.is_send else dist.irecv
        batch.append(dist.P2POp(fn, op.tensor, peer=g.ranks[op.peer], group=g.group, tag=op.tag))
    return dist.batch_isend_irecv(batch)


def all_gather_object(obj, g: CommGroup) -> list:
    """Every rank's picklable object, in group-rank order (for metadata, never for hot paths)."""
    if g.size == 1:
        return [obj]
    out = [None] * g.size
    g.stats.calls[(g.name, "all_gather_object")] += 1
    dist.all_gather_object(out, obj, group=g.group)
    return out
