"""Pipeline parallelism trains the same model as one process, for every schedule, and never hangs."""

import pytest

from equivalence import Case
from megatron_lite.models.partition import split_layers
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.pipeline.schedules import build_schedule
from test_equivalence import check_case


def microbatch_counts(p):
    return sorted({1, p - 1, p, 2 * p})


CASES = (
    [Case("gpt2_deep", pp=p, microbatches=m, schedule=s)  # tied embeddings split over the pipeline ends
     for s in ("gpipe", "1f1b") for p in (2, 4) for m in microbatch_counts(p)]
    + [Case("llama_deep", pp=p, microbatches=m, schedule=s)  # untied, GQA
       for s, p, m in (("1f1b", 2, 2), ("1f1b", 4, 8), ("gpipe", 4, 3), ("1f1b", 4, 1))]
    + [Case(model, pp=p, microbatches=m, schedule="interleaved_1f1b", virtual_stages=2)
       for model, p, m in (("gpt2_deep", 2, 2), ("gpt2_deep", 2, 4), ("gpt2_deep", 4, 4), ("gpt2_deep", 4, 8),
                           ("llama_deep", 2, 4), ("llama_deep", 4, 4))]
    # Receives in the plan's order (as on NCCL), and posted far ahead of it.
    + [Case("gpt2_deep", pp=4, microbatches=8, schedule=s, virtual_stages=v, receive_lookahead=ahead)
       for s, v in (("1f1b", 1), ("interleaved_1f1b", 2)) for ahead in (0, 5)]
    + [Case(model, tp=2, pp=2, dp=2, microbatches=2, schedule=s, virtual_stages=v)  # full 3D on 8 ranks
       for model, s, v in (("gpt2_deep", "1f1b", 1), ("llama_deep", "1f1b", 1), ("gpt2_deep", "interleaved_1f1b", 2))]
)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pipeline_matches_serial(case, equivalence_report):
    check_case(case, equivalence_report)


def test_interleaving_needs_layers_divisible_into_chunks():
    with pytest.raises(ValueError, match=r"num_layers=8 cannot be split into pp\*virtual_stages=4\*3=12"):
        split_layers(8, 4, 3)


def test_interleaving_needs_microbatches_multiple_of_stages():
    with pytest.raises(ValueError, match=r"microbatches to be a multiple of pp=4, got 6"):
        build_schedule("interleaved_1f1b", 4, 6, 2)


def test_explicit_and_balanced_stage_partitions():
    assert split_layers(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split_layers(6, 2, layers_per_stage=[1, 5]) == [[0], [1, 2, 3, 4, 5]]
    assert split_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match=r"layers_per_stage=\[2, 2\] must list 2 positive counts .* summing to model.num_layers=6"):
        split_layers(6, 2, layers_per_stage=[2, 2])


def _one_step_traffic(rank, world, m, schedule):
    import torch

    from equivalence import SEED, TINY_MODELS, global_batches
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.pipeline.executor import PipelineExecutor
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.training.step import split_microbatches

    layout = ParallelLayout.from_mesh(ParallelSizes(pp=world))
    cfg = TINY_MODELS["gpt2_deep"]
    chunks = build_model_chunks(cfg, layout, SEED)
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    plan = build_schedule(schedule, world, m)
    shape = (tokens.shape[0] // m, tokens.shape[1], cfg.hidden_size)
    executor = PipelineExecutor(plan, chunks, layout, shape)
    layout.stats.reset()
    executor.run(split_microbatches(tokens, m), split_microbatches(targets, m))
    return dict(layout.stats.bytes), executor.released_outputs, executor.peak_pending_sends, torch.Size(shape).numel() * 4


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_p2p_volume_and_released_outputs(schedule):
    """Per microbatch and stage boundary: one activation forward and one gradient back, nothing else
    (no shape handshake). Every sent forward output stops pinning its storage, and under 1F1B send
    buffers are dropped as the plan proves them delivered, so they do not pile up over the step."""
    p, m = 4, 8
    results = run_on_ranks(_one_step_traffic, p, m, schedule)
    for rank, (traffic, released, peak_sends, activation_bytes) in enumerate(results):
        boundaries = (rank > 0) + (rank < p - 1)
        assert traffic.get(("pp", "send"), 0) == boundaries * m * activation_bytes
        assert traffic.get(("pp", "recv"), 0) == boundaries * m * activation_bytes
        assert released == (m if rank < p - 1 else 0)
        if schedule == "1f1b":
            assert peak_sends <= p + 1, (rank, peak_sends)
