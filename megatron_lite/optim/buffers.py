"""Contiguous parameter and gradient storage per model chunk, cut into buckets for the DP reduction.

Parameters are laid out in reverse registration order, roughly the order in which backward makes
their gradients final, so buckets complete one after another and each can be reduced while backward
goes on. Every parameter's `.data` becomes a view into `param_data` (model dtype) and it gets a
`main_grad` view into `grad_data` (always fp32, so bf16/fp16 gradients accumulate over microbatches
without rounding). One collective per bucket then moves many small gradients at once, and ZeRO-1
shards ranges of a buffer rather than whole parameters.

Every bucket holds parameters averaged over one data-parallel group (their placement's "avg" reduction:
`dp_cp` for dense parameters, `edp_cp` for experts), which its collective runs over. Each bucket is
padded with zeros (which stay zero: no gradient reaches them, so Adam never moves them) to a multiple of
that group's size, so that it splits into equal shards; rank r of the group owns shard r of every such
bucket (Megatron's distributed-optimizer layout). Buffers have the same layout on every rank of a
pipeline stage (same parameters, same local shapes), so "the same range" means the same elements of the
same parameter on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lite.parallel.sharding import spec_of

FP32_BYTES = 4


@dataclass(eq=False)
class ParamSlot:
    """Where one parameter lives in its chunk's buffers."""

    name: str
    param: torch.nn.Parameter
    start: int  # first element in param_data / grad_data
    bucket: int

    @property
    def end(self) -> int:
        return self.start + self.param.numel()


@dataclass(eq=False)
class Bucket:
    """A contiguous range of a chunk's buffers, reduced over its data-parallel group by one collective."""

    index: int
    start: int
    end: int  # exclusive; end - start is a multiple of the group's size (zero padding at the end)
    slots: list[ParamSlot]
    group: str  # the layout group the bucket is averaged over

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard(self, rank: int, num_shards: int) -> tuple[int, int]:
        """The buffer range of shard `rank` when the bucket is split `num_shards` ways."""
        size = self.numel // num_shards
        return self.start + rank * size, self.start + (rank + 1) * size


def bucket_numel(bucket_size_mb: float) -> int:
    """Elements of fp32 gradient in a bucket of `bucket_size_mb` MiB (at least one)."""
    return max(1, int(bucket_size_mb * 2**20) // FP32_BYTES)


class ChunkBuffer:
    """The parameter and fp32 gradient buffers of one model chunk, and their buckets.

    A bucket closes once it holds at least `bucket_numel` elements, or when the next parameter is
    averaged over another group. Copies of a tied tensor (split over the pipeline ends) get a bucket of
    their own: then the bucket, and so every shard of it, has the same layout on both stages, and
    their gradients can be summed shard by shard after a ZeRO-1 reduce-scatter.
    `group_sizes`: the size of each data-parallel group named by a placement.
    """

    def __init__(self, chunk: torch.nn.Module, index: int, group_sizes: dict[str, int], max_bucket_numel: int):
        self.index = index
        named = [(name, p) for name, p in chunk.named_parameters() if p.requires_grad]
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            raise ValueError(f"model chunk {index} mixes parameter dtypes {sorted(map(str, dtypes))}; one "
                             "buffer per chunk needs a single dtype")
        self.dtype = dtypes.pop() if dtypes else torch.float32
        device = named[0][1].device if named else torch.device("cpu")
        self.slots, self.buckets = _assign(named[::-1], group_sizes, max_bucket_numel)
        self.numel = self.buckets[-1].end if self.buckets else 0
        self.param_data = torch.zeros(self.numel, dtype=self.dtype, device=device)
        self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=device)
        with torch.no_grad():
            for slot in self.slots:
                view = self.param_data[slot.start:slot.end].view_as(slot.param)
                view.copy_(slot.param.data)
                slot.param.data = view
                slot.param.main_grad = self.grad_data[slot.start:slot.end].view_as(slot.param)

    def overlapping(self, lo: int, hi: int) -> list[tuple[ParamSlot, int, int]]:
        """(slot, first, end) for every parameter with elements in buffer range [lo, hi); first and end
        index the parameter's flattened local tensor."""
        return [(slot, max(lo, slot.start) - slot.start, min(hi, slot.end) - slot.start)
                for slot in self.slots if slot.start < hi and lo < slot.end]


def _assign(named, group_sizes: dict[str, int], max_bucket_numel: int):
    slots: list[ParamSlot] = []
    buckets: list[Bucket] = []
    members: list[ParamSlot] = []
    start = offset = 0
    group = None

    def close():
        nonlocal members, start, offset
        if members:
            multiple = group_sizes[group]
            end = start + -(-(offset - start) // multiple) * multiple
            buckets.append(Bucket(len(buckets), start, end, members, group))
            members, start, offset = [], end, end

    for name, param in named:
        spec = spec_of(param)
        alone = spec.tie is not None
        if alone or spec.data_parallel != group:
            close()
        group = spec.data_parallel
        if group not in group_sizes:
            raise ValueError(f"{name}: its gradient is averaged over {group!r}, which is no group of the layout")
        slots.append(ParamSlot(name, param, offset, len(buckets)))
        members.append(slots[-1])
        offset += param.numel()
        if alone or offset - start >= max_bucket_numel:
            close()
    close()
    return slots, buckets
