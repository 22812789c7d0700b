"""Rank programs: a plan's actions as the executor posts them, for the transport it runs on.

A plan says, per rank, the order of computes and which messages each one consumes and produces. A
program adds how the transfers are posted: a step is a compute action or a `Transfer`, the send and
receive actions posted together (one `batch_isend_irecv`). The executor runs programs, the validator
replays them under the transport's semantics, and both take them from here, so what is proven is what
runs.

Two ways to build them:
- `consecutive`: the run of send/receive actions between two computes becomes one transfer, with
  `receive_lookahead` later receives posted early (in plan order). Fine where posted operations
  proceed independently (gloo); on an in-order, rendezvous transport this deadlocks the interleaved
  schedule whenever m > p (rank 0 stuck on SEND_B(mb0, chunk1), rank 1 on [SEND_B(mb1, chunk1), ...]).
- `matched`: transfers in rounds. A timing model (forward 1, backward 2 per chunk) runs the plan; at
  each instant, every message whose receiver waits for it and whose sender is between two computes is
  transferred, and each rank posts its part of the round as one transfer. Every transfer thus pairs a
  send with a receive that the peer posts in its own transfer of the same round, and the rounds are
  ordered the same way on every rank, so under in-order rendezvous semantics the earliest unfinished
  round can always complete: no deadlock (`validate.validate_program` checks it anyway). Opposite
  directions meet in one transfer where they coincide (Megatron's send-forward-recv-backward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from megatron_lite.pipeline.schedules import Action, ActionKind, PipelinePlan
from megatron_lite.pipeline.transport import Message, Transport, message_of

BATCHINGS = ("consecutive", "matched")
F, B = ActionKind.FORWARD, ActionKind.BACKWARD


class ProgramError(ValueError):
    """A plan cannot be turned into a program (it deadlocks whatever the transport)."""


@dataclass(frozen=True)
class Transfer:
    """Send and receive actions posted together; a receive is waited for by the compute consuming it."""

    actions: tuple[Action, ...]

    def __str__(self) -> str:
        return "[" + ", ".join(map(str, self.actions)) + "]"


Step = Action | Transfer  # a compute action, or a transfer
Programs = tuple[tuple[Step, ...], ...]  # programs[rank]


@functools.lru_cache(maxsize=64)  # a pure function of the (frozen) plan; executors are rebuilt every step
def build_programs(plan: PipelinePlan, batching: str, receive_lookahead: int = 0) -> Programs:
    if batching == "consecutive":
        return tuple(_consecutive(plan.actions[rank], receive_lookahead) for rank in range(plan.num_stages))
    if batching == "matched":
        return _matched(plan)
    raise ValueError(f"unknown batching {batching!r}; choose one of {BATCHINGS}")


def default_batching(transport: Transport) -> str:
    return "matched" if transport.in_order else "consecutive"


def _consecutive(actions: tuple[Action, ...], lookahead: int) -> tuple[Step, ...]:
    receives = [a for a in actions if a.kind.is_recv]
    steps: list[Step] = []
    pending: list[Action] = []
    posted = reached = 0  # receives posted (always a prefix of `receives`) / reached by the plan
    for action in actions:
        if action.kind.is_recv:
            reached += 1
            if reached <= posted:
                continue  # posted ahead already
            posted += 1
        if not action.kind.is_compute:
            pending.append(action)
            continue
        ahead = receives[posted:reached + lookahead]
        posted += len(ahead)
        if pending or ahead:
            steps.append(Transfer(tuple(pending + ahead)))
        pending = []
        steps.append(action)
    if pending:
        steps.append(Transfer(tuple(pending)))
    return tuple(steps)


def consumed_message(plan: PipelinePlan, rank: int, action: Action) -> Message | None:
    """The message a compute action waits for: None on the first (forward) or last (backward) virtual
    stage, and when the neighbouring virtual stage lives on this rank (handed over locally)."""
    return _neighbour_message(plan, rank, action, incoming=True)


def produced_message(plan: PipelinePlan, rank: int, action: Action) -> Message | None:
    """The message a compute action's output leaves as (None where it stays on this rank or ends)."""
    return _neighbour_message(plan, rank, action, incoming=False)


def _neighbour_message(plan: PipelinePlan, rank: int, action: Action, incoming: bool) -> Message | None:
    if action.kind is ActionKind.BACKWARD_WEIGHT:
        return None  # W reads and writes nothing outside this rank
    forward = action.kind is F
    step = -1 if forward == incoming else 1  # forwards read from the stage before, write to the next
    other = plan.stage_of(rank, action.chunk) + step
    if not 0 <= other < plan.num_virtual_stages:
        return None
    other_rank, _ = plan.location(other)
    if other_rank == rank:
        return None
    kinds = {(True, True): ActionKind.RECV_ACTIVATION, (True, False): ActionKind.SEND_ACTIVATION,
             (False, True): ActionKind.RECV_GRAD, (False, False): ActionKind.SEND_GRAD}
    return message_of(plan, rank, Action(kinds[(forward, incoming)], action.microbatch, action.chunk, other_rank))


