"""Pipeline transports: every built plan is proven deadlock-free on the transport it runs on, the NCCL
model finds the deadlock of the previous batching, and NCCL's in-order rendezvous semantics run on
gloo (one transfer at a time; gloo's sends complete only once the receive is posted)."""

from __future__ import annotations

import time

import pytest

from equivalence import Case
from megatron_lite.parallel.spawn import RankFailure, run_on_ranks
from megatron_lite.pipeline.program import Transfer, build_programs
from megatron_lite.pipeline.schedules import build_schedule, forward_only_plan
from megatron_lite.pipeline.transport import GLOO, NCCL, NCCL_EAGER
from megatron_lite.pipeline.validate import PlanError, validate_plan, validate_program
from test_equivalence import check_case


def _plans():
    for p in range(1, 9):
        for m in range(1, 33):
            yield build_schedule("gpipe", p, m)
            yield build_schedule("1f1b", p, m)
            if m % p == 0:
                for v in (2, 3, 4):
                    yield build_schedule("interleaved_1f1b", p, m, v)


def test_every_plan_is_deadlock_free_under_nccl_rendezvous():
    """GPipe, 1F1B, interleaved (p <= 8, m <= 32, v <= 4): the programs built for NCCL (matched
    transfers) replay without deadlock under in-order rendezvous and in-order eager semantics, and so
    do their forward-only versions; gloo's programs (receives posted one ahead) under gloo's."""
    count = 0
    for plan in _plans():
        validate_plan(plan, NCCL)
        if plan.num_stages <= 4 and plan.num_microbatches <= 8:  # the other models on a smaller grid
            validate_program(plan, build_programs(plan, "matched"), NCCL_EAGER)
            validate_plan(forward_only_plan(plan), NCCL)
            validate_plan(plan, GLOO, receive_lookahead=1)
        count += 1
    assert count == 2 * 8 * 32 + sum(3 * (32 // p) for p in range(1, 9))


def test_the_previous_batching_deadlocks_interleaved_plans_on_nccl():
    """The executor's former batching (each run of consecutive sends/receives as one transfer), replayed
    under NCCL's semantics: GPipe and 1F1B survive, interleaved 1F1B deadlocks whenever m > p. So the
    replay can fail, and it fails where the analysis of the issue said."""
    deadlocked = []
    for plan in _plans():
        try:
            validate_program(plan, build_programs(plan, "consecutive"), NCCL)
        except PlanError:
            deadlocked.append((plan.name, plan.num_stages, plan.num_microbatches, plan.virtual_stages))
    expected = [("interleaved_1f1b", p, m, v) for p in range(2, 9) for m in range(2 * p, 33, p) for v in (2, 3, 4)]
    assert sorted(deadlocked) == sorted(expected)
    plan = build_schedule("interleaved_1f1b", 2, 4, 2)
    with pytest.raises(PlanError, match=r"deadlocks on the nccl transport: rank 0 blocked in transfer #\d+ "
                                        r"\[SEND_B\(mb=0, chunk=1, peer=1\)\]; rank 1 blocked in transfer"):
        validate_program(plan, build_programs(plan, "consecutive"), NCCL)
    # The same programs are fine where sends never hold up what was posted after them.
    validate_program(plan, build_programs(plan, "consecutive"), GLOO)


def test_matched_transfers_pair_opposite_directions_in_steady_1f1b():
    """In 1F1B's steady state each transfer carries one send and one receive in opposite directions
    (Megatron's send_forward_recv_backward / send_backward_recv_forward)."""
    plan = build_schedule("1f1b", 4, 8)
    for rank in (1, 2):
        transfers = [s for s in build_programs(plan, "matched")[rank] if isinstance(s, Transfer)]
        paired = [t for t in transfers if len(t.actions) == 2 and {a.kind.is_send for a in t.actions} == {True, False}]
        assert len(paired) >= 8, (rank, [str(t) for t in transfers])


# ----------------------------------------------------------------------------- on real ranks

CASES = [
    # NCCL's programs, run with one transfer at a time on gloo: equal to one process.
    Case("gpt2_deep", pp=2, microbatches=4, schedule="interleaved_1f1b", virtual_stages=2, transport="nccl"),
    Case("llama_deep", pp=4, microbatches=8, schedule="interleaved_1f1b", virtual_stages=2, transport="nccl"),
    Case("gpt2_deep", pp=4, microbatches=8, schedule="1f1b", transport="nccl"),
    Case("gpt2_deep", tp=2, pp=2, dp=2, microbatches=4, schedule="interleaved_1f1b", virtual_stages=2,
         transport="nccl"),
    # pp=1 with several model chunks: the virtual stages hand over locally.
    Case("gpt2_deep", pp=1, microbatches=2, schedule="interleaved_1f1b", virtual_stages=2),
    Case("llama_deep", tp=2, pp=1, microbatches=3, schedule="interleaved_1f1b", virtual_stages=4),
    Case("gpt2_deep", pp=1, microbatches=3, schedule="gpipe"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_transport_and_local_handoff_match_serial(case, equivalence_report):
    check_case(case, equivalence_report)


def _old_batching_on_strict_transport(rank, world):
    from equivalence import SEED, TINY_MODELS, global_batches
    from megatron_lite.data.microbatches import split_microbatches
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.pipeline.executor import PipelineExecutor

    layout = ParallelLayout.from_mesh(ParallelSizes(pp=world))
    cfg = TINY_MODELS["gpt2_deep"]
    chunks = build_model_chunks(cfg, layout, SEED, virtual_stages=2)
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    plan = build_schedule("interleaved_1f1b", world, 4, 2)
    executor = PipelineExecutor(plan, chunks, layout, (tokens.shape[0] // 4, tokens.shape[1], cfg.hidden_size),
                                transport=NCCL, batching="consecutive")
    executor.run(split_microbatches(tokens, 4), split_microbatches(targets, 4))


def test_the_previous_batching_hangs_on_real_ranks_with_in_order_semantics():
    """What the validator predicts happens: interleaved p=2, m=4 with the former batching, one transfer at
    a time, hangs (and the harness turns the hang into an error)."""
    start = time.monotonic()
    with pytest.raises(RankFailure, match="timed out"):
        run_on_ranks(_old_batching_on_strict_transport, 2, timeout_s=6)
    assert time.monotonic() - start < 60
