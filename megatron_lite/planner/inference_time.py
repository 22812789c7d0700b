"""An inference layout's memory (weights + KV cache), time to first token, time per output token and
throughput, and its communication per output token.

The DP replicas serve disjoint requests (batch / dp each). A replica's pipeline carries the requests
in g = min(pp, batch / dp) groups that rotate through the stages (inference/engine.py): a group makes
one token per cycle = max(the sum of the stage times, g x the slowest stage) for its share of the batch.
A stage's time for one step is the larger of its FLOPs over peak x mfu_ceiling and its memory traffic
(every weight once, and the KV cache it attends over) over the memory bandwidth, plus its TP
collectives on the critical path; a boundary adds one P2P transfer.

Per output token a TP rank all-reduces [b, 1, h] twice per layer and once after the vocabulary-parallel
embedding, and the last stage all-gathers the logits row [b, V] in fp32 for sampling; each of those
costs 2(tp-1) (all-gather: tp-1) link latencies whatever its size, which at batch 1 dominates. A
pipeline sends [b, 1, h] across each boundary and the b sampled tokens (int64) from the last stage to
every other (`decode_traffic`, equal to the engine's counters per decode step in the tests).
"""

from __future__ import annotations

from megatron_lite.layers.embedding import padded_vocab_size
from megatron_lite.models.config import ModelConfig
from megatron_lite.planner.cost import collective_time, compute_time, link_of, rank_layer_flops
from megatron_lite.planner.params import rank_chunks, stage_memory
from megatron_lite.planner.spec import Cluster, Layout, Workload
from megatron_lite.planner.training_time import Estimate, StageEstimate

FP32, INT64 = 4, 8


def kv_cache_bytes(cfg: ModelConfig, layout: Layout, layers: int, batch: int, context: int, d: int) -> int:
    """Keys and values of `layers` layers for `batch` sequences of `context` tokens on one TP rank: the
    KV heads are split over TP, or replicated once TP exceeds them (one head per rank)."""
    local_heads = cfg.kv_heads // min(cfg.kv_heads, layout.tp)
    return 2 * layers * batch * context * local_heads * cfg.head_dim * d


def replica_batch(layout: Layout, batch: int) -> int:
    if batch % layout.dp:
        raise ValueError(f"batch {batch} does not split over DP={layout.dp} replicas")
    return batch // layout.dp


def decode_traffic(cfg: ModelConfig, layout: Layout, batch: int, d: int, stage: int) -> dict[tuple[str, str], float]:
    """Bytes per (group, op) one rank of `stage` moves per output token for a replica's `batch` requests
    (under the counters' convention: the full tensor of each call)."""
    b = replica_batch(layout, batch)
    out: dict[tuple[str, str], float] = {}

    def add(key, nbytes):
        out[key] = out.get(key, 0.0) + nbytes

    for layers, first, last in rank_chunks(cfg, layout, stage):
        if layout.tp > 1:
            add(("tp", "all_reduce"), (2 * len(layers) + first) * b * cfg.hidden_size * d)
            if last:
                vocab = padded_vocab_size(cfg.vocab_size, layout.tp, cfg.vocab_pad_multiple)
                add(("tp", "all_gather"), b * vocab * FP32)
    if layout.pp > 1:  # hidden states one stage on; the sampled tokens from the last stage to every other
        last = stage == layout.pp - 1
        add(("pp", "send"), (layout.pp - 1) * b * INT64 if last else b * cfg.hidden_size * d)
        add(("pp", "recv"), (stage > 0) * b * cfg.hidden_size * d + (not last) * b * INT64)
    return {k: v for k, v in out.items() if v}