def _matched(plan: PipelinePlan, forward_cost: float = 1.0, backward_cost: float = 2.0) -> Programs:
    p = plan.num_stages
    cost = {F: forward_cost, B: backward_cost, ActionKind.BACKWARD_INPUT: backward_cost / 2,
            ActionKind.BACKWARD_WEIGHT: backward_cost / 2}
    computes = [[a for a in actions if a.kind.is_compute] for actions in plan.actions]
    # The plan's own send/receive actions, by message (the program posts exactly those).
    comm_action: dict[tuple[int, Message], Action] = {}
    for rank, actions in enumerate(plan.actions):
        for action in actions:
            if not action.kind.is_compute:
                comm_action[(rank, message_of(plan, rank, action))] = action
    steps: list[list[Step]] = [[] for _ in range(p)]
    position = [0] * p
    busy_until: list[float | None] = [None] * p
    pending: list[list[Message]] = [[] for _ in range(p)]  # produced by this rank, not yet transferred
    delivered: set[Message] = set()
    now = 0.0
    while True:
        for rank in range(p):  # computes ending now make their outputs available
            if busy_until[rank] == now:
                busy_until[rank] = None
                produced = produced_message(plan, rank, computes[rank][position[rank] - 1])
                if produced is not None:
                    pending[rank].append(produced)
        round_ops: list[list[Action]] = [[] for _ in range(p)]
        for rank in range(p):
            if busy_until[rank] is not None or position[rank] == len(computes[rank]):
                continue
            needed = consumed_message(plan, rank, computes[rank][position[rank]])
            if needed is None or needed in delivered:
                continue
            sender = needed.sender
            if busy_until[sender] is None and needed in pending[sender]:
                pending[sender].remove(needed)
                delivered.add(needed)
                round_ops[sender].append(comm_action[(sender, needed)])
                round_ops[rank].append(comm_action[(rank, needed)])
        for rank, ops in enumerate(round_ops):
            if ops:  # sends first, then receives, each in plan order
                steps[rank].append(Transfer(tuple(sorted(ops, key=lambda a: not a.kind.is_send))))
        for rank in range(p):
            if busy_until[rank] is not None or position[rank] == len(computes[rank]):
                continue
            action = computes[rank][position[rank]]
            needed = consumed_message(plan, rank, action)
            if needed is None or needed in delivered:
                steps[rank].append(action)
                position[rank] += 1
                busy_until[rank] = now + cost[action.kind]
        running = [t for t in busy_until if t is not None]
        if not running:
            if all(position[r] == len(computes[r]) for r in range(p)) and not any(pending):
                return tuple(tuple(s) for s in steps)
            if not any(round_ops):
                waiting = [f"rank {r} at {computes[r][position[r]]}" for r in range(p) if position[r] < len(computes[r])]
                raise ProgramError(f"{plan.name} p={p} m={plan.num_microbatches} v={plan.virtual_stages} cannot be "
                                   f"scheduled, no transfer is possible: {'; '.join(waiting) or 'sends left over'}")
            continue  # transfers happened at this instant: ranks may start now
        now = min(running)


@functools.lru_cache(maxsize=64)  # a pure function of the plan; executors are rebuilt every step
def completion_points(plan: PipelinePlan, batching: str, receive_lookahead: int, rank: int) -> dict[Message, list[Message]]:
    """`send_completion_points` of the programs `build_programs` gives for these arguments."""
    return send_completion_points(plan, build_programs(plan, batching, receive_lookahead), rank)


def send_completion_points(plan: PipelinePlan, programs: Programs, rank: int) -> dict[Message, list[Message]]:
    """For each message `rank` receives: its sends known complete once that message has arrived.

    A send S to peer P is complete once `rank` has received a message that P posted after the compute
    that consumed S (P waited for S before that compute). Transports such as gloo report a send
    complete only when waited on, so these points are where the executor drops sent buffers early
    without ever blocking.
    """
    compute_at: dict[tuple[int, ActionKind, int, int], int] = {}  # (rank, kind, mb, chunk) -> step index
    posted_at: dict[Message, int] = {}  # a send's step index in its sender's program
    for r, program in enumerate(programs):
        for index, step in enumerate(program):
            if isinstance(step, Transfer):
                for action in step.actions:
                    if action.kind.is_send:
                        posted_at[message_of(plan, r, action)] = index
            elif step.kind is not ActionKind.BACKWARD_WEIGHT:  # I consumes the gradient as B does
                compute_at[(r, B if step.kind.is_backward else F, step.microbatch, step.chunk)] = index
    points: dict[Message, list[Message]] = {}
    mine = programs[rank]
    for index, step in enumerate(mine):
        if not isinstance(step, Transfer):
            continue
        for send in (a for a in step.actions if a.kind.is_send):
            sent = message_of(plan, rank, send)
            _, chunk = plan.location(sent.consumer)
            kind = F if sent.direction == "F" else B
            consumed_at = compute_at[(sent.receiver, kind, sent.microbatch, chunk)]
            for later in mine[index:]:
                if not isinstance(later, Transfer):
                    continue
                reply = next((message_of(plan, rank, a) for a in later.actions if a.kind.is_recv and a.peer == send.peer
                              and posted_at[message_of(plan, rank, a)] > consumed_at), None)
                if reply is not None:
                    points.setdefault(reply, []).append(sent)
                    break
    return points
