"""The optimizer of a training run: gradient buffers, DP sync, ZeRO-1, mixed precision, clipping, AdamW.

One step (`train_step` drives it):
    zero_grad()                          zero the fp32 gradient buffers
    run_schedule(..., loss_scale=opt.loss_scale, before_last_backward=opt.before_last_backward)
                                         gradients accumulate in the buffers (an fp32 parameter's
                                         .grad is its buffer view: after step() it holds what the
                                         buffer holds, final on this rank's ZeRO-1 shard only); buckets
                                         start their DP reduction during the last microbatch's backward
    step()                               wait for the buckets; TP-partial and tied-embedding sums;
                                         unscale (fp16); global norm; skip on inf/nan; clip; AdamW on
                                         this rank's shard in fp32; parameters back in the model dtype
                                         (ZeRO-1: all-gathered over DP)

State layout (`state_dict()`), addressable per parameter so that a checkpoint can be resharded:
    {"step": int,                        AdamW steps taken (skipped steps not counted)
     "loss_scaler": dict | None,         fp16 only
     "params": {name: {                  names are the serial model's (named_parameters of the chunks)
         "shard_spec": ShardSpec,        which part of the full serial tensor this TP rank's local tensor is
         "local_shape": tuple,           shape of that local tensor
         "range": (first, end),          the elements of the flattened local tensor held here
                                         ((0, numel) without ZeRO-1; a DP rank's part with it; a
                                         parameter outside this rank's ZeRO-1 shard is absent)
         "master": fp32 [end - first],   master weights (views of the parameter itself when it is fp32)
         "exp_avg": fp32 [end - first],
         "exp_avg_sq": fp32 [end - first]}}}
The tensors are views of live state; copy them to keep a snapshot. Full tensor = gather the ranges over
DP into local tensors, then the local tensors over TP by ShardSpec (`sharding.unshard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lite.optim.buffers import ChunkBuffer, bucket_numel
from megatron_lite.optim.clip import clip_coefficient, counts_in_norm, global_norm_and_overflow, norm_groups
from megatron_lite.optim.grad_sync import BucketedGradSync, sum_partial_grads
from megatron_lite.optim.mixed_precision import DynamicLossScaler
from megatron_lite.optim.zero import BufferShard
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.sharding import spec_of


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01  # decoupled; not applied to biases and norm weights (adamw.uses_weight_decay)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None  # max global L2 norm; None: no clipping (the norm is still reported)
    zero1: bool = False  # shard master weights and Adam moments over DP
    bucket_size_mb: float = 25.0  # fp32 gradient MiB per DP reduction
    # Dynamic loss scaling, used when the model's parameters are fp16.
    initial_loss_scale: float = 2.0**16
    min_loss_scale: float = 1.0
    loss_scale_growth_interval: int = 1000
    loss_scale_growth_factor: float = 2.0
    loss_scale_backoff_factor: float = 0.5


class DistributedOptimizer:
    """AdamW over this rank's model chunks; every parallel layout takes the same steps as one process."""

    def __init__(self, chunks: list[torch.nn.Module], layout: ParallelLayout, config: OptimizerConfig):
        """chunks: this rank's model stages (see `parallel.stage.ModelStage`); only their parameters and
        the placements these carry are read."""
        self.layout, self.config, self.lr = layout, config, config.lr
        names = {spec_of(p).data_parallel for chunk in chunks for p in chunk.parameters() if p.requires_grad}
        groups = {name: layout.group(name) for name in names}
        self.buffers = [ChunkBuffer(chunk, i, {n: g.size for n, g in groups.items()}, bucket_numel(config.bucket_size_mb))
                        for i, chunk in enumerate(chunks)]
        self._groups = groups
        self.grad_sync = BucketedGradSync(self.buffers, groups, reduce_scatter=config.zero1)
        self.shards = [BufferShard(buffer, groups if config.zero1 else None) for buffer in self.buffers]
        self._pieces = [piece for shard in self.shards for piece in shard.pieces]
        self._partial = [(p.slot.name, spec_of(p.slot.param), p.grad) for p in self._pieces
                         if spec_of(p.slot.param).partial_sums]
        self._piece_grads = [p.grad for p in self._pieces]
        self._counted = torch.tensor([counts_in_norm(p.slot.param, layout, partitioned=config.zero1)
                                      for p in self._pieces], dtype=torch.bool, device=layout.device)
        self._owned_grads = [owned.grad for shard in self.shards for owned in shard.ranges]
        self._norm_groups = norm_groups(layout, config.zero1)
        fp16 = any(buffer.dtype == torch.float16 for buffer in self.buffers)
        self.scaler = DynamicLossScaler(config.initial_loss_scale, config.loss_scale_growth_interval,
                                        config.loss_scale_growth_factor, config.loss_scale_backoff_factor,
                                        config.min_loss_scale) if fp16 else None
        self.steps = 0

    # ------------------------------------------------------------------ what train_step uses

    @property
    def loss_scale(self) -> float:
        """Multiply the loss by this before backward (1 unless the model is fp16)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def before_last_backward(self, chunk: int) -> None:
        """Pass to run_schedule: lets chunk `chunk`'s buckets start reducing during its last backward."""
        self.grad_sync.before_last_backward(chunk)

    def zero_grad(self) -> None:
        """Zero the gradient buffers (fp32 parameters keep .grad as their buffer view, never None)."""
        self.grad_sync.reset()

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    @torch.no_grad()
    def step(self) -> dict:
        """Finish the gradients and update. Returns grad_norm (before clipping, unscaled, equal to the
        serial model's), loss_scale (the one this step's backward used) and skipped (inf/nan found)."""
        layout = self.layout
        self.grad_sync.finish()
        sum_partial_grads(self._partial, layout.group)
        scale = self.loss_scale
        if scale != 1.0:
            torch._foreach_mul_(self._owned_grads, 1.0 / scale)
        norm, found_inf = global_norm_and_overflow(self._piece_grads, self._counted, self._norm_groups)
        if not found_inf:
            coefficient = clip_coefficient(norm, self.config.grad_clip)
            if coefficient < 1.0:
                torch._foreach_mul_(self._owned_grads, coefficient)
            self.steps += 1
            for shard in self.shards:
                shard.adamw(step=self.steps, lr=self.lr, betas=self.config.betas, eps=self.config.eps,
                            weight_decay=self.config.weight_decay)
            if self.config.zero1:
                self._gather_params()
        if self.scaler is not None:
            self.scaler.update(found_inf)
        return {"grad_norm": norm, "loss_scale": scale, "skipped": found_inf}

    def _gather_params(self) -> None:
        """Every rank updated its shard of every bucket; gather the buckets' parameters back over each
        bucket's data-parallel group."""
        for buffer in self.buffers:
            for bucket in buffer.buckets:
                group = self._groups[bucket.group]
                if group.size == 1:
                    continue
                lo, hi = bucket.shard(group.rank, group.size)
                comm.all_gather_into(buffer.param_data[bucket.start:bucket.end], buffer.param_data[lo:hi].clone(), group)

    # ------------------------------------------------------------------ inspection and state

    def state_numel(self) -> int:
        """fp32 optimizer-state elements allocated on this rank (moments, and master weights where separate)."""
        return sum(shard.state_numel() for shard in self.shards)

    def state_dict(self) -> dict:
        params = {}
        for piece in self._pieces:
            param = piece.slot.param
            params[piece.slot.name] = {
                "shard_spec": spec_of(param), "local_shape": tuple(param.shape), "range": (piece.first, piece.end),
                "master": piece.master, "exp_avg": piece.exp_avg, "exp_avg_sq": piece.exp_avg_sq,
            }
        return {"step": self.steps, "loss_scaler": self.scaler.state_dict() if self.scaler else None,
                "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a state_dict taken under the same layout (resharding belongs to the checkpoint code)."""
        mine = {piece.slot.name: piece for piece in self._pieces}
        if set(state["params"]) != set(mine):
            raise ValueError(f"optimizer state for other parameters: {sorted(set(state['params']) ^ set(mine))}")
        for name, entry in state["params"].items():
            piece = mine[name]
            if tuple(entry["range"]) != (piece.first, piece.end):
                raise ValueError(f"{name}: state holds elements {entry['range']}, this rank {(piece.first, piece.end)}")
            for key in ("master", "exp_avg", "exp_avg_sq"):
                getattr(piece, key).copy_(entry[key])
        for shard in self.shards:  # parameters follow their (possibly separate) master weights
            if shard.master is not None:
                for owned in shard.ranges:
                    owned.params.copy_(owned.master)
        if self.config.zero1:
            self._gather_params()
        self.steps = state["step"]
        if self.scaler is not None and state["loss_scaler"] is not None:
            self.scaler.load_state_dict(state["loss_scaler"])


def build_optimizer(chunks: list[torch.nn.Module], layout: ParallelLayout,
                    config: OptimizerConfig = OptimizerConfig()) -> DistributedOptimizer:
    """The optimizer for this rank's model chunks. Call before the first backward: it moves the
    parameters and their gradients into contiguous buffers (and hooks gradient accumulation where DP
    or a bf16/fp16 model needs it)."""
    return DistributedOptimizer(chunks, layout, config)
