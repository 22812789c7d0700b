"""Enumerate the layouts of a model on a cluster, estimate each, rank them, and say why the others fail.

Training layouts use every GPU (tp x pp x dp = the cluster's GPUs) with tp within a node; for each
(tp, pp, dp, ep, micro batch) and, with pp > 1, each pipeline schedule asked for (1F1B unless
`schedules` lists others: interleaved_1f1b and zbv run 2 chunks per rank) the options are tried from the
cheapest in time to the cheapest in memory (SP whenever tp > 1, ZeRO-1 whenever dp > 1, then recompute
none -> selective -> full) and the first that fits is kept. Inference layouts may leave GPUs idle
(tp x pp x dp <= GPUs), since a smaller layout can be faster at batch 1. A layout that cannot run gets
one binding reason: the size that does not divide, or the memory term that overflows and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_lite.models.config import ModelConfig, check_model_fits_layout
from megatron_lite.parallel.layout import ParallelSizes
from megatron_lite.planner.inference_time import estimate_inference
from megatron_lite.planner.spec import GIB, PLANNED_SCHEDULES, Cluster, Layout, Workload
from megatron_lite.planner.training_time import Estimate, estimate_training

MICRO_BATCHES = (1, 2, 4, 8)
DEFAULT_SCHEDULES = ("1f1b",)
CHUNKS_PER_RANK = {"interleaved_1f1b": 2, "zbv": 2}  # the searched virtual_stages (others run 1)


@dataclass
class Rejected:
    layout: Layout
    reason: str
    memory_per_gpu: float | None = None  # bytes, when memory was the reason


@dataclass
class Plan:
    ranked: list[Estimate]  # best first
    rejected: list[Rejected]

    @property
    def best(self) -> Estimate:
        return self.ranked[0]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def structural_reason(cfg: ModelConfig, cluster: Cluster, workload: Workload, layout: Layout) -> str | None:
    """Why `layout` cannot run this model on this cluster at all (None: it can)."""
    if layout.tp > cluster.gpus_per_node:
        return f"TP={layout.tp} spans nodes: a node has {cluster.gpus_per_node} GPUs and TP needs its fast link"
    try:
        check_model_fits_layout(cfg, ParallelSizes(tp=layout.tp, pp=layout.pp, dp=layout.dp, ep=layout.ep))
    except ValueError as err:
        return str(err)
    if layout.virtual_stages > 1 and cfg.num_layers % (layout.pp * layout.virtual_stages):
        return (f"num_layers={cfg.num_layers} does not split into pp x virtual_stages="
                f"{layout.pp * layout.virtual_stages}")
    if workload.kind == "training":
        if workload.global_batch % (layout.dp * layout.micro_batch):
            return (f"global_batch={workload.global_batch} is not divisible by dp x micro_batch = "
                    f"{layout.dp} x {layout.micro_batch}")
        if layout.sequence_parallel and workload.seq_length % layout.tp:
            return f"seq_length={workload.seq_length} is not divisible by TP={layout.tp} (sequence parallelism)"
        m = workload.global_batch // (layout.dp * layout.micro_batch)
        if layout.schedule == "interleaved_1f1b" and m % layout.pp:
            return f"interleaved 1F1B needs micro batches ({m}) to be a multiple of PP={layout.pp}"
    elif workload.batch % layout.dp:
        return f"batch={workload.batch} is not divisible by DP={layout.dp} replicas"
    return None


def memory_reason(estimate: Estimate, cluster: Cluster) -> str | None:
    """The stage and term that overflow the GPU, or None when every stage fits."""
    stage = max(estimate.stages, key=lambda s: s.total)
    if stage.total <= cluster.memory_bytes:
        return None
    terms = ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(stage.memory.items(), key=lambda kv: -kv[1]) if v)
    largest = max(stage.memory, key=stage.memory.get)
    return (f"stage {stage.stage} needs {stage.total / GIB:.1f} GiB > {cluster.memory_bytes / GIB:.0f} GiB by "
            f"{(stage.total - cluster.memory_bytes) / GIB:.1f} GiB; largest term {largest} ({terms} GiB)")


def estimate(cfg: ModelConfig, cluster: Cluster, workload: Workload, layout: Layout) -> Estimate:
    if workload.kind == "training":  # a layout over memory is not timed
        return estimate_training(cfg, cluster, workload, layout, memory_limit=cluster.memory_bytes)
    return estimate_inference(cfg, cluster, workload, layout)


def candidate_sizes(cfg: ModelConfig, cluster: Cluster, workload: Workload):
    """(tp, pp, dp, ep) to try."""
    gpus = cluster.num_gpus
    experts = cfg.moe.num_experts if cfg.moe is not None else 1
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            if pp > cfg.num_layers:
                continue
            dps = [gpus // (tp * pp)] if workload.kind == "training" else divisors(gpus // (tp * pp))
            for dp in dps:
                for ep in (e for e in divisors(dp) if experts % e == 0):
                    yield tp, pp, dp, ep


def _option_ladder(layout: Layout):
    """The same sizes from the fastest options to the most memory-saving ones."""
    base = replace(layout, sequence_parallel=layout.tp > 1, zero1=layout.dp > 1)
    for recompute in ("none", "selective", "full"):
        yield replace(base, recompute=recompute)


OBJECTIVES = {  # sort keys, best first
    "time": lambda e: (e.time_s, e.memory_per_gpu),  # seconds per step (training) or per output token
    "throughput": lambda e: (-e.metrics["tokens_per_s"], e.memory_per_gpu),
    "memory": lambda e: (e.memory_per_gpu, e.time_s),
}


def search(cfg: ModelConfig, cluster: Cluster, workload: Workload, top: int | None = None,
           objective: str = "time", schedules: tuple[str, ...] = DEFAULT_SCHEDULES) -> Plan:
    """Every candidate layout, estimated; the valid ones ranked by `objective` (time: per step or per
    output token; throughput: tokens/s; memory: bytes per GPU), ties broken by the other. schedules:
    the pipeline schedules training layouts with pp > 1 try (e.g. ("1f1b", "zb_h1", "zbv"))."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {tuple(OBJECTIVES)}")
    unknown = [name for name in schedules if name not in PLANNED_SCHEDULES]
    if unknown or not schedules:
        raise ValueError(f"schedules={list(schedules)} must list one or more of {PLANNED_SCHEDULES}")
    ranked: list[Estimate] = []
    rejected: list[Rejected] = []
    for tp, pp, dp, ep in candidate_sizes(cfg, cluster, workload):
        sizes = Layout(tp=tp, pp=pp, dp=dp, ep=ep)
        if workload.kind == "inference":
            _try(cfg, cluster, workload, [sizes], ranked, rejected)
            continue
        for schedule in schedules if pp > 1 else DEFAULT_SCHEDULES:
            piped = replace(sizes, schedule=schedule, virtual_stages=CHUNKS_PER_RANK.get(schedule, 1))
            for micro in MICRO_BATCHES:
                _try(cfg, cluster, workload, list(_option_ladder(replace(piped, micro_batch=micro))), ranked, rejected)
    ranked.sort(key=OBJECTIVES[objective])
    if not ranked:
        raise ValueError(_nothing_fits(cluster, workload, rejected))
    return Plan(ranked[:top] if top else ranked, rejected)


