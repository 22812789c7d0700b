"""Where the tensors a rank holds sit inside the layout-independent tensors of a checkpoint.

A checkpoint stores every parameter (and its optimizer state) as the full, unpadded serial tensor.
A rank's local tensor is a rectangle of it: ShardSpec gives the cut dims, the chunks and the padding
(the vocabulary is padded to a multiple of TP; padding rows are not part of the logical tensor).
Under ZeRO-1 a rank holds elements [first, end) of its *flattened* local tensor, which is not a
rectangle: it is cut here into at most 2*ndim - 1 boxes, each of them contiguous in memory (a partial
row, whole rows, a partial row for a 2-D tensor), so every box is a plain view of the flat state and
DCP reads and writes it in place, with no gather and no copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lite.parallel.sharding import ShardSpec


@dataclass(frozen=True)
class Box:
    """A rectangle of a logical tensor: global `offsets` and `sizes`, and `tensor`, a view of the live
    local data of exactly that shape (DCP writes from it, or reads into it)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tensor: torch.Tensor


def contiguous_boxes(first: int, end: int,
                     shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Cut the flat range [first, end) of a row-major tensor of `shape` into boxes (offsets, sizes,
    flat start), each contiguous in memory: leading dims of size 1, one partial dim, full trailing dims."""
    if not 0 <= first <= end <= math.prod(shape):
        raise ValueError(f"range [{first}, {end}) outside a tensor of shape {shape}")
    if first == end:
        return []
    if not shape:
        return [((), (), 0)]
    rest = tuple(shape[1:])
    inner = math.prod(rest)
    boxes = []

    def row_part(row: int, lo: int, hi: int):  # elements [lo, hi) of one row, recursively
        for off, sizes, start in contiguous_boxes(lo, hi, rest):
            boxes.append(((row,) + off, (1,) + sizes, row * inner + start))

    row = first // inner
    if first % inner:  # a partial row first
        hi = min(end, (row + 1) * inner)
        row_part(row, first - row * inner, hi - row * inner)
        first, row = hi, row + 1
    rows = (end - first) // inner
    if rows:
        boxes.append(((row,) + (0,) * len(rest), (rows,) + rest, first))
        first, row = first + rows * inner, row + rows
    if first < end:  # a partial row last
        row_part(row, 0, end - row * inner)
    return boxes


def global_frame(spec: ShardSpec, local_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(global offset of the local tensor's origin, extent of its real (unpadded) part) per dim."""
    base, valid = [0] * len(local_shape), list(local_shape)
    for shard in spec.shards:
        size = local_shape[shard.dim]
        base[shard.dim] = shard.chunk_index * size
        valid[shard.dim] = max(0, min(size, spec.full_shape[shard.dim] - base[shard.dim]))
    return base, valid


def boxes_of(flat: torch.Tensor, first: int, end: int, spec: ShardSpec, local_shape: tuple[int, ...]) -> list[Box]:
    """The boxes of the logical tensor held by `flat`, elements [first, end) of the flattened local
    tensor (of `local_shape`); padding is left out."""
    if flat.dim() != 1 or flat.numel() != end - first:
        raise ValueError(f"expected a 1-D tensor of {end - first} elements, got shape {tuple(flat.shape)}")
    base, valid = global_frame(spec, local_shape)
    out = []
    for offsets, sizes, start in contiguous_boxes(first, end, local_shape):
        view = flat[start - first:start - first + math.prod(sizes)].view(sizes)
        kept = list(sizes)
        for dim, (off, size) in enumerate(zip(offsets, sizes)):
            kept[dim] = min(off + size, valid[dim]) - off
            if kept[dim] <= 0:
                break
            if kept[dim] < size:
                view = view.narrow(dim, 0, kept[dim])
        else:
            out.append(Box(tuple(o + b for o, b in zip(offsets, base)), tuple(kept), view))
    return out
