"""The planner's bytes per training step per (group, op) equal the comm module's counters, rank by rank.

Each case runs one real optimizer step (train_step: pipeline schedule, bucketed DP reduction or
ZeRO-1 reduce-scatter and all-gather, partial-gradient sums, global norm) on spawned gloo ranks and
compares every counter of every rank with `training_step_traffic` for that rank's stage and DP rank.
Only the MoE all-to-all payload, which depends on the router's choices, is left out of the equality;
its count exchange is compared."""

import pytest

from equivalence import GLOBAL_BATCH, SEED, SEQ, TINY_MODELS, global_batches
from megatron_lite.models.config import BuildOptions
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.pipeline.schedules import build_schedule, schedule_mapping
from megatron_lite.planner.comm_volume import microbatches, training_step_traffic
from megatron_lite.planner.params import stage_memory
from megatron_lite.planner.spec import DTYPE_BYTES, Layout
from megatron_lite.training.step import train_step
from planner_helpers import TORCH_DTYPES, sizes_of

BUCKET_MB = 0.01


def _step(rank, world, model, layout: Layout, dtype):
    fw = ParallelLayout.from_mesh(sizes_of(layout))
    cfg = TINY_MODELS[model]
    options = BuildOptions(sequence_parallel=layout.sequence_parallel, recompute=layout.recompute,
                           dtype=TORCH_DTYPES[dtype])
    chunks = build_model_chunks(cfg, fw, SEED, virtual_stages=layout.virtual_stages, options=options,
                                mapping=schedule_mapping(layout.schedule))
    optimizer = build_optimizer(chunks, fw, OptimizerConfig(zero1=layout.zero1, bucket_size_mb=BUCKET_MB))
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    dp = fw.dp
    tokens, targets = tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank]
    plan = build_schedule(layout.schedule, layout.pp, microbatches(layout, GLOBAL_BATCH), layout.virtual_stages)
    train_step(chunks, optimizer, tokens, targets, fw, plan)
    allocated = (sum(b.param_data.numel() * b.param_data.element_size() for b in optimizer.buffers),
                 sum(b.grad_data.numel() * 4 for b in optimizer.buffers), optimizer.state_numel() * 4)
    return fw.pp.rank, fw.coordinates["dp"], dict(fw.stats.bytes), allocated


CASES = [
    ("gpt2_deep", Layout(tp=2, pp=2, micro_batch=12), "fp32"),  # tied embedding over the pipeline ends
    ("llama", Layout(tp=2, dp=2, micro_batch=4, sequence_parallel=True, zero1=True), "fp32"),
    ("llama_deep", Layout(pp=2, dp=2, micro_batch=3, schedule="interleaved_1f1b", virtual_stages=2,
                          recompute="full"), "fp32"),
    ("llama", Layout(tp=4, micro_batch=8, recompute="full"), "bf16"),  # 2 KV heads: sums over tp/2
    ("gpt2", Layout(tp=2, micro_batch=12, sequence_parallel=True, recompute="full"), "fp32"),
    ("gpt2_deep", Layout(tp=2, pp=2, dp=2, micro_batch=4, sequence_parallel=True, zero1=True), "bf16"),  # 3D
    ("moe", Layout(dp=2, ep=2, micro_batch=6), "fp32"),
    ("moe_e8", Layout(tp=2, dp=2, ep=2, micro_batch=12, sequence_parallel=True, zero1=True), "fp32"),
    # ZBV: no transfer at the V's turn, the tied embedding one weight on rank 0 (no sum over the ends)
    ("gpt2_deep", Layout(pp=2, dp=2, micro_batch=4, schedule="zbv", virtual_stages=2, zero1=True), "bf16"),
    ("llama_deep", Layout(tp=2, pp=2, micro_batch=6, schedule="zb_h1", sequence_parallel=True), "fp32"),
]


@pytest.mark.parametrize("model,layout,dtype", CASES, ids=lambda v: v.describe() if isinstance(v, Layout) else str(v))
def test_bytes_per_step_equal_the_counters(model, layout, dtype):
    cfg = TINY_MODELS[model]
    for stage, dp_rank, counted, allocated in run_on_ranks(_step, layout.world_size, model, layout, dtype):
        predicted = training_step_traffic(cfg, layout, SEQ, GLOBAL_BATCH, DTYPE_BYTES[dtype], stage, dp_rank,
                                          BUCKET_MB, include_expected=False)
        counted = {key: value for key, value in counted.items() if key != ("ep", "all_to_all")}
        assert predicted == counted, f"stage {stage} dp {dp_rank}"
        memory = stage_memory(cfg, layout, stage, DTYPE_BYTES[dtype], BUCKET_MB)
        assert (memory.parameter_bytes, memory.gradient_bytes, memory.optimizer_bytes) == allocated


def _decode_step(rank, world, layout: Layout, groups):
    from megatron_lite.inference import Generator

    fw = ParallelLayout.from_mesh(sizes_of(layout))
    cfg = DECODE_MODEL
    generator = Generator(cfg, fw, build_model_chunks(cfg, fw, seed=0))
    counted = []
    for new_tokens in (3, 4):
        fw.stats.reset()
        generator.generate(DECODE_PROMPTS, max_new_tokens=new_tokens, eos_id=None, groups=groups)
        counted.append(dict(fw.stats.bytes))
    one_step = {k: counted[1][k] - counted[0].get(k, 0) for k in counted[1] if counted[1][k] != counted[0].get(k, 0)}
    return fw.pp.rank, one_step


DECODE_MODEL = TINY_MODELS["llama"].with_(max_seq_len=32)
DECODE_PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]


@pytest.mark.parametrize("layout,groups", [(Layout(tp=2, pp=2), 2), (Layout(tp=4), 1), (Layout(pp=2, dp=2), 1)],
                         ids=lambda v: v.describe() if isinstance(v, Layout) else f"groups{v}")
def test_decode_step_bytes_equal_the_counters(layout, groups):
    """One more output token (a decode step of every request group) moves what decode_traffic says."""
    from megatron_lite.planner.inference_time import decode_traffic

    for stage, one_step in run_on_ranks(_decode_step, layout.world_size, layout, groups):
        assert decode_traffic(DECODE_MODEL, layout, len(DECODE_PROMPTS), 4, stage) == one_step
