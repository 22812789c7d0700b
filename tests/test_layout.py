"""The layout: rank order, groups, neighbours, and bad layouts failing fast with a clear message."""

import time

import pytest
import torch.distributed as dist

from megatron_lite.models.config import check_model_fits_layout, gpt2_config, llama_config
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes, check_sizes, coordinates_of, rank_at
from megatron_lite.parallel.spawn import RankFailure, run_on_ranks


def _describe(rank, world, tp, pp, dp):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, pp=pp, dp=dp))
    return {
        "coords": (layout.pp.rank, layout.dp.rank, layout.tp.rank),
        "groups": {name: getattr(layout, name).ranks for name in ("tp", "pp", "dp")},
        "first_last": (layout.is_first_stage, layout.is_last_stage),
        "neighbours": (layout.prev_stage_rank, layout.next_stage_rank),
    }


def test_mesh_groups_follow_megatron_rank_order():
    """TP innermost, then DP, then PP (checked against the closed-form rank order, 8 ranks)."""
    sizes = ParallelSizes(tp=2, pp=2, dp=2)
    for rank, info in enumerate(run_on_ranks(_describe, 8, 2, 2, 2)):
        expected = coordinates_of(rank, sizes)
        pp, dp, tp = expected["pp"], expected["dp"], expected["tp"]
        assert info["coords"] == (pp, dp, tp)
        assert info["groups"]["tp"] == tuple(rank_at(sizes, pp, dp, t) for t in range(2))
        assert info["groups"]["dp"] == tuple(rank_at(sizes, pp, d, tp) for d in range(2))
        assert info["groups"]["pp"] == tuple(rank_at(sizes, p, dp, tp) for p in range(2))
        assert info["first_last"] == (pp == 0, pp == 1)
        prev = rank_at(sizes, pp - 1, dp, tp) if pp else None
        nxt = rank_at(sizes, pp + 1, dp, tp) if pp < 1 else None
        assert info["neighbours"] == (prev, nxt)
    # TP neighbours are consecutive global ranks, so they share a node.
    assert rank_at(sizes, 1, 1, 1) - rank_at(sizes, 1, 1, 0) == 1


def test_world_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"world size 8 does not equal tp\*pp\*dp = 2\*2\*1 = 4"):
        check_sizes(ParallelSizes(tp=2, pp=2, dp=1), world_size=8)
    with pytest.raises(ValueError, match=r"parallel.tp must be a positive integer, got 0"):
        check_sizes(ParallelSizes(tp=0), world_size=1)


def _mismatched_layout(rank, world):
    ParallelLayout.from_mesh(ParallelSizes(tp=4))


def test_world_size_mismatch_fails_before_any_collective():
    """On real ranks: every rank raises at once (no collective that could hang is reached)."""
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"ValueError: world size 2 does not equal"):
        run_on_ranks(_mismatched_layout, 2, timeout_s=60)
    assert time.monotonic() - start < 30


def test_heads_not_divisible_by_tp():
    cfg = gpt2_config(vocab_size=50, hidden_size=48, num_layers=2, num_heads=6)
    with pytest.raises(ValueError, match=r"model.num_heads=6 is not divisible by parallel.tp=4; choose tp among \[1, 2, 3, 6\]"):
        check_model_fits_layout(cfg, ParallelSizes(tp=4))


def test_tp_neither_dividing_nor_divided_by_kv_heads():
    cfg = llama_config(vocab_size=50, hidden_size=48, num_layers=2, num_heads=12, num_kv_heads=3, ffn_hidden_size=96)
    check_model_fits_layout(cfg, ParallelSizes(tp=3))  # tp divides kv heads: split
    check_model_fits_layout(cfg, ParallelSizes(tp=6))  # tp is a multiple of kv heads: replicated
    with pytest.raises(ValueError, match=r"parallel.tp=4 neither divides nor is a multiple of model.num_kv_heads=3"):
        check_model_fits_layout(cfg, ParallelSizes(tp=4))


def test_other_model_layout_errors():
    with pytest.raises(ValueError, match=r"num_layers=2 is smaller than parallel.pp=4"):
        check_model_fits_layout(gpt2_config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4),
                                ParallelSizes(pp=4))
    with pytest.raises(ValueError, match=r"model.norm='batchnorm' is not one of"):
        gpt2_config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, norm="batchnorm")
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by model.num_kv_heads=3"):
        llama_config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=3)


# ----------------------------------------------------------------------------- the harness itself


def _one_rank_raises(rank, world):
    if rank == 1:
        raise RuntimeError("boom on rank one")
    dist.barrier()  # the healthy rank blocks here, waiting for the dead one


def test_harness_reports_the_failing_rank_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1 failed:.*RuntimeError: boom on rank one"):
        run_on_ranks(_one_rank_raises, 2, timeout_s=60)
    assert time.monotonic() - start < 30


def _hangs(rank, world):
    if rank == 0:
        time.sleep(120)
    dist.barrier()


def test_harness_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"timed out after 3s; ranks \[0, 1\] did not finish"):
        run_on_ranks(_hangs, 2, timeout_s=3)
    assert time.monotonic() - start < 20


def _dies(rank, world):
    if rank == 1:
        import os

        os._exit(3)
    dist.barrier()


def test_harness_reports_a_rank_that_dies_without_traceback():
    with pytest.raises(RankFailure, match=r"rank 1 died with exit code 3"):
        run_on_ranks(_dies, 2, timeout_s=60)
