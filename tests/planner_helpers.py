"""Shared by the planner tests: a layout whose groups have the right sizes and ranks but no process
group behind them (building a model and its optimizer communicates nothing), and the planner's Layout
as the framework's ParallelSizes."""

from __future__ import annotations

import torch

from megatron_lite.models.config import BuildOptions
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel.comm import CommGroup, CommStats
from megatron_lite.parallel.layout import AXES, FLATTENED, ParallelLayout, ParallelSizes, group_ranks, rank_at
from megatron_lite.pipeline.schedules import schedule_mapping
from megatron_lite.planner.spec import Layout

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sizes_of(layout: Layout) -> ParallelSizes:
    return ParallelSizes(tp=layout.tp, pp=layout.pp, dp=layout.dp, ep=layout.ep)


def groupless_layout(sizes: ParallelSizes, rank: int) -> ParallelLayout:
    stats = CommStats()
    names = set(AXES) | set(FLATTENED) | {"embedding", "world"} | {f"tp/{r}" for r in range(2, sizes.tp)
                                                                   if sizes.tp % r == 0}
    groups = {}
    for name in names:
        ranks = group_ranks(sizes, rank, name)
        groups[name] = CommGroup(name, None, len(ranks), ranks.index(rank), ranks, stats)
    return ParallelLayout(sizes=sizes, rank=rank, groups=groups, stats=stats)


def build_rank(cfg, layout: Layout, stage: int, dtype: str = "fp32", bucket_size_mb: float = 25.0,
               dp_rank: int = 0, tp_rank: int = 0):
    """The chunks and optimizer the framework builds on one rank (weights left uninitialised), placed as
    the layout's schedule places them (ZBV: in a V)."""
    sizes = sizes_of(layout)
    framework = groupless_layout(sizes, rank_at(sizes, pp=stage, dp=dp_rank, tp=tp_rank))
    options = BuildOptions(sequence_parallel=layout.sequence_parallel, recompute=layout.recompute,
                           dtype=TORCH_DTYPES[dtype])
    chunks = build_model_chunks(cfg, framework, 0, virtual_stages=layout.virtual_stages,
                                layers_per_stage=list(layout.layers_per_stage) if layout.layers_per_stage else None,
                                options=options, initialize=False, mapping=schedule_mapping(layout.schedule))
    optimizer = build_optimizer(chunks, framework, OptimizerConfig(zero1=layout.zero1, bucket_size_mb=bucket_size_mb))
    return chunks, optimizer
