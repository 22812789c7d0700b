"""Zero-bubble plans (ZB-H1, ZBV): valid on every transport, the published bubble and memory figures in the
simulator, and a clear error for each bad input."""

import pytest

from megatron_lite.pipeline.schedules import Action, ActionKind, PipelinePlan, build_schedule
from megatron_lite.pipeline.simulate import peak_activation_memory, render_text, simulate
from megatron_lite.pipeline.transport import GLOO, NCCL, NCCL_EAGER
from megatron_lite.pipeline.validate import PlanError, validate_plan

F, I, W = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT


def _zb(name, p, m):
    return build_schedule(name, p, m, 2 if name == "zbv" else 1)


@pytest.mark.parametrize("name", ["zb_h1", "zb_h2", "zbv"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_plans_validate_on_every_transport(name, p):
    for m in range(1, 2 * p + 3):  # m < p, m = p, m not a multiple of p
        plan = _zb(name, p, m)
        assert plan.split_backward
        for transport in (None, GLOO, NCCL, NCCL_EAGER):
            validate_plan(plan, transport, receive_lookahead=1)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_published_figures_with_equal_costs(p, m):
    """F = I = W = 1 (B = I + W = 2): ZB-H1's bubble is a third of 1F1B's, ZBV has none (from m >= 2p - 1
    on; its chunks hold half a rank's layers, so they cost half), both with 1F1B's activation memory."""
    one_f_one_b = simulate(build_schedule("1f1b", p, m), 1, 2)
    zb_h1 = simulate(_zb("zb_h1", p, m), 1, 2, input_cost=1, weight_cost=1)
    zbv = simulate(_zb("zbv", p, m), 0.5, 1, input_cost=0.5, weight_cost=0.5)
    assert sum(one_f_one_b.idle) == 3 * p * (p - 1)  # (p-1)(F+B) per rank
    assert sum(zb_h1.idle) * 3 == sum(one_f_one_b.idle)
    assert sum(zb_h1.inner_idle) * 3 == sum(one_f_one_b.inner_idle)
    assert zb_h1.makespan == 3 * m + p - 1  # a parallelogram: the start-up ramp and nothing else
    if m >= 2 * p - 1:
        assert sum(zbv.inner_idle) == 0
        assert zbv.makespan == 3 * m + (p - 1) / 2
    else:
        assert sum(zbv.inner_idle) > 0  # too few microbatches to fill the V (p=4, m=4)
    memory = peak_activation_memory(build_schedule("1f1b", p, m))
    assert peak_activation_memory(zb_h1.plan) == memory == peak_activation_memory(zbv.plan) == min(p, m)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_zb_h2_is_a_parallelogram_with_twice_the_memory(p, m):
    """Equal costs: no idle time inside any rank's span once m >= 2p - 1 (the published zero bubble), the
    makespan the start-up ramp plus the work, and 2p - 1 microbatches' activations at most (1F1B: p)."""
    zb_h2 = simulate(build_schedule("zb_h2", p, m), 1, 2)
    if m >= 2 * p - 1:
        assert sum(zb_h2.inner_idle) == 0 and zb_h2.makespan == 3 * m + p - 1
        assert peak_activation_memory(zb_h2.plan) == 2 * p - 1
    else:
        assert 0 < sum(zb_h2.inner_idle) < sum(simulate(build_schedule("zb_h1", p, m), 1, 2).inner_idle)
        assert peak_activation_memory(zb_h2.plan) <= min(m, 2 * p - 1)


def test_zb_h1_order_postpones_weights_by_rank():
    plan = build_schedule("zb_h1", 4, 8)
    computes = [[f"{a.kind.value}{a.microbatch}" for a in rank if a.kind.is_compute] for rank in plan.actions]
    assert computes[3][:8] == ["F0", "I0", "F1", "I1", "F2", "I2", "F3", "I3"]  # W's wait three steps
    assert computes[3][8:10] == ["W0", "F4"]
    assert computes[0][:7] == ["F0", "F1", "F2", "F3", "I0", "W0", "F4"]
    assert computes[0][-2:] == ["I7", "W7"] and computes[3][-4:] == ["W4", "W5", "W6", "W7"]


def test_zbv_turns_the_v_on_the_last_rank():
    plan = build_schedule("zbv", 2, 4, 2)
    assert plan.mapping == "v" and [plan.stage_of(r, c) for r in (0, 1) for c in (0, 1)] == [0, 3, 1, 2]
    last = [a for a in plan.actions[1] if a.microbatch == 0 and a.kind in (F, I)]
    assert last == [Action(F, 0, 0), Action(F, 0, 1), Action(I, 0, 1), Action(I, 0, 0)]  # handed over locally
    assert not any(a.kind.is_send and a.chunk == 0 and a.kind is ActionKind.SEND_ACTIVATION for a in plan.actions[1])


def _without(plan: PipelinePlan, rank: int, kind: ActionKind, mb: int) -> PipelinePlan:
    actions = list(plan.actions)
    actions[rank] = tuple(a for a in actions[rank] if not (a.kind is kind and a.microbatch == mb))
    return PipelinePlan(plan.name, plan.num_stages, plan.num_microbatches, plan.virtual_stages, tuple(actions),
                        mapping=plan.mapping)


def test_missing_w_is_rejected():
    with pytest.raises(PlanError, match=r"rank 1 runs W\(mb=2, chunk=0\) 0 times, expected exactly once \(every I"):
        validate_plan(_without(build_schedule("zb_h1", 2, 4), 1, W, 2))


def test_w_before_its_i_is_rejected():
    plan = build_schedule("zb_h1", 2, 4)
    rank0 = list(plan.actions[0])
    w = rank0.pop(next(i for i, a in enumerate(rank0) if a.kind is W and a.microbatch == 0))
    rank0.insert(0, w)
    bad = PipelinePlan(plan.name, 2, 4, 1, (tuple(rank0), plan.actions[1]))
    with pytest.raises(PlanError, match=r"rank 0 action #0 W\(mb=0, chunk=0\): runs before I\(mb=0, chunk=0\)"):
        validate_plan(bad)


def test_b_mixed_with_i_is_rejected():
    plan = build_schedule("zb_h1", 2, 2)
    rank1 = tuple(Action(ActionKind.BACKWARD, 0) if a == Action(I, 0) else a for a in plan.actions[1])
    with pytest.raises(PlanError, match=r"rank 1 runs W\(mb=0, chunk=0\) 1 times, expected never"):
        validate_plan(PipelinePlan(plan.name, 2, 2, 1, (plan.actions[0], rank1)))


@pytest.mark.parametrize("name, v, message", [
    ("zbv", 1, "zbv runs two model chunks per rank in a V, got virtual_stages=1; use virtual_stages=2"),
    ("zbv", 3, "got virtual_stages=3; use virtual_stages=2"),
    ("zb_h1", 2, "zb_h1 runs one model chunk per rank, got virtual_stages=2"),
    ("zb_h3", 1, "unknown schedule 'zb_h3'; choose one of gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zbv"),
    ("zb_h2", 2, "zb_h2 runs one model chunk per rank, got virtual_stages=2"),
])
def test_bad_arguments(name, v, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(name, 4, 8, v)


def test_timeline_draws_weight_passes():
    text = render_text(simulate(build_schedule("zb_h1", 2, 4), 1, 2))
    assert "'3ww' its weight gradients" in text and "0w" in text


from test_schedules import cli  # noqa: E402,F401 - the scripts/schedule.py fixture


def test_cli_shows_zero_bubble_schedules(cli, capsys):
    assert cli.main(["schedule=zbv", "pp=4", "microbatches=8", "virtual_stages=2"]) == 0
    out = capsys.readouterr().out
    assert "start-up ramp left out) 0.0000" in out and "'3ww' its weight gradients" in out
    assert "peak activation memory: 4 microbatches" in out
    assert cli.main(["schedule=zb_h3"]) == 2
    assert "unknown schedule 'zb_h3'; choose one of gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zbv" in \
        capsys.readouterr().err


def test_measured_timelines_read_like_simulations():
    """A timeline in the executor's format that is the simulation itself gives back the simulator's
    figures, and replaying its per-action durations reproduces it (with stage imbalance: the last rank's
    forwards twice as long)."""
    from megatron_lite.pipeline.simulate import measured, measured_costs

    plan = build_schedule("zbv", 2, 4, 2)
    costs = {(1, "F", mb, c): 2.0 for mb in range(4) for c in (0, 1)}
    result = simulate(plan, 1, 2, action_costs=costs)
    timelines = [[(s.kind.value, s.microbatch, s.chunk, s.start + 100.0, s.end + 100.0) for s in spans]
                 for spans in result.spans]
    again = measured(plan, timelines)
    assert (again.makespan, again.bubble_fraction, again.inner_idle) == (result.makespan, result.bubble_fraction,
                                                                          result.inner_idle)
    assert simulate(plan, action_costs=measured_costs(timelines)).makespan == result.makespan
    assert result.makespan > simulate(plan, 1, 2).makespan


def test_measured_comm_cost_is_the_transfer_latency():
    from megatron_lite.pipeline.simulate import measured_comm_cost

    plan = build_schedule("zb_h1", 2, 4)
    result = simulate(plan, 1, 2, comm_cost=0.25)
    timelines = [[(s.kind.value, s.microbatch, s.chunk, s.start, s.end) for s in spans] for spans in result.spans]
    assert measured_comm_cost(plan, timelines) == 0.25
    assert measured_comm_cost(plan, [[(k, mb, c, a, b) for k, mb, c, a, b in timelines[0]], []]) == 0.0
