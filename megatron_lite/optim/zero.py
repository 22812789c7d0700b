"""ZeRO-1: the part of a chunk's buffers whose optimizer update this rank performs.

With ZeRO-1 a rank updates shard r of every bucket (r = its rank in the bucket's data-parallel group:
DP for dense parameters, expert-DP for experts), so the fp32 master weights and Adam's two moments
cost 1/DP of the memory; the gradient arrives there by reduce-scatter and the
updated parameters leave by all-gather. Without ZeRO-1 the shard is the whole buffer: the same code
with one shard, no gather.

Optimizer state is kept flat per chunk ([numel of this rank's ranges], fp32) and viewed two ways:
per owned range (one per bucket under ZeRO-1; the update runs range by range), and per piece, the
elements [first, end) of one parameter's flattened local tensor that fall into an owned range, which
is how state is addressed from outside (parameter name + ShardSpec + range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lite.optim.adamw import adamw_, uses_weight_decay
from megatron_lite.optim.buffers import ChunkBuffer, ParamSlot


@dataclass(eq=False)
class Piece:
    """Elements [first, end) of one parameter's flattened local tensor that this rank updates."""

    slot: ParamSlot
    first: int
    end: int
    grad: torch.Tensor  # views of those elements in each buffer
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


@dataclass(eq=False)
class OwnedRange:
    """Buffer elements [lo, hi) this rank updates, as views."""

    lo: int
    hi: int
    grad: torch.Tensor
    params: torch.Tensor  # the model's parameters (model dtype)
    master: torch.Tensor  # fp32; the parameters themselves when they are fp32
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    decayed: list[torch.Tensor]  # views of `master` that get weight decay


class BufferShard:
    def __init__(self, buffer: ChunkBuffer, groups: dict | None = None):
        """groups: ZeRO-1's data-parallel groups by name (each bucket is sharded over its own); None: the
        whole buffer is this rank's."""
        self.buffer = buffer
        if groups is None or all(groups[b.group].size == 1 for b in buffer.buckets):
            bounds = [(0, buffer.numel)] if buffer.numel else []
        else:
            bounds = [bucket.shard(groups[bucket.group].rank, groups[bucket.group].size) for bucket in buffer.buckets]
        self.numel = sum(hi - lo for lo, hi in bounds)
        device = buffer.grad_data.device
        self.exp_avg = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(self.numel, dtype=torch.float32, device=device)
        # fp32 parameters are their own master weights; bf16/fp16 ones get an fp32 copy of this shard.
        self.master = None if buffer.dtype == torch.float32 else torch.cat(
            [buffer.param_data[lo:hi].float() for lo, hi in bounds] or [torch.zeros(0, device=device)])
        self.ranges: list[OwnedRange] = []
        self.pieces: list[Piece] = []
        offset = 0
        for lo, hi in bounds:
            state = slice(offset, offset + hi - lo)
            master = buffer.param_data[lo:hi] if self.master is None else self.master[state]
            owned = OwnedRange(lo, hi, buffer.grad_data[lo:hi], buffer.param_data[lo:hi], master,
                               self.exp_avg[state], self.exp_avg_sq[state], [])
            for slot, first, end in buffer.overlapping(lo, hi):
                at = slice(slot.start + first - lo, slot.start + end - lo)  # within this range
                piece = Piece(slot, first, end, owned.grad[at], owned.master[at], owned.exp_avg[at],
                              owned.exp_avg_sq[at])
                self.pieces.append(piece)
                if uses_weight_decay(slot.param):
                    owned.decayed.append(piece.master)
            self.ranges.append(owned)
            offset += hi - lo

    def state_numel(self) -> int:
        """fp32 optimizer-state elements this rank allocates for the chunk (moments, separate master)."""
        return self.exp_avg.numel() + self.exp_avg_sq.numel() + (0 if self.master is None else self.master.numel())

    @torch.no_grad()
    def adamw(self, *, step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        for owned in self.ranges:
            adamw_(owned.master, owned.grad, owned.exp_avg, owned.exp_avg_sq, owned.decayed, step=step, lr=lr,
                   betas=betas, eps=eps, weight_decay=weight_decay)
            if self.master is not None:
                owned.params.copy_(owned.master)  # round the fp32 master weights to the model dtype
