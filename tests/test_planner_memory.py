"""The planner's parameter, gradient and optimizer bytes per rank equal what the framework allocates.

Each case builds the model chunks and the optimizer of every pipeline stage (build_model_chunks +
build_optimizer, on a layout with correctly sized groups; building communicates nothing) and compares
byte for byte: the parameter list (names, local sizes), the parameter and fp32 gradient buffers
(bucket padding included) and the optimizer state (moments, master weights, ZeRO-1 shards)."""

import pytest

from equivalence import TINY_MODELS
from megatron_lite.planner.params import rank_parameters, stage_memory
from megatron_lite.planner.spec import DTYPE_BYTES, Layout
from planner_helpers import build_rank

CASES = [  # (model, layout, dtype, bucket MiB): TP/PP/DP/ZeRO-1/tied/padded vocab/EP/SP/uneven/interleaved/ZB
    ("gpt2", Layout(tp=2), "fp32", 25.0),  # tied on one stage, vocab 101 padded to 102, biases, learned positions
    ("gpt2_deep", Layout(tp=2, pp=2, dp=2, zero1=True), "bf16", 0.01),  # tied copy on each pipeline end
    ("llama", Layout(tp=4, sequence_parallel=True), "fp32", 25.0),  # 2 KV heads replicated over TP4
    ("llama_deep", Layout(pp=4, virtual_stages=2, schedule="interleaved_1f1b"), "fp16", 25.0),
    ("llama_deep", Layout(pp=2, dp=3, zero1=True, layers_per_stage=(3, 5)), "bf16", 0.002),  # uneven, odd DP
    ("moe", Layout(dp=4, ep=2, zero1=True), "bf16", 0.01),  # experts over EP, their own buckets over edp
    ("moe_e8", Layout(tp=2, dp=2, ep=2, sequence_parallel=True, zero1=True), "fp32", 0.005),  # shared expert
    ("gpt2_deep", Layout(virtual_stages=2, schedule="interleaved_1f1b"), "fp32", 25.0),  # tied across chunks, pp=1
    ("moe", Layout(tp=2, pp=2, dp=2, ep=2), "fp16", 0.01),  # 3D + EP without ZeRO-1
    # zero-bubble: ZBV's V puts the embedding and the head on rank 0 (tied: one shared weight, no copy)
    ("gpt2_deep", Layout(pp=2, dp=2, zero1=True, schedule="zbv", virtual_stages=2), "bf16", 0.01),
    ("llama_deep", Layout(tp=2, pp=4, schedule="zbv", virtual_stages=2), "fp32", 0.005),  # untied, 1 layer/chunk
    ("gpt2_deep", Layout(tp=2, pp=2, dp=2, schedule="zb_h1"), "fp16", 0.01),  # tied copies on the two ends
]


def _padded_vocab_model():
    return TINY_MODELS["gpt2"].with_(vocab_pad_multiple=128)


@pytest.mark.parametrize("model,layout,dtype,bucket_mb", CASES + [("padded", Layout(tp=2, dp=2, zero1=True),
                                                                    "bf16", 25.0)],
                         ids=lambda v: v.describe() if isinstance(v, Layout) else str(v))
def test_parameter_gradient_optimizer_bytes_are_exact(model, layout, dtype, bucket_mb):
    cfg = _padded_vocab_model() if model == "padded" else TINY_MODELS[model]
    for stage in range(layout.pp):
        chunks, optimizer = build_rank(cfg, layout, stage, dtype, bucket_mb, dp_rank=layout.dp - 1)
        planned = [p for chunk in rank_parameters(cfg, layout, stage) for p in chunk]
        built = [(name, p.numel()) for chunk in chunks for name, p in chunk.named_parameters()]
        assert [(p.name, p.numel) for p in planned] == built
        memory = stage_memory(cfg, layout, stage, DTYPE_BYTES[dtype], bucket_mb)
        assert memory.parameters == sum(n for _, n in built)
        assert memory.parameter_bytes == sum(b.param_data.numel() * b.param_data.element_size()
                                             for b in optimizer.buffers)
        assert memory.gradient_bytes == sum(b.grad_data.numel() * b.grad_data.element_size() for b in optimizer.buffers)
        assert memory.optimizer_bytes == optimizer.state_numel() * 4


def test_inference_weights_are_the_parameters_alone():
    cfg = TINY_MODELS["llama"]
    memory = stage_memory(cfg, Layout(tp=2), 0, 2, training=False)
    assert memory.parameter_bytes == memory.parameters * 2 and memory.gradient_bytes == memory.optimizer_bytes == 0
