"""Sequence parallelism and activation recomputation keep the serial-equivalence invariant, and
dropout masks follow the TP regions (differ where ranks hold different pieces, agree on replicas)."""

import pytest
import torch

from equivalence import Case
from megatron_lite.models.config import BuildOptions, gpt2_config
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.random import DropoutRNG, dropout
from megatron_lite.parallel.spawn import run_on_ranks
from test_equivalence import check_case

CASES = (
    [Case(model, tp=tp, microbatches=2, sequence_parallel=True) for model in ("gpt2", "llama") for tp in (2, 4)]
    + [Case(model, tp=2, pp=2, dp=2, microbatches=2, sequence_parallel=True) for model in ("gpt2_deep", "llama_deep")]
    + [Case(model, tp=2, pp=2, dp=2, microbatches=2, recompute=r) for model in ("gpt2_deep", "llama_deep")
       for r in ("full", "selective")]
    + [Case("gpt2_deep", tp=2, pp=2, dp=2, microbatches=4, schedule="interleaved_1f1b", virtual_stages=2,
            sequence_parallel=True, recompute="full")]
)


# LLaMA with selective recomputation and the interleaved GPT-2 case with both stay in every run.
MATRIX = {"gpt2_deep tp=2 pp=2 dp=2 m=2 1f1b recompute=full", "gpt2_deep tp=2 pp=2 dp=2 m=2 1f1b recompute=selective",
          "llama_deep tp=2 pp=2 dp=2 m=2 1f1b recompute=full"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.matrix) if str(c) in MATRIX else c
                                  for c in CASES], ids=str)
def test_matches_serial(case, equivalence_report):
    check_case(case, equivalence_report)


def _masks(rank, world, sequence_parallel):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=world))
    rng = DropoutRNG(seed=5, layout=layout, stream="layers0")
    ones = torch.ones(64)
    replicated = dropout(ones, 0.5, rng.replicated, True)
    tensor_parallel = dropout(ones, 0.5, rng.tensor_parallel, True)
    from megatron_lite.models.transformer import StageContext

    ctx = StageContext(gpt2_config(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, dropout=0.5), layout.tp,
                       BuildOptions(sequence_parallel=sequence_parallel), rng, layout.group("ep"))
    residual = dropout(ones, 0.5, ctx.residual_generator(), True)
    return replicated, tensor_parallel, residual


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_dropout_masks_follow_tp_regions(sequence_parallel):
    first, second = run_on_ranks(_masks, 2, sequence_parallel)
    assert torch.equal(first[0], second[0]), "replicated region: TP ranks must drop the same elements"
    assert not torch.equal(first[1], second[1]), "TP region: each rank draws its own mask"
    # Residual stream: replicated without SP, sequence-split (so rank-specific) with SP.
    assert torch.equal(first[2], second[2]) != sequence_parallel
    again = run_on_ranks(_masks, 2, sequence_parallel)
    assert all(torch.equal(a, b) for a, b in zip(first + second, again[0] + again[1])), "reproducible from the seed"
    assert 0.3 < (first[0] == 0).float().mean() < 0.7


def _recomputed_dropout_grads(rank, world, recompute):
    from equivalence import global_batches
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.training.step import run_schedule

    layout = ParallelLayout.from_mesh(ParallelSizes(tp=world))
    cfg = gpt2_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16, dropout=0.3)
    chunks = build_model_chunks(cfg, layout, 3, options=BuildOptions(recompute=recompute))
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    loss = run_schedule(chunks, build_schedule("1f1b", 1, 2), tokens, targets, layout)
    return loss, {n: p.grad.clone() for n, p in chunks[0].named_parameters()}


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_replays_the_dropout_masks(recompute):
    """With dropout on, recomputed forwards must draw the masks of the original forward: gradients
    equal those of the run that stores activations (TP=2, so both RNG streams are exercised)."""
    stored_loss, stored = run_on_ranks(_recomputed_dropout_grads, 2, "none")[0]
    loss, grads = run_on_ranks(_recomputed_dropout_grads, 2, recompute)[0]
    assert loss == stored_loss
    for name, grad in stored.items():
        assert torch.allclose(grads[name], grad, rtol=1e-6, atol=1e-9), name
