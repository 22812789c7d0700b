"""Activation bytes a pipeline rank keeps for backward: per micro batch, times the micro batches the
schedule keeps in flight (pipeline/simulate.py's peak_in_flight on the plan the executor runs). Where a
rank's chunks keep different amounts (the first and last stage of ZBV's V both sit on rank 0), the
peak is the plan's largest live set weighted by what each chunk keeps. A zero-bubble plan keeps a micro
batch's activations from its F until its W, as peak_in_flight counts them.

Per layer and micro batch of T = b*s tokens, dtype d, TP t (u = t under SP, else 1), what autograd saves
in this framework's layers (models/transformer.py, counted tensor by tensor on CPU in
tests/test_planner_activations.py):
  each norm       its input T*h/u, its statistics (fp32), with RMSNorm (composite) the normalised
                  input T*h/u, and its output entering the column-parallel block, T*h (under SP the
                  gathered sequence, which the column layers keep);
  attention       q and the output T*h/t, k and v T*kv/t (kv: the KV width, one head per rank when TP
                  exceeds the KV heads), SDPA's fp32 log-sum-exp, RoPE's cos/sin; with dropout the
                  attention is not fused: k and v repeated to every query head, and the s x s
                  probabilities, their dropout mask and the dropped probabilities (3 x heads/t x b x s^2 x d)
                  plus the causal mask (s^2 bytes);
  feed-forward    SwiGLU: up, gate, silu(gate) and their product, 4*T*f/t; GeLU: 2*T*f/t;
  dropout         one mask of T*h/u per residual branch (in the model dtype).
Selective recomputation drops the attention core's own (log-sum-exp, s x s terms); full recomputation
keeps each layer's input (T*h/u) plus, while one layer is recomputed, that layer's full set. The last
stage keeps its head (a norm) and the cross-entropy's fp32 (log-)softmax over its vocabulary slice; the
first its token ids. A mixture-of-experts layer keeps the k routed copies of its tokens (T/u*k*h), the
experts' hidden states (SwiGLU: T/u*k*4f, balanced routing: each EP rank computes about T/u*k rows),
their outputs on the way back (T/u*k*h) and the router's fp32 and int64 bookkeeping.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from megatron_lite.layers.embedding import padded_vocab_size
from megatron_lite.models.config import ModelConfig
from megatron_lite.pipeline.schedules import ActionKind, build_schedule
from megatron_lite.pipeline.simulate import peak_in_flight
from megatron_lite.planner.params import rank_chunks
from megatron_lite.planner.spec import Layout

FP32 = 4


@functools.lru_cache(maxsize=256)
def cached_plan(schedule: str, p: int, m: int, v: int):
    """build_schedule's plan (the one the executor runs), built once per search."""
    return build_schedule(schedule, p, m, v)


@functools.lru_cache(maxsize=256)
def schedule_peaks(schedule: str, p: int, m: int, v: int) -> tuple[int, ...]:
    """Most (micro batch, chunk) activations each pipeline rank holds at once under the plan."""
    return peak_in_flight(cached_plan(schedule, p, m, v))


