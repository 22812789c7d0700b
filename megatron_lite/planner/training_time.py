"""A training layout's memory per stage, communication per group, bubble, step time, tokens/s and MFU.

Step time = the pipeline's makespan + the exposed data-parallel reduction + the optimizer update:
- each micro batch's forward and backward on a stage cost their FLOPs over peak x mfu_ceiling plus
  the stage's TP (and EP) collectives, which sit on the critical path (alpha-beta on the TP link);
- the makespan is pipeline/simulate.py run on the plan the executor runs (build_schedule), with the
  slowest stage's costs per action and one P2P transfer between stages: the bubble is the
  simulator's, not a formula;
- a zero-bubble plan's backward runs as I then W: W costs the deferred weight-gradient matmuls
  (dW = g^T x of every linear, as many FLOPs as its forward, cost.rank_layer_weight_flops) and I the
  rest (input gradients, the attention core's backward, the routed experts, any recomputed forward),
  instead of the simulator's default halves: a layer's I exceeds its W by twice its attention core
  (more with recomputation), so I, on the critical path, is the longer part;
- the DP bucket reductions start during the last micro batch's backward, each when its gradients are
  final (buckets fill in reverse layer order, so evenly over that backward), one after another; what runs
  past the backward is exposed, at least the last bucket's (with one bucket, all of it); ZeRO-1's
  all-gather of the updated parameters follows the update and is exposed;
  partial-gradient sums and the norm follow too;
- AdamW is memory bound: it reads and writes the parameters, gradients and optimizer state once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from megatron_lite.layers.embedding import padded_vocab_size
from megatron_lite.models.config import ModelConfig
from megatron_lite.pipeline.schedules import ZERO_BUBBLE
from megatron_lite.pipeline.simulate import simulate
from megatron_lite.planner.activations import cached_plan, stage_activation_bytes
from megatron_lite.planner.comm_volume import activation_bytes, microbatches, step_traffic, view_size
from megatron_lite.planner.cost import (collective_time, compute_time, link_of, rank_layer_flops,
                                        rank_layer_weight_flops, replicated_time)
from megatron_lite.planner.params import rank_chunks, stage_memory
from megatron_lite.planner.spec import Cluster, Layout, Workload
from megatron_lite.training.metrics import model_flops_per_token

CRITICAL_PATH = ("tp", "ep")  # collectives inside forward/backward
DATA_PARALLEL = ("dp", "dp_cp", "edp_cp")
BUCKETS = ("dp_cp", "edp_cp")  # the gradient buckets' reductions


@dataclass
class StageEstimate:
    stage: int
    layers: int
    memory: dict  # bytes by term: parameters, gradients, optimizer, activations, kv_cache

    @property
    def total(self) -> float:
        return sum(self.memory.values())


@dataclass
class Estimate:
    layout: Layout
    kind: str
    stages: list[StageEstimate]
    comm_bytes: dict  # group -> bytes per step (training) or per output token (inference), busiest rank
    comm_time: dict  # group -> seconds of it
    metrics: dict  # step_s, tokens_per_s, mfu, bubble (training); ttft_s, tpot_s, tokens_per_s (inference)
    notes: list = field(default_factory=list)

    @property
    def memory_per_gpu(self) -> float:
        return max(s.total for s in self.stages)

    @property
    def time_s(self) -> float:
        """The objective: seconds per step (training) or per output token (inference)."""
        return self.metrics["step_s"] if self.kind == "training" else self.metrics["tpot_s"]


def stage_flops(cfg: ModelConfig, layout: Layout, stage: int, seq_length: int) -> tuple[float, float, float]:
    """(forward, backward, weight) FLOPs of one micro batch on one rank of the stage (recomputation
    included); weight: the part of the backward a zero-bubble W runs (the rest, I, includes any
    recomputed forward, which runs inside I)."""
    tokens = layout.micro_batch * seq_length
    forward = backward = weight = 0.0
    for layers, _, last in rank_chunks(cfg, layout, stage):
        for layer in layers:
            fwd, core = rank_layer_flops(cfg, layout, layer, tokens, seq_length)
            forward += fwd
            backward += 2 * fwd + {"none": 0.0, "full": fwd, "selective": core}[layout.recompute]
            weight += rank_layer_weight_flops(cfg, layout, layer, tokens, seq_length)
        if last:
            logits = 2 * cfg.hidden_size * padded_vocab_size(cfg.vocab_size, layout.tp, cfg.vocab_pad_multiple) \
                * tokens / layout.tp
            forward, backward, weight = forward + logits, backward + 2 * logits, weight + logits
    return forward, backward, weight


def view_times(traffic, layout: Layout, cluster: Cluster, stage: int = 0) -> dict[str, float]:
    """Seconds per layout group (view) of a Traffic; each call pays its ring steps' latency."""
    times: dict[str, float] = {}
    for (view, op), (nbytes, calls) in traffic.by_view.items():
        n = view_size(layout, view, stage)
        times[view] = times.get(view, 0.0) + calls * collective_time(op, nbytes / calls, n,
                                                                      link_of(layout, cluster, view))
    return times


