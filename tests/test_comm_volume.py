"""Bytes moved per step per group, measured by the comm module, against the analytic formulas.

Per microbatch on a stage with L layers, TP moves [b, s, h] activations:
  without SP: 4 all-reduces per layer (2 forward after the row-parallel blocks, 2 backward before the
              column-parallel ones), +1 for the vocabulary-parallel embedding (forward), +1 for the
              head's input (backward);
  with SP:    each of those all-reduces becomes one all-gather and one reduce-scatter of the same
              full tensor (same ring volume: 2(n-1)/n of it per rank);
plus 3 all-reduces of [b, s] fp32 in the vocabulary-parallel cross-entropy on the last stage.
PP moves one activation forward and one gradient backward per microbatch per stage boundary.
"""

import pytest

from equivalence import GLOBAL_BATCH, SEQ, SEED, TINY_MODELS, global_batches
from megatron_lite.models.config import BuildOptions
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.training.step import run_schedule

MICROBATCHES = 2


def _traffic(rank, world, model, tp, pp, sequence_parallel):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, pp=pp))
    cfg = TINY_MODELS[model]
    chunks = build_model_chunks(cfg, layout, SEED, options=BuildOptions(sequence_parallel=sequence_parallel))
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    layout.stats.reset()
    run_schedule(chunks, build_schedule("1f1b", pp, MICROBATCHES), tokens, targets, layout)
    stage = chunks[0]
    return (dict(layout.stats.bytes), dict(layout.stats.wire_bytes), len(stage.layers),
            stage.embedding is not None, stage.head is not None)


@pytest.mark.parametrize("model,tp,pp,sp", [
    ("gpt2", 2, 1, False), ("gpt2", 2, 1, True), ("llama", 4, 1, True),
    ("gpt2_deep", 2, 2, False), ("llama_deep", 2, 2, True),
])
def test_bytes_per_step_match_the_formulas(model, tp, pp, sp):
    cfg = TINY_MODELS[model]
    b = GLOBAL_BATCH // MICROBATCHES
    activation = b * SEQ * cfg.hidden_size * 4  # fp32 [b, s, h]
    for traffic, wire, layers, first, last in run_on_ranks(_traffic, tp * pp, model, tp, pp, sp):
        crossings = MICROBATCHES * (4 * layers + first + last)
        cross_entropy = MICROBATCHES * 3 * b * SEQ * 4 if last else 0
        if sp:
            assert traffic[("tp", "all_gather")] == crossings * activation
            assert traffic[("tp", "reduce_scatter")] == crossings * activation
            assert traffic.get(("tp", "all_reduce"), 0) == cross_entropy
        else:
            assert traffic[("tp", "all_reduce")] == crossings * activation + cross_entropy
            assert ("tp", "all_gather") not in traffic and ("tp", "reduce_scatter") not in traffic
        ring = 2 * (tp - 1) / tp
        tp_wire = sum(v for (group, _), v in wire.items() if group == "tp")
        assert tp_wire == pytest.approx(ring * (crossings * activation + cross_entropy))
        boundaries = pp - 1 if pp > 1 else 0
        per_rank_boundaries = (not first) + (not last) if boundaries else 0
        pp_activation = activation // (tp if sp else 1)
        assert traffic.get(("pp", "send"), 0) == per_rank_boundaries * MICROBATCHES * pp_activation
