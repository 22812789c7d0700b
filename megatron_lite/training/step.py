"""One training step: the pipeline schedule over this rank's microbatches, final gradients, update.

Without pipeline parallelism the plan has one stage, so gradient accumulation over microbatches
is the same code path as a pipeline.
"""

from __future__ import annotations

import torch

from megatron_lite.data.microbatches import split_microbatches  # noqa: F401 - re-exported
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.pipeline.executor import PipelineExecutor
from megatron_lite.pipeline.schedules import PipelinePlan
from megatron_lite.pipeline.transport import Transport


def run_schedule(chunks, plan: PipelinePlan, tokens, targets, layout: ParallelLayout,
                 forward_only: bool = False, loss_scale: float = 1.0, before_last_backward=None,
                 transport: Transport | None = None, batching: str | None = None) -> float:
    """Forward (and backward) of this rank's batch under `plan`; returns the DP-averaged mean loss on
    every rank (the last stage computes it, one broadcast over the pipeline delivers it).
    transport, batching: see `PipelineExecutor` (default: the backend's)."""
    token_mbs = split_microbatches(tokens, plan.num_microbatches)
    target_mbs = split_microbatches(targets, plan.num_microbatches)
    shape = chunks[0].activation_shape(token_mbs[0].shape[0], token_mbs[0].shape[1])
    dtype = chunks[0].dtype
    executor = PipelineExecutor(plan, chunks, layout, shape, dtype, transport=transport, batching=batching)
    loss = executor.run([t.to(layout.device) for t in token_mbs], [t.to(layout.device) for t in target_mbs],
                        forward_only=forward_only, loss_scale=loss_scale, before_last_backward=before_last_backward)
    comm.broadcast(loss, layout.pp, src_group_rank=layout.pp.size - 1)
    return comm.all_reduce(loss, layout.dp, op="avg").item()


def train_step(chunks, optimizer, tokens, targets, layout: ParallelLayout, plan: PipelinePlan,
               transport: Transport | None = None) -> tuple[float, dict]:
    """One optimizer step on this rank's batch; returns the DP-averaged mean loss and the step's stats:
    grad_norm, loss_scale, skipped (see `DistributedOptimizer.step`) and comm_bytes, the payload bytes
    per "group/op" that this step moved (counters are reset at the start of the step)."""
    layout.stats.reset()
    optimizer.zero_grad()
    loss = run_schedule(chunks, plan, tokens, targets, layout, loss_scale=optimizer.loss_scale,
                        before_last_backward=optimizer.before_last_backward, transport=transport)
    stats = optimizer.step()
    stats["comm_bytes"] = layout.stats.report()
    return loss, stats
