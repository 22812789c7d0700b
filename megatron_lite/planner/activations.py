"""Activation bytes a pipeline rank keeps for backward: per micro batch and layer, times the micro
batches the schedule keeps in flight (pipeline/simulate.py's peak_in_flight on the plan the executor
runs), plus the last stage's logits.

Per layer and micro batch of T = b*s tokens, dtype d, TP t, the tensors autograd saves in this
framework's layers (models/transformer.py): the two norm inputs (T*h, split over t under SP), the two
norm outputs that enter the column-parallel blocks (T*h; under SP the gathered full sequence, which
the column layers keep), q, k and v after RoPE and the attention output (T*(2h + 2*kv)/t, SDPA's
fused kernel keeps no s x s matrix), and in the feed-forward the up/gate outputs, the activation and
its product (SwiGLU: 4*T*f/t; GeLU: 2*T*f/t). With dropout the attention is not fused: the
probabilities and their dropout mask add heads/t * b * s^2 * (d + 1) bytes. Selective recomputation
drops the attention core's own saved tensors (the s x s terms and SDPA's output); full recomputation
keeps only each layer's input (T*h*d, /t under SP) plus one layer's full set while it is recomputed.
The last stage keeps its logits [T, V/t] in d and the cross-entropy's fp32 softmax of them.
Norm statistics, masks of MoE routing and the router's fp32 logits are small and left out; an MoE
layer keeps the k routed copies of its tokens and their experts' hidden states (T*k*(h + 4f)*d with
SwiGLU, balanced routing: each EP rank computes about T*k rows). An estimate: not yet checked
against saved tensors (that is the next step, see README).
"""

from __future__ import annotations

import functools

from megatron_lite.layers.embedding import padded_vocab_size
from megatron_lite.models.config import ModelConfig
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.pipeline.simulate import peak_in_flight
from megatron_lite.planner.params import rank_chunks
from megatron_lite.planner.spec import Layout

FP32 = 4


@functools.lru_cache(maxsize=256)
def schedule_peaks(schedule: str, p: int, m: int, v: int) -> tuple[int, ...]:
    """Most (micro batch, chunk) activations each pipeline rank holds at once under the plan."""
    return peak_in_flight(build_schedule(schedule, p, m, v))


def layer_activation_bytes(cfg: ModelConfig, layout: Layout, layer: int, seq_length: int, d: int) -> float:
    """Bytes one layer keeps for backward per micro batch (no recomputation)."""
    b, s, t, h = layout.micro_batch, seq_length, layout.tp, cfg.hidden_size
    tokens = b * s
    sp = t if layout.sequence_parallel and t > 1 else 1
    kv = cfg.kv_heads * cfg.head_dim
    kv_local = kv // min(cfg.kv_heads, t)
    residual = 2 * tokens * h * d / sp  # norm inputs
    entering = 2 * tokens * h * d  # norm outputs entering the column blocks (gathered under SP)
    attention = tokens * (2 * h / t + 2 * kv_local) * d  # q, out; k, v
    if cfg.dropout > 0:
        attention += (cfg.num_heads // t) * b * s * s * (d + 1)
    if cfg.is_moe_layer(layer):
        moe = cfg.moe
        routed = tokens / sp * moe.top_k
        mats = 4 if cfg.activation == "swiglu" else 2
        ffn = routed * h * d + routed * cfg.expert_ffn_size * mats * d
        if moe.num_shared_experts:
            ffn += tokens * moe.num_shared_experts * cfg.expert_ffn_size * mats * d / t
    else:
        mats = 4 if cfg.activation == "swiglu" else 2
        ffn = tokens * cfg.ffn_size * mats * d / t
    return residual + entering + attention + ffn


def stage_activation_bytes(cfg: ModelConfig, layout: Layout, stage: int, seq_length: int, d: int,
                           num_microbatches: int) -> float:
    """Peak activation bytes of pipeline rank `stage`: in-flight micro batches x their chunk's layers."""
    chunks = rank_chunks(cfg, layout, stage)
    if layout.pp > 1 or layout.virtual_stages > 1:
        in_flight = schedule_peaks(layout.schedule, layout.pp, num_microbatches, layout.virtual_stages)[stage]
    else:
        in_flight = 1  # one micro batch at a time: its backward runs before the next forward
    sp = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    tokens = layout.micro_batch * seq_length
    per_chunk = []
    for layers, first, last in chunks:
        full = [layer_activation_bytes(cfg, layout, layer, seq_length, d) for layer in layers]
        if layout.recompute == "full":
            kept = len(layers) * tokens * cfg.hidden_size * d / sp
            per_chunk.append((kept, max(full, default=0.0)))
        elif layout.recompute == "selective":
            core = (cfg.num_heads // layout.tp) * layout.micro_batch * seq_length ** 2 * (d + 1) \
                if cfg.dropout > 0 else 0.0
            per_chunk.append((sum(full) - len(layers) * (core + tokens * cfg.hidden_size / layout.tp * d), 0.0))
        else:
            per_chunk.append((sum(full), 0.0))
    per_micro = max(kept for kept, _ in per_chunk) if chunks else 0.0
    transient = max(extra for _, extra in per_chunk) if chunks else 0.0
    logits = 0.0
    if any(last for _, _, last in chunks):
        vocab = padded_vocab_size(cfg.vocab_size, layout.tp, cfg.vocab_pad_multiple) // layout.tp
        logits = tokens * vocab * (d + FP32)
    return in_flight * per_micro + transient + logits