def pipeline_time(schedule: str, p: int, m: int, v: int, forward: float, backward: float,
                  comm: float, weight: float | None = None) -> tuple[float, float]:
    """(makespan, bubble fraction) of the plan simulated with these per-action costs; a zero-bubble plan's
    W costs `weight` and its I the rest of the backward. The simulator's times scale with the costs, so it
    runs once per (plan, cost ratios to forward) with the ratios rounded to 4 significant digits (a search
    meets the same ones again; the makespan moves by less than 0.01%, the bubble fraction, small under
    zero-bubble plans, by less than 0.1% of itself) and its makespan is scaled by `forward`."""
    split = schedule in ZERO_BUBBLE
    costs = (backward, comm) + ((backward - weight, weight) if split else ())
    ratios = tuple(float(f"{x / forward:.4g}") for x in costs)
    unit, bubble = _unit_makespan(schedule, p, m, v, *ratios)
    return unit * forward, bubble


@functools.lru_cache(maxsize=4096)
def _unit_makespan(schedule: str, p: int, m: int, v: int, backward: float, comm: float,
                   input_: float | None = None, weight: float | None = None) -> tuple[float, float]:
    result = simulate(cached_plan(schedule, p, m, v), 1.0, backward, comm, input_cost=input_, weight_cost=weight)
    return result.makespan, result.bubble_fraction


def exposed_reduction(calls: list[float], backward_s: float) -> float:
    """Seconds the bucket reductions (`calls`, each one's time, in launch order) run past the last micro
    batch's backward: call k may start once (k+1)/n of that backward is done and after call k-1."""
    end = 0.0
    for k, seconds in enumerate(calls):
        end = max(end, (k + 1) / len(calls) * backward_s) + seconds
    return max(end - backward_s, 0.0)


