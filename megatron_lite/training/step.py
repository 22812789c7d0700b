"""One training step: the pipeline schedule over this rank's microbatches, final gradients, update.

Without pipeline parallelism the plan has one stage, so gradient accumulation over microbatches
is the same code path as a pipeline.

The loss of a step is the mean over every valid (not IGNORE_INDEX) target of the global batch, all
microbatches and all DP ranks: exactly the serial model's `F.cross_entropy(logits, targets,
ignore_index=IGNORE_INDEX)`, so no layout changes it. A mean per microbatch or per DP rank would
weight a token by how few valid neighbours its slice has.
"""

from __future__ import annotations

from megatron_lite.data.microbatches import split_microbatches  # noqa: F401 - re-exported
from megatron_lite.layers.cross_entropy import step_loss_divisor
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.pipeline.executor import PipelineExecutor
from megatron_lite.pipeline.schedules import PipelinePlan
from megatron_lite.pipeline.transport import Transport


def run_schedule(chunks, plan: PipelinePlan, tokens, targets, layout: ParallelLayout,
                 forward_only: bool = False, loss_scale: float = 1.0, before_last_backward=None,
                 transport: Transport | None = None, batching: str | None = None, timeline: list | None = None) -> float:
    """Forward (and backward) of this rank's batch under `plan`; returns the mean loss over the valid
    targets of the global batch (every DP rank's) on every rank (the last stage computes it, one
    broadcast over the pipeline delivers it); no valid target anywhere: 0, and zero gradients.
    transport, batching, timeline: see `PipelineExecutor` (default: the backend's; no timeline)."""
    # Counted on every rank before the schedule (each holds its DP slice's targets), so no stage waits
    # for the last one: each microbatch then contributes sum(per-token loss) * dp / N.
    divisor = step_loss_divisor(targets, layout.dp, layout.device)
    token_mbs = split_microbatches(tokens, plan.num_microbatches)
    target_mbs = split_microbatches(targets, plan.num_microbatches)
    shape = chunks[0].activation_shape(token_mbs[0].shape[0], token_mbs[0].shape[1])
    dtype = chunks[0].dtype
    executor = PipelineExecutor(plan, chunks, layout, shape, dtype, transport=transport, batching=batching,
                                timeline=timeline)
    loss = executor.run([t.to(layout.device) for t in token_mbs], [t.to(layout.device) for t in target_mbs],
                        forward_only=forward_only, loss_scale=loss_scale, before_last_backward=before_last_backward,
                        loss_divisor=divisor)
    last_rank, _ = plan.location(plan.num_virtual_stages - 1)  # the last rank, or rank 0 in ZBV's V
    comm.broadcast(loss, layout.pp, src_group_rank=last_rank)
    return comm.all_reduce(loss, layout.dp, op="avg").item()


def train_step(chunks, optimizer, tokens, targets, layout: ParallelLayout, plan: PipelinePlan,
               transport: Transport | None = None, timeline: list | None = None) -> tuple[float, dict]:
    """One optimizer step on this rank's batch; returns the global batch's mean loss (see `run_schedule`)
    and the step's stats:
    grad_norm, loss_scale, skipped (see `DistributedOptimizer.step`) and comm_bytes, the payload bytes
    per "group/op" that this step moved (counters are reset at the start of the step)."""
    layout.stats.reset()
    optimizer.zero_grad()
    loss = run_schedule(chunks, plan, tokens, targets, layout, loss_scale=optimizer.loss_scale,
                        before_last_backward=optimizer.before_last_backward, transport=transport, timeline=timeline)
    stats = optimizer.step()
    for chunk in chunks:
        if hasattr(chunk, "finish_step"):
            chunk.finish_step(skipped=bool(stats["skipped"]))
    stats["comm_bytes"] = layout.stats.report()
    return loss, stats
