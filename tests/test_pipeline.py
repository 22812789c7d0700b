"""Pipeline parallelism trains the same model as one process, for every schedule, and never hangs."""

import pytest

from equivalence import Case
from megatron_lite.pipeline.partition import split_layers
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