def estimate_training(cfg: ModelConfig, cluster: Cluster, workload: Workload, layout: Layout,
                      bucket_size_mb: float = 25.0, memory_limit: float | None = None) -> Estimate:
    """memory_limit: a layout whose busiest stage needs more bytes is returned untimed (step_s inf)."""
    s, d = workload.seq_length, workload.dtype_bytes
    m = microbatches(layout, workload.global_batch)
    stages, memories = [], []
    for stage in range(layout.pp):
        mem = stage_memory(cfg, layout, stage, d, bucket_size_mb)
        activations = stage_activation_bytes(cfg, layout, stage, s, d, m)
        memories.append(mem)
        stages.append(StageEstimate(stage, len(mem.layers), {
            "parameters": mem.parameter_bytes, "gradients": mem.gradient_bytes, "optimizer": mem.optimizer_bytes,
            "activations": activations}))
    if memory_limit is not None and max(st.total for st in stages) > memory_limit:
        return Estimate(layout, "training", stages, {}, {}, {"step_s": math.inf}, ["over memory: not timed"])
    per_stage = []
    for stage, mem in enumerate(memories):
        traffic = step_traffic(cfg, layout, s, workload.global_batch, d, stage, 0, bucket_size_mb)
        times = view_times(traffic, layout, cluster, stage)
        fwd_flops, bwd_flops, weight_flops = stage_flops(cfg, layout, stage, s)
        inside = sum(t for g, t in times.items() if g in CRITICAL_PATH) / m  # per micro batch, both directions
        overhead = cluster.layer_overhead * (len(mem.layers) + 1)  # the embedding or head as one more
        redo = {"none": 0.0, "full": 1.0, "selective": 0.0}[layout.recompute]
        last = any(is_last for *_, is_last in rank_chunks(cfg, layout, stage))
        norms_fwd, norms_bwd = replicated_time(cfg, layout, cluster, len(mem.layers), last, layout.micro_batch * s, d)
        forward = compute_time(fwd_flops, cluster, workload.dtype) + inside / 2 + overhead + norms_fwd
        backward = (compute_time(bwd_flops, cluster, workload.dtype) + inside / 2 + (2 + redo) * overhead
                    + norms_bwd + redo * norms_fwd)
        # W: its matmuls and one pass of per-layer overhead; the TP collectives carry input gradients (I)
        weight = compute_time(weight_flops, cluster, workload.dtype) + overhead
        per_stage.append((forward, backward, traffic, times, mem, weight))
    forward = max(f for f, *_ in per_stage)
    backward = max(b for _, b, *_ in per_stage)
    weight = max(w for *_, w in per_stage)  # the slowest stage's each, as forward and backward
    p2p = collective_time("send", activation_bytes(cfg, layout, s, d) // (
        layout.tp if layout.sequence_parallel and layout.tp > 1 else 1), 2, link_of(layout, cluster, "pp"))
    v = layout.virtual_stages
    if layout.pp > 1 or v > 1:
        makespan, bubble = pipeline_time(layout.schedule, layout.pp, m, v, forward / v, backward / v,
                                         p2p if layout.pp > 1 else 0.0, weight / v)
    else:
        makespan, bubble = m * (forward + backward), 0.0
    # Per stage: what follows the last backward (DP reductions beyond it, ZeRO-1's gather, the partial
    # sums over the embedding and TP-block groups) and the optimizer update; the slowest stage counts.
    after = []
    bucket_op = "reduce_scatter" if layout.zero1 else "all_reduce"
    for _, backward_s, traffic, times, mem, _ in per_stage:
        def call_times(views, ops) -> list[float]:
            """Seconds of each call of these groups' ops, in the traffic's order."""
            return [collective_time(op, b / calls, view_size(layout, view, mem.stage), link_of(layout, cluster, view))
                    for (view, op), (b, calls) in traffic.by_view.items() if view in views and op in ops
                    for _ in range(calls)]

        def seconds(views, ops):
            return sum(call_times(views, ops))

        exposed = exposed_reduction(call_times(BUCKETS, (bucket_op,)), backward_s)
        exposed += seconds(DATA_PARALLEL, ("all_gather",))
        # the loss's and the step's small all-reduces (ZeRO-1's global norm over dp_cp), after the last backward
        exposed += seconds(("dp",) + (BUCKETS if layout.zero1 else ()), ("all_reduce",))
        exposed += sum(t for view, t in times.items() if view not in CRITICAL_PATH + DATA_PARALLEL + ("pp",))
        update = 2 * (mem.parameter_bytes + mem.gradient_bytes + mem.optimizer_bytes) / cluster.memory_bandwidth
        after.append(exposed + update)
    step = makespan + max(after)
    tokens = workload.global_batch * s
    flops = model_flops_per_token(cfg, s, tp_size=layout.tp) * tokens
    busiest = max(range(layout.pp), key=lambda i: sum(per_stage[i][2].bytes.values()))
    traffic, times = per_stage[busiest][2], per_stage[busiest][3]
    comm_bytes: dict[str, float] = {}
    for (name, _), b in traffic.bytes.items():
        comm_bytes[name] = comm_bytes.get(name, 0.0) + b
    metrics = {"step_s": step, "tokens_per_s": tokens / step, "bubble": bubble, "microbatches": m,
               "mfu": flops / step / (layout.world_size * cluster.flops(workload.dtype)),
               "forward_s": forward, "backward_s": backward, "makespan_s": makespan}
    if layout.schedule in ZERO_BUBBLE:  # the backward's split the simulator ran: I = backward - W
        metrics.update(input_s=backward - weight, weight_s=weight)
    return Estimate(layout, "training", stages, comm_bytes, dict(times), metrics)
