"""Make every gradient final after the backward passes of a step.

1. Partial gradients over TP (replicated KV heads, sequence-parallel norms): summed over the TP ranks
   that hold the same chunk.
2. Tied input/output embeddings split over the pipeline ends: their two gradients summed.
3. Data parallelism: gradients averaged over DP with one coalesced all-reduce per dtype (the simple,
   correct version; the bucketed, overlapped one replaces it later).
"""

from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.sharding import spec_of


def sum_partial_tp_grads(params: list[torch.nn.Parameter], layout: ParallelLayout) -> None:
    """Sum gradients that each TP rank only holds a part of, over the ranks sharing the same chunk.

    One all-reduce over the whole TP group serves every replica subgroup: each rank writes its
    gradient into the slot of its chunk, zeros elsewhere, so the sum in a slot runs over exactly the
    ranks that hold that chunk.
    """
    tp = layout.tp
    if tp.size == 1:
        return
    for param in params:
        spec = spec_of(param)
        if not spec.grad_sum_over_tp or param.grad is None:
            continue
        slots = param.grad.new_zeros((spec.num_chunks,) + tuple(param.grad.shape))
        slots[spec.chunk_index] = param.grad
        comm.all_reduce(slots, tp)
        param.grad.copy_(slots[spec.chunk_index])


def average_dp_grads(params: list[torch.nn.Parameter], layout: ParallelLayout) -> None:
    if layout.dp.size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = comm.all_reduce(_flatten_dense_tensors(grads), layout.dp, op="avg")
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)


def sum_tied_embedding_grads(chunks: list[torch.nn.Module], layout: ParallelLayout) -> None:
    """First and last pipeline stage each hold a copy of a tied embedding: both get the sum."""
    halves = [w for w in (chunk.tied_embedding_weight() for chunk in chunks) if w is not None]
    if not halves:
        return
    total = halves[0].grad if len(halves) == 1 else torch.stack([w.grad for w in halves]).sum(0)
    comm.all_reduce(total, layout.embedding)
    for weight in halves:
        weight.grad.copy_(total)


def finalize_grads(chunks: list[torch.nn.Module], layout: ParallelLayout) -> None:
    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    sum_partial_tp_grads(params, layout)
    sum_tied_embedding_grads(chunks, layout)
    average_dp_grads(params, layout)