def _stage_step(cfg, cluster, workload, layout: Layout, stage: int, batch: int, new_tokens: int, context: int,
                with_latency: bool = True) -> tuple[float, float]:
    """(seconds, TP seconds) of one forward step of `batch` sequences adding `new_tokens` each, attending
    over `context` tokens, on one rank of `stage`."""
    d = workload.dtype_bytes
    tokens = batch * new_tokens
    flops = weights = kv = tp_time = 0.0
    tp_link = link_of(layout, cluster, "tp")
    mem = stage_memory(cfg, layout, stage, d, training=False)
    weights = mem.parameter_bytes
    for layers, first, last in rank_chunks(cfg, layout, stage):
        for layer in layers:
            flops += rank_layer_flops(cfg, layout, layer, tokens, context)[0]  # each new token attends `context`
        kv += kv_cache_bytes(cfg, layout, len(layers), batch, context, d)
        crossings = 2 * len(layers) + first
        tp_time += crossings * collective_time("all_reduce", tokens * cfg.hidden_size * d, layout.tp, tp_link,
                                               with_latency)
        if last:
            vocab = padded_vocab_size(cfg.vocab_size, layout.tp, cfg.vocab_pad_multiple)
            flops += 2 * cfg.hidden_size * vocab * batch / layout.tp  # the logits of one row per sequence
            tp_time += collective_time("all_gather", batch * vocab * FP32, layout.tp, tp_link, with_latency)
    busy = max(compute_time(flops, cluster, workload.dtype), (weights + kv) / cluster.memory_bandwidth)
    return busy + tp_time, tp_time


def _pipeline_time(cfg, cluster, workload, layout, batch, new_tokens, context, with_latency=True):
    """Seconds per step of a replica: (one group's latency through the stages, cycle per group, TP seconds)."""
    groups = min(layout.pp, batch)
    per_group = batch // groups
    steps = [_stage_step(cfg, cluster, workload, layout, s, per_group, new_tokens, context, with_latency)
             for s in range(layout.pp)]
    p2p = collective_time("send", per_group * new_tokens * cfg.hidden_size * workload.dtype_bytes, 2,
                          link_of(layout, cluster, "pp"), with_latency) if layout.pp > 1 else 0.0
    latency = sum(t for t, _ in steps) + (layout.pp - 1) * p2p
    cycle = max(latency, groups * max(t for t, _ in steps))
    return latency, cycle, sum(tp for _, tp in steps), groups


def estimate_inference(cfg: ModelConfig, cluster: Cluster, workload: Workload, layout: Layout,
                       with_latency: bool = True) -> Estimate:
    d, b = workload.dtype_bytes, replica_batch(layout, workload.batch)
    context = workload.context_length
    stages = []
    for stage in range(layout.pp):
        mem = stage_memory(cfg, layout, stage, d, training=False)
        kv = kv_cache_bytes(cfg, layout, len(mem.layers), b, context, d)
        # The prefill's largest transient: one layer's hidden states of the whole prompt batch.
        tokens = b * workload.prompt_length
        ffn = cfg.ffn_size if cfg.moe is None else cfg.expert_ffn_size * cfg.moe.top_k
        work = tokens * (4 * cfg.hidden_size + 3 * ffn // layout.tp) * d
        stages.append(StageEstimate(stage, len(mem.layers), {"parameters": mem.parameter_bytes, "kv_cache": kv,
                                                             "activations": work}))
    ttft, _, _, _ = _pipeline_time(cfg, cluster, workload, layout, b, workload.prompt_length,
                                   workload.prompt_length, with_latency)
    middle = workload.prompt_length + workload.output_length // 2  # the cache's mean length while decoding
    latency, cycle, tp_time, groups = _pipeline_time(cfg, cluster, workload, layout, b, 1, middle, with_latency)
    traffic = decode_traffic(cfg, layout, workload.batch, d, layout.pp - 1)
    comm_bytes: dict[str, float] = {}
    for (name, _), nbytes in traffic.items():
        comm_bytes[name] = comm_bytes.get(name, 0.0) + nbytes
    metrics = {"ttft_s": ttft, "tpot_s": cycle, "tokens_per_s": layout.dp * b / cycle,
               "token_latency_s": latency, "request_groups": groups,
               "decode_tp_s": tp_time, "decode_bytes_per_token": sum(traffic.values())}
    return Estimate(layout, "inference", stages, comm_bytes, {"tp": tp_time}, metrics)