def _try(cfg, cluster, workload, ladder: list[Layout], ranked, rejected) -> None:
    reason = structural_reason(cfg, cluster, workload, ladder[0])
    if reason:
        rejected.append(Rejected(ladder[0], reason))
        return
    smallest = None
    for layout in ladder:
        est = estimate(cfg, cluster, workload, layout)
        reason = memory_reason(est, cluster)
        if reason is None:
            ranked.append(est)
            return
        if smallest is None or est.memory_per_gpu < smallest[0].memory_per_gpu:
            smallest = (est, reason)
    rejected.append(Rejected(smallest[0].layout, smallest[1], smallest[0].memory_per_gpu))


def _nothing_fits(cluster: Cluster, workload: Workload, rejected: list[Rejected]) -> str:
    by_memory = [r for r in rejected if r.memory_per_gpu is not None]
    if not by_memory:
        reasons = sorted({r.reason for r in rejected})[:5]
        return f"no layout of {cluster.num_gpus} GPUs can run this model: " + "; ".join(reasons)
    least = min(by_memory, key=lambda r: r.memory_per_gpu)
    return (f"no layout fits {cluster.name} ({cluster.num_gpus} GPUs of {cluster.memory_bytes / GIB:.0f} GiB) for "
            f"this {workload.kind} workload: the smallest requirement is {least.memory_per_gpu / GIB:.1f} GiB per GPU "
            f"({least.layout.describe()}: {least.reason})")
