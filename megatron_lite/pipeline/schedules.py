"""Pipeline schedules as plain data: one ordered list of actions per pipeline rank.

A schedule builder is a pure function of (p, m, v). It first decides the order of compute
actions (forward/backward per microbatch and model chunk) on every rank, then inserts the
point-to-point communication each compute action implies. The executor, the validator
(``validate.py``) and the simulator (``simulate.py``) all read the same lists, so what we check
and draw is exactly what runs.

Virtual stages follow Megatron ("loop" mapping): model chunk ``c`` on rank ``r`` is virtual stage
``c * p + r``. Activations flow from virtual stage ``s`` to ``s + 1`` (the next rank, wrapping to chunk
``c + 1`` after the last rank); gradients flow the other way. Without interleaving ``v == 1`` and the
virtual stage is just the rank. ZBV places its two chunks per rank in a V ("v" mapping): chunk 0 of
rank ``r`` is stage ``r``, chunk 1 is stage ``2p - 1 - r``, so the last rank hands over locally.

Zero-bubble schedules split a backward into I (gradient of the stage input, sent on at once) and W
(the weight gradients, run later to fill idle time; `layers/weight_grad.py`): a plan runs, for each
(microbatch, chunk), either one B or one I followed later by one W.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from enum import Enum

from megatron_lite.parallel.layout import (location, stage_location, stage_of,  # noqa: F401 - part of this API
                                           virtual_stage)


class ActionKind(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"  # zero-bubble: input gradient only (the critical path)
    BACKWARD_WEIGHT = "W"  # zero-bubble: the weight gradients of an earlier I
    SEND_ACTIVATION = "SEND_F"
    RECV_ACTIVATION = "RECV_F"
    SEND_GRAD = "SEND_B"
    RECV_GRAD = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE_KINDS

    @property
    def is_send(self) -> bool:
        return self in _SEND_KINDS

    @property
    def is_recv(self) -> bool:
        return self in _RECV_KINDS

    @property
    def is_backward(self) -> bool:
        """B or I: consumes the gradient from the next stage and produces the input gradient."""
        return self in (ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT)


_COMPUTE_KINDS = frozenset({ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT,
                            ActionKind.BACKWARD_WEIGHT})
_SEND_KINDS = frozenset({ActionKind.SEND_ACTIVATION, ActionKind.SEND_GRAD})
_RECV_KINDS = frozenset({ActionKind.RECV_ACTIVATION, ActionKind.RECV_GRAD})


@dataclass(frozen=True)
class Action:
    """One step on one rank.

    ``chunk`` is always the *local* model chunk the action belongs to: for a send, the chunk whose
    compute produced the tensor; for a receive, the chunk whose compute will consume it.
    ``peer`` is the pipeline rank on the other side of a send/receive, ``None`` for compute.
    """

    kind: ActionKind
    microbatch: int
    chunk: int = 0
    peer: int | None = None

    def __str__(self) -> str:
        peer = "" if self.peer is None else f", peer={self.peer}"
        return f"{self.kind.value}(mb={self.microbatch}, chunk={self.chunk}{peer})"


@dataclass(frozen=True)
class PipelinePlan:
    name: str
    num_stages: int
    num_microbatches: int
    virtual_stages: int
    actions: tuple[tuple[Action, ...], ...]  # actions[rank] = ordered list for that pipeline rank
    forward_only: bool = False  # no backward actions (evaluation, generation)
    mapping: str = "loop"  # how chunks map to virtual stages: "loop" (Megatron) or "v" (ZBV)

    @property
    def num_virtual_stages(self) -> int:
        return self.num_stages * self.virtual_stages

    @property
    def split_backward(self) -> bool:
        """Whether backwards run as I + W (zero-bubble) rather than B."""
        return any(a.kind is ActionKind.BACKWARD_WEIGHT for rank in self.actions for a in rank)

    def stage_of(self, rank: int, chunk: int) -> int:
        """The virtual stage that model chunk `chunk` of pipeline rank `rank` runs."""
        return stage_of(rank, chunk, self.num_stages, self.mapping)

    def location(self, stage: int) -> tuple[int, int]:
        """(pipeline rank, chunk) that hosts virtual stage `stage`."""
        return location(stage, self.num_stages, self.mapping)




_FORWARD_KINDS = frozenset({ActionKind.FORWARD, ActionKind.SEND_ACTIVATION, ActionKind.RECV_ACTIVATION})
ZERO_BUBBLE = ("zb_h1", "zb_h2", "zbv")  # schedules that split backwards into I and W


@functools.lru_cache(maxsize=32)
def forward_only_plan(plan: PipelinePlan) -> PipelinePlan:
    """The plan's forward actions alone, in the plan's order (evaluation and generation)."""
    actions = tuple(tuple(a for a in rank if a.kind in _FORWARD_KINDS) for rank in plan.actions)
    return replace(plan, name=f"{plan.name} (forward only)", actions=actions, forward_only=True)


SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved_1f1b") + ZERO_BUBBLE


def schedule_mapping(name: str) -> str:
    """How schedule `name` places model chunks on ranks ("loop" or "v"): the model must be built so."""
    return "v" if name == "zbv" else "loop"


def build_schedule(
    name: str, num_stages: int, num_microbatches: int, virtual_stages: int = 1
) -> PipelinePlan:
    """Per-rank action lists for schedule ``name`` with p stages, m microbatches, v chunks."""
    _check_arguments(name, num_stages, num_microbatches, virtual_stages)
    p, m, v = num_stages, num_microbatches, virtual_stages
    from megatron_lite.pipeline import zero_bubble  # the zero-bubble orders live in their own module

    order_for_rank = {
        "gpipe": lambda rank: _gpipe_compute_order(m),
        "1f1b": lambda rank: _one_f_one_b_compute_order(p, m, rank),
        "interleaved_1f1b": lambda rank: _interleaved_compute_order(p, m, v, rank),
        "zb_h1": lambda rank: zero_bubble.zb_h1_compute_order(p, m, rank),
        "zb_h2": lambda rank: zero_bubble.zb_h2_compute_order(p, m, rank),
        "zbv": lambda rank: zero_bubble.zbv_compute_order(p, m, rank),
    }[name]
    mapping = schedule_mapping(name)
    actions = tuple(
        tuple(_with_communication(order_for_rank(rank), rank, p, v, mapping)) for rank in range(p)
    )
    return PipelinePlan(name, p, m, v, actions, mapping=mapping)


def forwards_precede_backwards(plan: PipelinePlan) -> bool:
    """Whether every rank runs all its forwards of a step before its first backward (GPipe; any
    schedule with one microbatch)."""
    for actions in plan.actions:
        kinds = ["B" if a.kind.is_backward else "F" for a in actions if a.kind is ActionKind.FORWARD or a.kind.is_backward]
        if "B" in kinds and "F" in kinds[kinds.index("B"):]:
            return False
    return True


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


def _check_arguments(name: str, p: int, m: int, v: int) -> None:
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    _check_positive(num_stages=p, num_microbatches=m, virtual_stages=v)
    check_virtual_stages(name, v)
    if name == "interleaved_1f1b" and m % p != 0:
        lower = (m // p) * p
        hint = f"{lower} or {lower + p}" if lower else f"{p}"
        raise ValueError(
            f"interleaved_1f1b needs microbatches to be a multiple of pp={p}, "
            f"got {m}; use {hint}"
        )


def check_virtual_stages(name: str, v: int) -> None:
    """The model chunks per rank schedule `name` runs (zbv exactly 2, interleaved_1f1b at least 2, the
    others 1); the planner checks its layouts with it too."""
    if name == "zbv" and v != 2:
        raise ValueError(f"zbv runs two model chunks per rank in a V, got virtual_stages={v}; use virtual_stages=2")
    if name not in ("interleaved_1f1b", "zbv") and v != 1:
        raise ValueError(
            f"{name} runs one model chunk per rank, got virtual_stages={v}; "
            "use virtual_stages=1 or schedule interleaved_1f1b"
        )
    if name == "interleaved_1f1b" and v < 2:
        raise ValueError(
            f"interleaved_1f1b needs virtual_stages >= 2, got {v}; "
            "use virtual_stages=2 or schedule 1f1b"
        )


def _forward(microbatch: int, chunk: int = 0) -> Action:
    return Action(ActionKind.FORWARD, microbatch, chunk)


def _backward(microbatch: int, chunk: int = 0) -> Action:
    return Action(ActionKind.BACKWARD, microbatch, chunk)


def _gpipe_compute_order(m: int) -> list[Action]:
    # Backwards run last-in first-out, as in the GPipe paper (Fig. 2c): the last stage starts the
    # backward of the microbatch it has just finished, and each activation stack is popped in the
    # order autograd would free it. The bubble and the peak memory are the same with FIFO.
    return [_forward(mb) for mb in range(m)] + [_backward(mb) for mb in reversed(range(m))]


def _one_f_one_b_compute_order(p: int, m: int, rank: int) -> list[Action]:
    # PipeDream-flush / Megatron order: later ranks need fewer forwards in flight before the first
    # gradient comes back. Capping at m keeps m < p valid: the schedule degenerates to GPipe-like
    # all-forward then all-backward on the early ranks instead of waiting for absent microbatches.
    warmup = min(p - rank - 1, m)
    steady = m - warmup
    order = [_forward(mb) for mb in range(warmup)]
    for i in range(steady):
        order += [_forward(warmup + i), _backward(i)]
    order += [_backward(mb) for mb in range(steady, m)]
    return order


def _interleaved_slot(k: int, p: int, v: int, forward: bool) -> tuple[int, int]:
    """(microbatch, chunk) of the k-th forward or backward on a rank (Megatron's mapping).

    Microbatches go through the chunks in blocks of p: forwards run mb 0..p-1 on chunk 0, then
    the same block on chunk 1, ..., then the next block. Backwards walk the chunks in reverse.
    """
    group, offset = divmod(k, p * v)
    chunk = offset // p
    if not forward:
        chunk = v - 1 - chunk
    return group * p + offset % p, chunk


def _interleaved_compute_order(p: int, m: int, v: int, rank: int) -> list[Action]:
    total = m * v
    # Rank r must keep forwarding until the first gradient for chunk v-1 returns: one full pass
    # of the other v-1 chunks over all p ranks, plus the round trip to the last rank and back.
    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    steady = total - warmup
    forwards = [_forward(*_interleaved_slot(k, p, v, forward=True)) for k in range(total)]
    backwards = [_backward(*_interleaved_slot(k, p, v, forward=False)) for k in range(total)]
    order = forwards[:warmup]
    for i in range(steady):
        order += [forwards[warmup + i], backwards[i]]
    order += backwards[steady:]
    return order


def _with_communication(compute: list[Action], rank: int, p: int, v: int, mapping: str = "loop") -> list[Action]:
    """Insert the receive right before and the send right after each compute action (none for W, and
    none between virtual stages on the same rank)."""
    last = p * v - 1

    def peer(stage: int) -> int | None:
        """The rank of virtual stage `stage` if it exists and lives on another rank."""
        if not 0 <= stage <= last:
            return None
        other, _ = location(stage, p, mapping)
        return None if other == rank else other

    out: list[Action] = []
    for action in compute:
        mb, chunk = action.microbatch, action.chunk
        stage = stage_of(rank, chunk, p, mapping)
        before, after = (stage - 1, stage + 1) if action.kind is ActionKind.FORWARD else (stage + 1, stage - 1)
        kinds = {ActionKind.FORWARD: (ActionKind.RECV_ACTIVATION, ActionKind.SEND_ACTIVATION),
                 ActionKind.BACKWARD: (ActionKind.RECV_GRAD, ActionKind.SEND_GRAD),
                 ActionKind.BACKWARD_INPUT: (ActionKind.RECV_GRAD, ActionKind.SEND_GRAD)}.get(action.kind)
        if kinds and peer(before) is not None:
            out.append(Action(kinds[0], mb, chunk, peer(before)))
        out.append(action)
        if kinds and peer(after) is not None:
            out.append(Action(kinds[1], mb, chunk, peer(after)))
    return out