@functools.lru_cache(maxsize=256)
def live_chunk_counts(schedule: str, p: int, m: int, v: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per rank, the live micro batches per chunk (n_0, .., n_v-1) the plan passes through that no other
    such vector exceeds in every chunk: the rank's peak bytes are the largest of these weighted by what
    each chunk keeps. Counted as peak_in_flight counts: a forward adds one, a B or a W removes it."""
    ranks = []
    for actions in cached_plan(schedule, p, m, v).actions:
        live, seen = [0] * v, set()
        for action in actions:
            if action.kind is ActionKind.FORWARD:
                live[action.chunk] += 1
                seen.add(tuple(live))
            elif action.kind in (ActionKind.BACKWARD, ActionKind.BACKWARD_WEIGHT):
                live[action.chunk] -= 1
        maximal: list[tuple[int, ...]] = []
        for counts in sorted(seen, reverse=True):  # a vector exceeding another sorts before it
            if not any(all(x >= y for x, y in zip(kept, counts)) for kept in maximal):
                maximal.append(counts)
        ranks.append(tuple(maximal))
    return tuple(ranks)


def _norm(cfg: ModelConfig, tokens: int, d: int, u: int) -> float:
    """One norm whose output enters a column-parallel block."""
    h = cfg.hidden_size
    rms = cfg.norm == "rmsnorm"
    return tokens * h * d / u * (1 + rms) + tokens * FP32 / u * (1 if rms else 2) + tokens * h * d


def attention_core_bytes(cfg: ModelConfig, layout: Layout, seq_length: int, d: int) -> float:
    """What the attention core itself saves (dropped by selective recomputation)."""
    b, t = layout.micro_batch, layout.tp
    heads = cfg.num_heads // t
    if cfg.dropout > 0:
        return 3 * heads * b * seq_length ** 2 * d + seq_length ** 2
    return heads * b * seq_length * FP32  # SDPA's log-sum-exp


def layer_activation_bytes(cfg: ModelConfig, layout: Layout, layer: int, seq_length: int, d: int) -> float:
    """Bytes one layer keeps for backward per micro batch (no recomputation)."""
    b, s, t, h = layout.micro_batch, seq_length, layout.tp, cfg.hidden_size
    tokens = b * s
    u = t if layout.sequence_parallel and t > 1 else 1
    kv_local = cfg.kv_heads * cfg.head_dim // min(cfg.kv_heads, t)
    if cfg.dropout > 0:  # k and v repeated to every local query head
        kv_local = h // t
    total = 2 * _norm(cfg, tokens, d, u) + tokens * (2 * h / t + 2 * kv_local) * d
    total += attention_core_bytes(cfg, layout, s, d)
    if cfg.position == "rope":
        total += 4 * s * cfg.head_dim * d  # cos and sin, for q and for k
    if cfg.dropout > 0:
        total += 2 * tokens * h * d / u  # the residual branches' masks
    mats = 4 if cfg.activation == "swiglu" else 2
    if cfg.is_moe_layer(layer):
        moe = cfg.moe
        routed = tokens / u * moe.top_k
        # the routed copies in, the experts' hidden states, their outputs back; the router's fp32 logits,
        # probabilities, top-k weights and sums, and the int64 choices and orderings
        total += 2 * routed * h * d + routed * cfg.expert_ffn_size * mats * d
        total += tokens / u * (2 * moe.num_experts + 2 + 2 * moe.top_k) * FP32 + 3 * routed * 8
        if moe.num_shared_experts:
            total += tokens * moe.num_shared_experts * cfg.expert_ffn_size * mats * d / t
    else:
        total += tokens * cfg.ffn_size * mats * d / t
    return total


@dataclass(frozen=True)
class StageActivations:
    per_chunk: tuple[float, ...]  # kept per micro batch by each model chunk (its layers, head, token ids)
    in_flight: int  # the schedule's peak (micro batch, chunk) pairs on this rank
    at_peak: float  # bytes of the rank's largest live set of (micro batch, chunk) activations under the plan
    transient: float  # one layer's full set while it is recomputed (full recomputation)

    @property
    def per_microbatch(self) -> float:
        """What the largest chunk keeps per micro batch."""
        return max(self.per_chunk, default=0.0)

    @property
    def total(self) -> float:
        return self.at_peak + self.transient


def stage_activations(cfg: ModelConfig, layout: Layout, stage: int, seq_length: int, d: int,
                      num_microbatches: int) -> StageActivations:
    """Pipeline rank `stage`'s activations: what one micro batch keeps and the schedule's peak in flight."""
    plan_key = (layout.schedule, layout.pp, num_microbatches, layout.virtual_stages)
    pipelined = layout.pp > 1 or layout.virtual_stages > 1  # else one micro batch at a time: B before the next F
    in_flight = schedule_peaks(*plan_key)[stage] if pipelined else 1
    u = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    tokens = layout.micro_batch * seq_length
    kept, transient = [], 0.0
    for layers, first, last in rank_chunks(cfg, layout, stage):
        full = [layer_activation_bytes(cfg, layout, layer, seq_length, d) for layer in layers]
        if layout.recompute == "full":
            chunk = len(layers) * tokens * cfg.hidden_size * d / u
            transient = max([transient] + full)
        elif layout.recompute == "selective":
            chunk = sum(full) - len(layers) * attention_core_bytes(cfg, layout, seq_length, d)
        else:
            chunk = sum(full)
        if first:
            chunk += tokens * 8 + (tokens * cfg.hidden_size * d / u if cfg.dropout > 0 else 0)  # ids, dropout mask
        if last:
            vocab = padded_vocab_size(cfg.vocab_size, layout.tp, cfg.vocab_pad_multiple) // layout.tp
            chunk += _norm(cfg, tokens, d, u) + tokens * vocab * FP32
        kept.append(chunk)
    live_sets = live_chunk_counts(*plan_key)[stage] if pipelined else ((1,),)
    at_peak = max(sum(n * b for n, b in zip(counts, kept)) for counts in live_sets)
    return StageActivations(tuple(kept), in_flight, at_peak, transient)


def stage_activation_bytes(cfg: ModelConfig, layout: Layout, stage: int, seq_length: int, d: int,
                           num_microbatches: int) -> float:
    """Peak activation bytes of pipeline rank `stage`."""
    return stage_activations(cfg, layout, stage, seq_length, d, num_microbatches).total
