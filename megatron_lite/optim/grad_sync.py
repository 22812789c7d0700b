"""Make every gradient final after the backward passes of a step.

1. Data parallelism: each chunk's fp32 gradient buffer is averaged over DP bucket by bucket, an
   all-reduce (or, for ZeRO-1, a reduce-scatter leaving each rank its shard), started as soon as the
   bucket's gradients are final during the last microbatch's backward and waited for at the end.
2. Partial gradients over TP (replicated KV heads, sequence-parallel norms): summed over the TP ranks
   that hold the same chunk.
3. Tied input/output embeddings split over the pipeline ends: their two gradients summed.

2 and 3 are sums, so they commute with the DP average and run after it, on the elements this rank
holds reduced (everything, or its ZeRO-1 shard), which keeps them out of the backward critical path.
"""

from __future__ import annotations

import torch

from megatron_lite.optim.buffers import ChunkBuffer, ParamSlot
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.sharding import spec_of


class BucketedGradSync:
    """Accumulates gradients into the chunk buffers and reduces them over DP, overlapped with backward.

    An fp32 parameter's `.grad` is its `main_grad` view itself, so autograd accumulates every
    microbatch in place in the buffer (as DDP's gradient_as_bucket_view); a bf16/fp16 parameter's
    `.grad` is added into its fp32 `main_grad` by a post-accumulate-grad hook and freed. Parameters
    need the hook only for that, or to count toward a bucket's DP reduction (DP > 1). Until
    `before_last_backward(chunk)` is called nothing is communicated; after it, a hook that completes a
    bucket of that chunk starts the bucket's reduction. Every DP rank runs the same graphs, so buckets
    start in the same order everywhere, as collectives require. `finish()` starts any bucket still
    waiting (a parameter that received no gradient; or nobody called `before_last_backward`, the plain
    non-overlapped path) and waits for all of them.
    """

    def __init__(self, buffers: list[ChunkBuffer], dp: CommGroup, reduce_scatter: bool):
        self.buffers, self.dp, self.reduce_scatter = buffers, dp, reduce_scatter
        self.launch_order: list[tuple[int, int]] = []  # (chunk, bucket) as started this step
        self._in_last_backward = [False] * len(buffers)
        self._missing: list[list[int]] = []  # per chunk, per bucket: parameters not yet final
        self._pending: dict[tuple[int, int], comm.PendingCollective] = {}
        self._hooks, self._unhooked = [], []  # a hook costs a Python call per parameter and microbatch
        for buffer in buffers:
            for slot in buffer.slots:
                if dp.size > 1 or not _accumulates_in_place(slot.param):
                    self._hooks.append(slot.param.register_post_accumulate_grad_hook(self._hook(buffer.index, slot)))
                else:
                    self._unhooked.append(slot.param)
        self.reset()

    def reset(self) -> None:
        """Zero the gradient buffers and forget the last step (call before the first backward)."""
        if self._pending:
            raise RuntimeError("gradient reductions still in flight; call finish() before starting a new step")
        for buffer in self.buffers:
            buffer.grad_data.zero_()
            for slot in buffer.slots:
                slot.param.grad = slot.param.main_grad if _accumulates_in_place(slot.param) else None
        self._in_last_backward = [False] * len(self.buffers)
        self._missing = [[len(b.slots) for b in buffer.buckets] for buffer in self.buffers]
        self.launch_order = []

    def before_last_backward(self, chunk: int) -> None:
        """The executor's signal: the next backward of `chunk` is its last microbatch's."""
        self._in_last_backward[chunk] = True

    def _hook(self, chunk: int, slot: ParamSlot):
        def accumulate(param: torch.nn.Parameter) -> None:
            _settle_in_main_grad(param)
            if self._in_last_backward[chunk]:
                self._missing[chunk][slot.bucket] -= 1
                if self._missing[chunk][slot.bucket] == 0:
                    self._launch(chunk, slot.bucket)
        return accumulate

    def _launch(self, chunk: int, index: int) -> None:
        key = (chunk, index)
        if key in self._pending:
            raise RuntimeError(f"a gradient reached bucket {index} of chunk {chunk} after its reduction started "
                               "(a backward ran after the last microbatch's)")
        bucket = self.buffers[chunk].buckets[index]
        grads = self.buffers[chunk].grad_data[bucket.start:bucket.end]
        start = comm.reduce_scatter_async if self.reduce_scatter else comm.all_reduce_async
        self._pending[key] = start(grads, self.dp, op="avg")
        self.launch_order.append(key)

    def finish(self) -> None:
        """Start what has not started, wait for everything; a ZeRO-1 rank's averaged shard lands in its
        own range of the buffer (the rest of the buffer keeps this rank's unreduced gradients)."""
        for param in self._unhooked:
            _settle_in_main_grad(param)
        for buffer in self.buffers:
            for bucket in buffer.buckets:
                if (buffer.index, bucket.index) not in self._pending:
                    self._launch(buffer.index, bucket.index)
        for (chunk, index), pending in self._pending.items():
            result = pending.wait()
            if self.reduce_scatter and self.dp.size > 1:
                lo, hi = self.buffers[chunk].buckets[index].shard(self.dp.rank, self.dp.size)
                self.buffers[chunk].grad_data[lo:hi].copy_(result)
        self._pending = {}


