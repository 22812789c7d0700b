"""Make every gradient final after the backward passes of a step, as each parameter's placement says.

1. The "avg" reduction (data parallelism): each chunk's fp32 gradient buffer is averaged bucket by
   bucket over the bucket's group (`dp_cp` for dense parameters, `edp_cp` for experts), an all-reduce
   (or, for ZeRO-1, a reduce-scatter leaving each rank its shard), started as soon as the bucket's
   gradients are final during the last microbatch's backward and waited for at the end.
2. The "sum" reductions: partial gradients over TP (replicated KV heads: over the TP ranks holding the
   same chunk; sequence-parallel norms: over all of TP) and the copies of a tied embedding on the
   pipeline ends, summed over their group.

2 commutes with the average and runs after it, on the elements this rank holds reduced (everything,
or its ZeRO-1 shard), which keeps it out of the backward critical path.
"""

from __future__ import annotations

import torch

from megatron_lite.optim.buffers import ChunkBuffer, ParamSlot
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.sharding import ShardSpec


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

    def __init__(self, buffers: list[ChunkBuffer], groups: dict[str, CommGroup], reduce_scatter: bool):
        """groups: the data-parallel group of every bucket, by name."""
        self.buffers, self.groups, self.reduce_scatter = buffers, groups, reduce_scatter
        self.launch_order: list[tuple[int, int]] = []  # (chunk, bucket) as started this step
        self._in_last_backward = [False] * len(buffers)
        self._missing: list[list[int]] = []  # per chunk, per bucket: parameters not yet final
        self._pending: dict[tuple[int, int], comm.PendingCollective] = {}
        self._hooks, self._unhooked = [], []  # a hook costs a Python call per parameter and microbatch
        for buffer in buffers:
            for slot in buffer.slots:
                reduced = groups[buffer.buckets[slot.bucket].group].size > 1
                if reduced or not _accumulates_in_place(slot.param):
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
        self._pending[key] = start(grads, self.groups[bucket.group], op="avg")
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
            bucket = self.buffers[chunk].buckets[index]
            group = self.groups[bucket.group]
            if self.reduce_scatter and group.size > 1:
                lo, hi = bucket.shard(group.rank, group.size)
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


def sum_partial_grads(pieces: list[tuple[str, ShardSpec, torch.Tensor]], group_of) -> None:
    """Apply every "sum" reduction: `pieces` are (name, placement, gradient elements this rank holds
    reduced), listed in the same order on every rank of a stage; `group_of(name)` gives a layout group.

    One all-reduce per group over the concatenated pieces. Groups run in the order of their names on
    every rank, so two ranks that share several groups meet in them in the same order. Copies of one
    tied tensor on this rank (pp=1 with several chunks) are summed locally first.
    """
    by_group: dict[str, dict[str, list[torch.Tensor]]] = {}
    for name, spec, grad in pieces:
        key = spec.tie.key if spec.tie is not None else name
        for group in spec.partial_sums:
            by_group.setdefault(group, {}).setdefault(key, []).append(grad)
    for group_name in sorted(by_group):
        group = group_of(group_name)
        entries = list(by_group[group_name].values())
        if group.size == 1 and all(len(grads) == 1 for grads in entries):
            continue
        flat = torch.cat([(grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)).reshape(-1)
                          for grads in entries])
        comm.all_reduce(flat, group)
        offset = 0
        for grads in entries:
            numel = grads[0].numel()
            for grad in grads:
                grad.view(-1).copy_(flat[offset:offset + numel])
            offset += numel
