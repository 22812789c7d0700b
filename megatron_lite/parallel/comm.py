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

import math

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch 2.13 renamed these; older releases (still common on GPU clusters) only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# Bytes a rank sends per byte of the full tensor, for ring algorithms over n ranks.
_WIRE_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,
}


@dataclass
class CommStats:
    """Per (group name, operation): `bytes` of the full tensor each call works on (the all-gathered
    output, the reduce-scattered input), call counts, and `wire_bytes` a rank sends with ring
    algorithms (all-reduce 2(n-1)/n of the tensor, all-gather and reduce-scatter (n-1)/n each)."""

    bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    wire_bytes: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    trace: list[tuple[str, str]] | None = None  # a list: every (group, op) in call order (tests, debugging)

    def record(self, group: str, op: str, tensor: torch.Tensor, group_size: int = 2) -> None:
        self.record_bytes(group, op, tensor.numel() * tensor.element_size(), group_size)

    def record_bytes(self, group: str, op: str, size: int, group_size: int = 2) -> None:
        if self.trace is not None:
            self.trace.append((group, op))
        self.bytes[(group, op)] += size
        self.calls[(group, op)] += 1
        self.wire_bytes[(group, op)] += size * _WIRE_FACTOR.get(op, lambda n: 1.0)(group_size)

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.wire_bytes.clear()

    def report(self) -> dict[str, int]:
        return {f"{group}/{op}": n for (group, op), n in sorted(self.bytes.items())}

    def wire_report(self) -> dict[str, float]:
        """Bytes this rank sent per group (all operations), the figure to compare with link bandwidth."""
        totals: dict[str, float] = defaultdict(float)
        for (group, _), n in self.wire_bytes.items():
            totals[group] += n
        return dict(totals)


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
    g.stats.record(g.name, "all_reduce", tensor, g.size)
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
    chunk = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((g.size * chunk.shape[0],) + tuple(chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
    g.stats.record(g.name, "all_gather", out, g.size)
    _all_gather_single(out, chunk, group=g.group)
    return out.movedim(0, dim)


def reduce_scatter(tensor: torch.Tensor, g: CommGroup, dim: int = 0) -> torch.Tensor:
    """Sum over ranks, each keeping its own slice of `dim` (which must divide by the group size)."""
    if g.size == 1:
        return tensor
    if tensor.shape[dim] % g.size:
        raise ValueError(f"reduce_scatter over {g.name}: dim {dim} of size {tensor.shape[dim]} is not divisible by {g.size}")
    g.stats.record(g.name, "reduce_scatter", tensor, g.size)
    full = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((full.shape[0] // g.size,) + tuple(full.shape[1:]), dtype=full.dtype, device=full.device)
    _reduce_scatter_single(out, full, group=g.group)
    return out.movedim(0, dim)


def all_to_all(tensor: torch.Tensor, g: CommGroup, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows of `tensor` go out in group-rank order, send_counts[j] of them to rank j; returns the
    recv_counts[j] rows from each rank j, in rank order. Zero rows to or from any rank is fine. Counted:
    the bytes this rank sends to the other ranks (its own rows stay here)."""
    if g.size == 1:
        return tensor
    row_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()
    g.stats.record_bytes(g.name, "all_to_all", (sum(send_counts) - send_counts[g.rank]) * row_bytes, g.size)
    out = tensor.new_empty((sum(recv_counts),) + tuple(tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=g.group)
    return out


def exchange_counts(counts: torch.Tensor, g: CommGroup) -> torch.Tensor:
    """counts [g.size, ...]: row j goes to rank j; returns the rows every rank sent here, by rank (the
    sizes an all-to-all of variable length needs first). Counted as `all_to_all_counts`."""
    if g.size == 1:
        return counts
    rows = [1] * g.size
    g.stats.record_bytes(g.name, "all_to_all_counts", (g.size - 1) * counts[0].numel() * counts.element_size(), g.size)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), rows, rows, group=g.group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, send_counts, recv_counts):
        ctx.g, ctx.counts = g, (send_counts, recv_counts)
        return all_to_all(x, g, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return all_to_all(grad.contiguous(), ctx.g, recv_counts, send_counts), None, None, None


def all_to_all_rows(x: torch.Tensor, g: CommGroup, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """`all_to_all` under autograd: the gradient of each row travels back to the rank it came from."""
    return x if g.size == 1 else _AllToAll.apply(x, g, list(send_counts), list(recv_counts))


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
    g.stats.record(g.name, "broadcast", tensor, g.size)
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
        if not op.tensor.is_contiguous():
            raise ValueError("point-to-point tensors must be contiguous (the caller keeps them alive until done)")
        g.stats.record(g.name, "send" if op.is_send else "recv", op.tensor)
        fn = dist.isend if op.is_send else dist.irecv
        batch.append(dist.P2POp(fn, op.tensor, peer=g.ranks[op.peer], group=g.group, tag=op.tag))
    return dist.batch_isend_irecv(batch)


def backend_of(g: CommGroup) -> str | None:
    """The process-group backend of the group ("gloo", "nccl", ...), None for a group of one rank."""
    return None if g.size == 1 else dist.get_backend(g.group)


def all_gather_object(obj, g: CommGroup) -> list:
    """Every rank's picklable object, in group-rank order (for metadata, never for hot paths)."""
    if g.size == 1:
        return [obj]
    out = [None] * g.size
    g.stats.calls[(g.name, "all_gather_object")] += 1
    dist.all_gather_object(out, obj, group=g.group)
    return out


# ----------------------------------------------------------------------------- asynchronous collectives
# The DP gradient reduction runs while backward goes on; these start a collective and hand back what
# to wait on. Bytes are counted when the collective starts, like the blocking ones.


class PendingCollective:
    """A collective in flight. `wait()` blocks until it is done and returns its result; with op="avg"
    it then divides by the group size (gloo has no average reduction)."""

    def __init__(self, work, result: torch.Tensor, divisor: int = 1):
        self._work, self._result, self._divisor = work, result, divisor

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._divisor != 1:
                self._result.div_(self._divisor)
        return self._result


def all_reduce_async(tensor: torch.Tensor, g: CommGroup, op: str = "sum") -> PendingCollective:
    """Start an in-place all-reduce, op in {sum, avg}; the tensor must not be touched until waited on."""
    if op not in ("sum", "avg"):
        raise ValueError(f"all_reduce_async supports op 'sum' or 'avg', got {op!r}")
    if g.size == 1:
        return PendingCollective(None, tensor)
    g.stats.record(g.name, "all_reduce", tensor, g.size)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=g.group, async_op=True)
    return PendingCollective(work, tensor, g.size if op == "avg" else 1)


def reduce_scatter_async(tensor: torch.Tensor, g: CommGroup, op: str = "sum") -> PendingCollective:
    """Start reducing a 1-D tensor over the group, each rank getting its contiguous 1/size slice (a new
    tensor; with one rank, the tensor itself). The length must divide by the group size."""
    if op not in ("sum", "avg"):
        raise ValueError(f"reduce_scatter_async supports op 'sum' or 'avg', got {op!r}")
    if tensor.dim() != 1 or tensor.numel() % g.size:
        raise ValueError(f"reduce_scatter_async over {g.name}: needs a 1-D tensor whose length divides by "
                         f"{g.size}, got shape {tuple(tensor.shape)}")
    if g.size == 1:
        return PendingCollective(None, tensor)
    g.stats.record(g.name, "reduce_scatter", tensor, g.size)
    out = torch.empty(tensor.numel() // g.size, dtype=tensor.dtype, device=tensor.device)
    work = _reduce_scatter_single(out, tensor, group=g.group, async_op=True)
    return PendingCollective(work, out, g.size if op == "avg" else 1)


def all_gather_into(output: torch.Tensor, shard: torch.Tensor, g: CommGroup) -> torch.Tensor:
    """Fill the 1-D `output` with every rank's 1-D `shard` in group-rank order (ZeRO-1 parameter
    gather). `shard` must not alias `output`: not every backend supports in-place gathers."""
    if output.numel() != shard.numel() * g.size:
        raise ValueError(f"all_gather_into over {g.name}: output of {output.numel()} elements for shards of "
                         f"{shard.numel()} x {g.size} ranks")
    if g.size == 1:
        return output.copy_(shard)
    g.stats.record(g.name, "all_gather", output, g.size)
    _all_gather_single(output, shard, group=g.group)
    return output