def _accumulates_in_place(param: torch.nn.Parameter) -> bool:
    """Autograd adds into an existing `.grad` in place, so a `.grad` that is the fp32 buffer view
    accumulates there directly; other dtypes need the fp32 copy."""
    return param.dtype == param.main_grad.dtype


@torch.no_grad()
def _settle_in_main_grad(param: torch.nn.Parameter) -> None:
    """After autograd accumulated a gradient: make sure the fp32 buffer holds the running sum."""
    grad = param.grad
    if grad is param.main_grad or grad is None:
        return
    if _accumulates_in_place(param):  # autograd summed out of place (a backward with create_graph=True)
        param.main_grad.copy_(grad)
        param.grad = param.main_grad
    else:
        param.main_grad.add_(grad)
        param.grad = None


def sum_partial_tp_grads(pieces: list[tuple[ParamSlot, torch.Tensor]], tp: CommGroup) -> None:
    """Sum gradients that each TP rank only holds a part of, over the ranks sharing the same chunk.

    `pieces`: (slot, gradient elements this rank holds reduced), in the same order on every TP rank.
    One all-reduce over the whole TP group serves every replica subgroup: each rank writes its piece
    into the slot of its chunk, zeros elsewhere, so the sum in a slot runs over exactly the ranks that
    hold that chunk.
    """
    partial = [(spec_of(slot.param), grad) for slot, grad in pieces if spec_of(slot.param).grad_sum_over_tp]
    if tp.size == 1 or not partial:
        return
    slots = [grad.new_zeros((spec.num_chunks, grad.numel())) for spec, grad in partial]
    for (spec, grad), slot in zip(partial, slots):
        slot[spec.chunk_index] = grad.view(-1)
    flat = comm.all_reduce(torch.cat([s.view(-1) for s in slots]), tp)
    offset = 0
    for (spec, grad), slot in zip(partial, slots):
        grad.view(-1).copy_(flat[offset:offset + slot.numel()].view_as(slot)[spec.chunk_index])
        offset += slot.numel()


def sum_tied_embedding_grads(halves: list[torch.Tensor], embedding: CommGroup) -> None:
    """First and last pipeline stage each hold a copy of a tied embedding: both get the sum.

    `halves`: the reduced gradient elements of the copies on this rank (one, or two when a rank holds
    both ends); each copy has a bucket of its own, so the elements match across the two stages.
    """
    if len(halves) == 1:
        comm.all_reduce(halves[0], embedding)
    elif halves:
        total = comm.all_reduce(torch.stack(halves).sum(0), embedding)
        for grad in halves:
            grad.copy_(total)
