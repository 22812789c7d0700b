"""Pipeline schedules as data: builders, validator, simulator and renderers (in-process, fast)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_lite.pipeline.schedules import (
    Action,
    ActionKind,
    PipelinePlan,
    build_schedule,
)
from megatron_lite.models.partition import check_layer_split
from megatron_lite.pipeline.simulate import (
    analytic_bubble_fraction,
    render_png,
    render_text,
    simulate,
)
from megatron_lite.pipeline.validate import PlanError, validate_plan

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
SEND_F, RECV_F = ActionKind.SEND_ACTIVATION, ActionKind.RECV_ACTIVATION
SEND_B, RECV_B = ActionKind.SEND_GRAD, ActionKind.RECV_GRAD

STAGES = range(1, 9)
MICROBATCHES = range(1, 33)
CHUNKS = (2, 3, 4)
COSTS = [(1.0, 1.0), (1.0, 2.0)]  # (forward, backward): equal costs and the default 1:2


def compute_order(plan: PipelinePlan, rank: int) -> list[str]:
    """Compact compute order of one rank, e.g. ['F0', 'F1', 'B0']."""
    return [
        f"{a.kind.value}{a.microbatch}" + (f"c{a.chunk}" if plan.virtual_stages > 1 else "")
        for a in plan.actions[rank]
        if a.kind.is_compute
    ]


def with_rank_actions(plan: PipelinePlan, rank: int, actions: list[Action]) -> PipelinePlan:
    lists = list(plan.actions)
    lists[rank] = tuple(actions)
    return replace(plan, actions=tuple(lists))


# ---------------------------------------------------------------- every plan in the grid is valid


@pytest.mark.parametrize("p", STAGES)
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_plans_validate(name, p):
    for m in MICROBATCHES:  # includes m < p, the case that hangs in many frameworks
        validate_plan(build_schedule(name, p, m))


@pytest.mark.parametrize("v", CHUNKS)
@pytest.mark.parametrize("p", STAGES)
def test_interleaved_plans_validate_or_are_refused(p, v):
    for m in MICROBATCHES:
        if m % p == 0:
            validate_plan(build_schedule("interleaved_1f1b", p, m, v))
        else:
            with pytest.raises(ValueError, match=f"multiple of pp={p}, got {m}; use"):
                build_schedule("interleaved_1f1b", p, m, v)


# ---------------------------------------------------------------- bubble and memory


@pytest.mark.parametrize("costs", COSTS)
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_matches_formula_gpipe_and_1f1b(name, costs):
    for p in STAGES:
        for m in MICROBATCHES:
            result = simulate(build_schedule(name, p, m), *costs)
            assert result.bubble_fraction == pytest.approx(analytic_bubble_fraction(p, m)), (p, m)


@pytest.mark.parametrize("costs", COSTS)
@pytest.mark.parametrize("v", CHUNKS)
def test_bubble_matches_formula_interleaved(v, costs):
    # The sweep p=1..8, m=1..32 (m a multiple of p), v=2..4 reaches (p-1)/(v*m+p-1) exactly with
    # both cost ratios, so the assertion is not restricted. It holds only with comm_cost == 0:
    # each send/receive on the critical path adds to the makespan but not to busy time.
    for p in STAGES:
        for m in range(p, MICROBATCHES.stop, p):
            result = simulate(build_schedule("interleaved_1f1b", p, m, v), *costs)
            expected = analytic_bubble_fraction(p, m, v)
            assert result.bubble_fraction == pytest.approx(expected), (p, m, v)


def test_interleaving_shrinks_the_bubble():
    plain = simulate(build_schedule("1f1b", 4, 8)).bubble_fraction
    interleaved = simulate(build_schedule("interleaved_1f1b", 4, 8, 2)).bubble_fraction
    assert interleaved < plain


def test_peak_in_flight_1f1b_is_min_of_remaining_stages_and_microbatches():
    for p in STAGES:
        for m in MICROBATCHES:
            peaks = simulate(build_schedule("1f1b", p, m)).peak_in_flight
            assert peaks == tuple(min(p - r, m) for r in range(p)), (p, m)


def test_peak_in_flight_gpipe_is_all_microbatches():
    for p in STAGES:
        for m in MICROBATCHES:
            assert simulate(build_schedule("gpipe", p, m)).peak_in_flight == (m,) * p


def test_comm_cost_delays_the_pipeline():
    # p=2, m=1: F on rank 0, message, F and B on rank 1, message, B on rank 0.
    result = simulate(build_schedule("1f1b", 2, 1), 1.0, 2.0, comm_cost=0.5)
    assert result.makespan == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)
    assert result.busy == (3.0, 3.0)


# ---------------------------------------------------------------- shape of the schedules


def test_1f1b_order_warmup_steady_cooldown():
    plan = build_schedule("1f1b", 4, 6)
    assert compute_order(plan, 0) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5".split()
    assert compute_order(plan, 3) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5".split()


def test_1f1b_with_fewer_microbatches_than_stages():
    plan = build_schedule("1f1b", 4, 2)
    assert compute_order(plan, 0) == "F0 F1 B0 B1".split()
    assert compute_order(plan, 3) == "F0 B0 F1 B1".split()


def test_gpipe_runs_backwards_last_in_first_out():
    assert compute_order(build_schedule("gpipe", 2, 3), 0) == "F0 F1 F2 B2 B1 B0".split()


def test_interleaved_order_walks_chunks_in_blocks_of_p():
    plan = build_schedule("interleaved_1f1b", 2, 2, 2)
    # rank 0 warms up with (p-1)*2 + (v-1)*p = 4 forwards: all of them.
    assert compute_order(plan, 0) == "F0c0 F1c0 F0c1 F1c1 B0c1 B1c1 B0c0 B1c0".split()
    assert compute_order(plan, 1) == "F0c0 F1c0 F0c1 B0c1 F1c1 B1c1 B0c0 B1c0".split()


def test_communication_sits_next_to_its_compute():
    plan = build_schedule("1f1b", 4, 8)
    first, last = plan.actions[0], plan.actions[3]
    assert not any(a.kind in (RECV_F, SEND_B) for a in first)
    assert not any(a.kind in (SEND_F, RECV_B) for a in last)
    for rank, actions in enumerate(plan.actions):
        for i, action in enumerate(actions):
            if action.kind is F and rank > 0:
                assert actions[i - 1] == Action(RECV_F, action.microbatch, 0, rank - 1)
            if action.kind is F and rank < 3:
                assert actions[i + 1] == Action(SEND_F, action.microbatch, 0, rank + 1)
            if action.kind is B and rank < 3:
                assert actions[i - 1] == Action(RECV_B, action.microbatch, 0, rank + 1)


def test_interleaved_wraps_from_last_rank_to_next_chunk():
    plan = build_schedule("interleaved_1f1b", 2, 2, 2)
    # virtual stage 1 (rank 1, chunk 0) feeds virtual stage 2 (rank 0, chunk 1)
    assert Action(SEND_F, 0, 0, peer=0) in plan.actions[1]
    assert Action(RECV_F, 0, 1, peer=1) in plan.actions[0]
    # virtual stage 3 (rank 1, chunk 1) is last: it sends no activation and receives no grad
    assert not any(a.chunk == 1 and a.kind in (SEND_F, RECV_B) for a in plan.actions[1])


@pytest.mark.parametrize("name, v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 3)])
def test_single_stage_has_no_communication(name, v):
    plan = build_schedule(name, 1, 4, v)
    assert all(a.kind.is_compute for a in plan.actions[0])
    validate_plan(plan)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "name, p, m, v, message",
    [
        ("pipedream", 4, 8, 1, "gpipe, 1f1b, interleaved_1f1b"),
        ("1f1b", 0, 8, 1, "num_stages must be an integer >= 1, got 0"),
        ("gpipe", 4, 0, 1, "num_microbatches must be an integer >= 1, got 0"),
        ("interleaved_1f1b", 4, 8, 0, "virtual_stages must be an integer >= 1, got 0"),
        ("1f1b", 4, 8, 2, "use virtual_stages=1 or schedule interleaved_1f1b"),
        ("gpipe", 4, 8, 2, "got virtual_stages=2"),
        ("interleaved_1f1b", 4, 8, 1, "needs virtual_stages >= 2, got 1"),
        ("interleaved_1f1b", 4, 6, 2, "multiple of pp=4, got 6; use 4 or 8"),
        ("interleaved_1f1b", 4, 3, 2, "multiple of pp=4, got 3; use 4"),
    ],
)
def test_bad_arguments_raise_value_error(name, p, m, v, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(name, p, m, v)


def test_check_layer_split():
    assert check_layer_split(24, 4, 2) == 3
    assert check_layer_split(4, 4) == 1
    with pytest.raises(ValueError, match="num_layers=10 .* multiple of 4 .*8 or 12"):
        check_layer_split(10, 4, 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_layer_split(6, 4, 2)
    with pytest.raises(ValueError, match="virtual_stages"):
        check_layer_split(8, 4, 0)


# ---------------------------------------------------------------- broken plans are rejected


def test_missing_send_is_rejected():
    plan = build_schedule("1f1b", 2, 2)
    rank0 = [a for a in plan.actions[0] if a != Action(SEND_F, 1, 0, peer=1)]
    with pytest.raises(PlanError, match=r"missing SEND_F\(mb=1\) on rank 0"):
        validate_plan(with_rank_actions(plan, 0, rank0))


def test_missing_receive_is_rejected():
    plan = build_schedule("gpipe", 2, 2)
    rank0 = [a for a in plan.actions[0] if a != Action(RECV_B, 0, 0, peer=1)]
    with pytest.raises(PlanError, match="runs before RECV_B"):
        validate_plan(with_rank_actions(plan, 0, rank0))


def test_receives_swapped_within_a_channel_are_rejected():
    # rank 1 takes mb 1 before mb 0 from rank 0: P2P delivers in send order, so it would get
    # mb 0's activation and label it mb 1.
    plan = build_schedule("gpipe", 2, 2)
    rank1 = list(plan.actions[1])
    expected = [Action(RECV_F, 0, 0, 0), Action(F, 0), Action(RECV_F, 1, 0, 0), Action(F, 1)]
    assert rank1[:4] == expected
    rank1[:4] = rank1[2:4] + rank1[:2]
    with pytest.raises(PlanError, match="delivered in order.*reorder the receives on rank 1"):
        validate_plan(with_rank_actions(plan, 1, rank1))


def test_receive_moved_before_the_send_it_depends_on_deadlocks():
    # rank 0 waits for mb 1's gradient before sending mb 1's activation: rank 1 waits for that
    # activation, so neither can move.
    plan = build_schedule("gpipe", 2, 2)
    rank0 = list(plan.actions[0])
    assert rank0[3:5] == [Action(SEND_F, 1, 0, 1), Action(RECV_B, 1, 0, 1)]
    rank0[3], rank0[4] = rank0[4], rank0[3]
    with pytest.raises(PlanError, match="deadlocks") as error:
        validate_plan(with_rank_actions(plan, 0, rank0))
    assert r"rank 0 waits at action #3 RECV_B(mb=1, chunk=0, peer=1)" in str(error.value)
    assert r"rank 1 waits at action #2 RECV_F(mb=1, chunk=0, peer=0)" in str(error.value)
    with pytest.raises(PlanError, match="deadlocks"):
        simulate(with_rank_actions(plan, 0, rank0))


def test_backward_before_forward_is_rejected():
    plan = build_schedule("1f1b", 2, 2)
    last = list(plan.actions[1])
    assert last[1:3] == [Action(F, 0), Action(B, 0)]
    last[1], last[2] = last[2], last[1]
    with pytest.raises(PlanError, match=r"rank 1 action #1 B\(mb=0, chunk=0\): runs before F\(mb=0"):
        validate_plan(with_rank_actions(plan, 1, last))


def test_forward_run_twice_is_rejected():
    plan = build_schedule("1f1b", 1, 2)
    actions = list(plan.actions[0]) + [Action(F, 0)]
    with pytest.raises(PlanError, match=r"rank 0 runs F\(mb=0, chunk=0\) 2 times"):
        validate_plan(with_rank_actions(plan, 0, actions))


def test_wrong_peer_is_rejected():
    plan = build_schedule("1f1b", 3, 2)
    actions = [replace(a, peer=0) if a.kind is SEND_F else a for a in plan.actions[1]]
    with pytest.raises(PlanError, match="peer must be rank 2"):
        validate_plan(with_rank_actions(plan, 1, actions))


def test_send_from_last_stage_is_rejected():
    plan = build_schedule("1f1b", 2, 1)
    actions = list(plan.actions[1]) + [Action(SEND_F, 0, 0, peer=0)]
    with pytest.raises(PlanError, match="end of the pipeline"):
        validate_plan(with_rank_actions(plan, 1, actions))


# ---------------------------------------------------------------- rendering and CLI


@pytest.mark.parametrize("name, p, m, v", [("1f1b", 4, 8, 1), ("interleaved_1f1b", 2, 4, 2)])
def test_text_timeline_has_one_row_per_rank(name, p, m, v):
    text = render_text(simulate(build_schedule(name, p, m, v)))
    rows = [line for line in text.splitlines() if line.startswith("rank")]
    assert len(rows) == p
    assert len({len(row) for row in rows}) == 1  # all rows span the same time axis
    assert "legend" in text and "bubble=" in text
    if v > 1:
        assert "0a" in rows[0] and "0b" in rows[0]


def test_text_timeline_respects_width():
    text = render_text(simulate(build_schedule("1f1b", 4, 16)), width=60)
    rows = [line for line in text.splitlines() if line.startswith("rank")]
    assert all(len(row.split("|")[1]) <= 60 for row in rows)


def test_png_is_written(tmp_path):
    path = tmp_path / "schedule.png"
    render_png(simulate(build_schedule("interleaved_1f1b", 2, 4, 2)), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cli(monkeypatch):
    """scripts/schedule.py loaded as a module (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "schedule.py"
    spec = importlib.util.spec_from_file_location("schedule_cli", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules while the module executes
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_timeline_and_writes_png(cli, tmp_path, capsys):
    png = tmp_path / "1f1b.png"
    assert cli.main(["schedule=1f1b", "pp=4", "microbatches=8", f"png={png}"]) == 0
    out = capsys.readouterr().out
    assert "simulated 0.2727, analytic (p-1)/(v*m+p-1) = 0.2727" in out
    assert "rank 0: 4, rank 1: 3, rank 2: 2, rank 3: 1" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pipeline=4"], "Key 'pipeline' not in"),
        (["pp=four"], "could not be converted to Integer"),
        (["schedule=interleaved_1f1b", "virtual_stages=2", "microbatches=6"], "multiple of pp=4"),
    ],
)
def test_cli_reports_bad_arguments(cli, argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
