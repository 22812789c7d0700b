"""Check that a PipelinePlan is complete, consistent and cannot hang, and that the rank programs
built from it cannot hang on the transport they run on.

`validate_plan(plan)` checks the plan itself: every compute exactly once (each backward as one B, or
as one I and one W after it, for zero-bubble plans), inputs before use, every
receive matched by a send on the same channel in the same order, and no deadlock when sends never
block (the weakest transport: if the plan deadlocks there, no batching can save it).
`validate_plan(plan, transport)` also builds the programs the executor will post on that transport
(`program.build_programs`) and replays them under its semantics (`validate_program`):
- not in order (gloo): posting never blocks, a compute waits for the receive it consumes, and the
  step ends once every send has been received;
- in order (NCCL): a rank's transfers complete one after the other, and with rendezvous a send
  completes only together with its receive, so two ranks whose current transfers each wait for a
  receive the other posts later are deadlocked.
Every failure raises ``PlanError`` naming the rank, the action and its position, so a wrong schedule
is found here and not as a hang on 64 GPUs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from megatron_lite.pipeline.program import (
    ProgramError,
    Programs,
    Transfer,
    build_programs,
    consumed_message,
    default_batching,
)
from megatron_lite.pipeline.schedules import Action, ActionKind, PipelinePlan
from megatron_lite.pipeline.transport import Message, Transport, message_of

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
I, W = ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT
SEND_F, RECV_F = ActionKind.SEND_ACTIVATION, ActionKind.RECV_ACTIVATION
SEND_B, RECV_B = ActionKind.SEND_GRAD, ActionKind.RECV_GRAD

Channel = tuple[int, int, str]  # (sender rank, receiver rank, direction)


class PlanError(ValueError):
    """A pipeline plan is malformed, inconsistent or deadlocks."""


def validate_plan(plan: PipelinePlan, transport: Transport | None = None, receive_lookahead: int = 0) -> None:
    """Raise PlanError if the plan is malformed or can hang; with `transport`, also if the programs the
    executor builds for it (default batching, `receive_lookahead` where not in order) can hang there."""
    _check_shape(plan)
    for rank, actions in enumerate(plan.actions):
        _check_compute_exactly_once(plan, rank, actions)
        _check_local_order(plan, rank, actions)
    steps = _comm_steps(plan)
    _check_send_recv_matching(steps)
    _check_no_deadlock(plan, steps)
    if transport is not None:
        lookahead = 0 if transport.in_order else receive_lookahead
        try:
            programs = build_programs(plan, default_batching(transport), lookahead)
        except ProgramError as err:
            raise PlanError(str(err)) from None
        validate_program(plan, programs, transport)


def _where(rank: int, index: int, action: Action) -> str:
    return f"rank {rank} action #{index} {action}"


def _check_shape(plan: PipelinePlan) -> None:
    p, m, v = plan.num_stages, plan.num_microbatches, plan.virtual_stages
    if min(p, m, v) < 1:
        raise PlanError(f"plan sizes must be >= 1, got p={p}, m={m}, v={v}")
    if len(plan.actions) != p:
        raise PlanError(f"plan has {len(plan.actions)} action lists for {p} pipeline ranks")
    for rank, actions in enumerate(plan.actions):
        for index, action in enumerate(actions):
            _check_action_fields(plan, rank, index, action)


def _check_action_fields(plan: PipelinePlan, rank: int, index: int, action: Action) -> None:
    problem = _field_problem(plan, action) or _peer_problem(plan, rank, action)
    if problem:
        raise PlanError(f"{_where(rank, index, action)}: {problem}")


def _field_problem(plan: PipelinePlan, action: Action) -> str | None:
    if not isinstance(action.kind, ActionKind):
        return f"unknown action kind {action.kind!r}"
    if not 0 <= action.microbatch < plan.num_microbatches:
        return f"microbatch outside 0..{plan.num_microbatches - 1}"
    if not 0 <= action.chunk < plan.virtual_stages:
        return f"chunk outside 0..{plan.virtual_stages - 1}"
    if action.kind.is_compute and action.peer is not None:
        return "compute actions take no peer"
    return None


def _peer_problem(plan: PipelinePlan, rank: int, action: Action) -> str | None:
    if action.kind.is_compute:
        return None
    other = _neighbour_stage(plan, rank, action)
    if other is None:
        stage = _stage(plan, rank, action)
        return f"virtual stage {stage} is at the end of the pipeline, nobody to exchange with"
    expected, _ = plan.location(other)
    if expected == rank:
        return f"virtual stage {other} is on the same rank, the data stays local"
    if action.peer != expected:
        return f"peer must be rank {expected} (virtual stage {other})"
    return None


def _stage(plan: PipelinePlan, rank: int, action: Action) -> int:
    return plan.stage_of(rank, action.chunk)


def _neighbour_stage(plan: PipelinePlan, rank: int, action: Action) -> int | None:
    """The virtual stage on the other side of a send/receive, or None if there is none."""
    stage = _stage(plan, rank, action)
    step = 1 if action.kind in (SEND_F, RECV_B) else -1
    other = stage + step
    return other if 0 <= other < plan.num_virtual_stages else None


def _check_compute_exactly_once(plan: PipelinePlan, rank: int, actions: Iterable[Action]) -> None:
    counts = Counter((a.kind, a.microbatch, a.chunk) for a in actions if a.kind.is_compute)
    for chunk in range(plan.virtual_stages):
        for mb in range(plan.num_microbatches):
            n = {kind: counts[(kind, mb, chunk)] for kind in (F, B, I, W)}
            if plan.forward_only:
                expected = {F: 1, B: 0, I: 0, W: 0}
            elif n[B] == 0 and (n[I] or n[W]):
                expected = {F: 1, B: 0, I: 1, W: 1}  # a backward split into I and W
            else:
                expected = {F: 1, B: 1, I: 0, W: 0}
            for kind in (F, B, I, W):
                if n[kind] != expected[kind]:
                    how = "exactly once" if expected[kind] else "never"
                    if kind is W and expected[kind]:
                        how += " (every I needs its W)"
                    raise PlanError(f"rank {rank} runs {kind.value}(mb={mb}, chunk={chunk}) {n[kind]} times, "
                                    f"expected {how}")


def _check_local_order(plan: PipelinePlan, rank: int, actions: tuple[Action, ...]) -> None:
    """Each action's inputs are produced or received earlier in this rank's own list."""
    done: set[tuple[ActionKind, int, int]] = set()
    for index, action in enumerate(actions):
        key = (action.kind, action.microbatch, action.chunk)
        if action.kind.is_recv and key in done:
            raise PlanError(f"{_where(rank, index, action)}: received twice")
        missing = _missing_input(plan, rank, action, done)
        if missing:
            raise PlanError(f"{_where(rank, index, action)}: runs before {missing}")
        done.add(key)
        if action.kind is I:
            done.add((B, action.microbatch, action.chunk))  # the input gradient exists, as after a B


def _missing_input(plan: PipelinePlan, rank: int, action: Action, done: set) -> str | None:
    mb, chunk = action.microbatch, action.chunk
    needs: list[tuple[ActionKind, int, int]] = []
    if action.kind is SEND_F:
        needs.append((F, mb, chunk))
    elif action.kind is SEND_B:
        needs.append((B, mb, chunk))  # or I
    elif action.kind is F and _stage(plan, rank, action) > 0:
        needs.append(_input_source(plan, rank, action, RECV_F, -1))
    elif action.kind is W:
        needs.append((I, mb, chunk))  # each W follows its own I
    elif action.kind.is_backward:
        needs.append((F, mb, chunk))  # the backward of a stage needs its own forward
        if _stage(plan, rank, action) < plan.num_virtual_stages - 1:
            needs.append(_input_source(plan, rank, action, RECV_B, +1))
    for need in needs:
        if need not in done:
            kind, need_mb, need_chunk = need
            return f"{kind.value}(mb={need_mb}, chunk={need_chunk}) on rank {rank}"
    return None


def _input_source(
    plan: PipelinePlan, rank: int, action: Action, recv_kind: ActionKind, step: int
) -> tuple[ActionKind, int, int]:
    """What must precede a compute action: its receive, or the local compute it reads from."""
    source_rank, source_chunk = plan.location(_stage(plan, rank, action) + step)
    if source_rank != rank:
        return (recv_kind, action.microbatch, action.chunk)
    return (F if action.kind is F else B, action.microbatch, source_chunk)


def _message(plan: PipelinePlan, rank: int, action: Action) -> tuple[Channel, Message]:
    message = message_of(plan, rank, action)
    return message.channel, message


# One communication action, resolved once: (action index, is receive, channel, message).
CommStep = tuple[int, bool, Channel, Message]


def _comm_steps(plan: PipelinePlan) -> list[list[CommStep]]:
    steps: list[list[CommStep]] = []
    for rank, actions in enumerate(plan.actions):
        steps.append([
            (index, action.kind.is_recv, *_message(plan, rank, action))
            for index, action in enumerate(actions)
            if not action.kind.is_compute
        ])
    return steps


def _channel_traffic(steps: list[list[CommStep]], receives: bool) -> dict[Channel, list[Message]]:
    traffic: dict[Channel, list[Message]] = defaultdict(list)
    for rank_steps in steps:
        for _, is_recv, channel, message in rank_steps:
            if is_recv == receives:
                traffic[channel].append(message)
    return traffic


def _describe(message: Message) -> str:
    what = "activation" if message.direction == "F" else "gradient"
    return f"{what} of mb={message.microbatch} for virtual stage {message.consumer}"


def _missing(role: str, message: Message, rank: int) -> str:
    return f"{role}_{message.direction}(mb={message.microbatch}) on rank {rank}"


def _check_send_recv_matching(steps: list[list[CommStep]]) -> None:
    sends = _channel_traffic(steps, receives=False)
    recvs = _channel_traffic(steps, receives=True)
    for channel in sorted(set(sends) | set(recvs)):
        sender, receiver, _ = channel
        sent, received = sends.get(channel, []), recvs.get(channel, [])
        extra_recv = Counter(received) - Counter(sent)
        if extra_recv:
            message = next(iter(extra_recv))
            raise PlanError(
                f"rank {receiver} receives the {_describe(message)} from rank {sender}, "
                f"but rank {sender} never sends it: missing {_missing('SEND', message, sender)}"
            )
        extra_send = Counter(sent) - Counter(received)
        if extra_send:
            message = next(iter(extra_send))
            raise PlanError(
                f"rank {sender} sends the {_describe(message)} to rank {receiver}, "
                f"but rank {receiver} never receives it: missing "
                f"{_missing('RECV', message, receiver)}"
            )
        for position, (s, r) in enumerate(zip(sent, received)):
            if s != r:
                raise PlanError(
                    f"messages from rank {sender} to rank {receiver} are delivered in order, but "
                    f"message #{position} is sent as the {_describe(s)} and received as the "
                    f"{_describe(r)}; reorder the receives on rank {receiver}"
                )


def _check_no_deadlock(plan: PipelinePlan, steps: list[list[CommStep]]) -> None:
    """Run the plan abstractly: sends complete at once, a receive waits for its send.

    Compute actions never wait in this model (their inputs were checked to be received or
    computed earlier on the same rank), so only the communication steps need to be played.
    """
    position = [0] * plan.num_stages
    in_flight: Counter[Channel] = Counter()
    progress = True
    while progress:
        progress = False
        for rank, rank_steps in enumerate(steps):
            while position[rank] < len(rank_steps):
                _, is_recv, channel, _ = rank_steps[position[rank]]
                if is_recv:
                    if in_flight[channel] == 0:
                        break
                    in_flight[channel] -= 1
                else:
                    in_flight[channel] += 1
                position[rank] += 1
                progress = True
    stuck = [r for r in range(plan.num_stages) if position[r] < len(steps[r])]
    if stuck:
        waits = "; ".join(_waiting_at(plan, r, steps[r][position[r]][0]) for r in stuck)
        raise PlanError(f"plan deadlocks, no rank can make progress: {waits}")


def _waiting_at(plan: PipelinePlan, rank: int, index: int) -> str:
    return f"rank {rank} waits at action #{index} {plan.actions[rank][index]}"


# ----------------------------------------------------------------------------- programs on a transport


def validate_program(plan: PipelinePlan, programs: Programs, transport: Transport) -> None:
    """Replay rank programs under `transport`'s semantics; PlanError if they differ from the plan or
    some rank can wait forever."""
    _check_program_matches_plan(plan, programs)
    p = plan.num_stages
    # Per rank and step: a transfer's (is_send, message) pairs, or the message a compute waits for.
    steps = [[[(a.kind.is_send, message_of(plan, rank, a)) for a in step.actions] if isinstance(step, Transfer)
              else consumed_message(plan, rank, step) for step in program] for rank, program in enumerate(programs)]
    sends = [[m for step in rank_steps if isinstance(step, list) for is_send, m in step if is_send]
             for rank_steps in steps]
    position = [0] * p
    posted: set[tuple[bool, Message]] = set()
    active = [False] * p  # the transfer at `position` has been posted (in-order transports)

    def advance(rank: int) -> bool:
        index = position[rank]
        if index > len(steps[rank]):
            return False
        if index == len(steps[rank]):  # the step ends once every send of this rank has been received
            if transport.rendezvous and any((False, m) not in posted for m in sends[rank]):
                return False
        elif isinstance(steps[rank][index], list):
            ops = steps[rank][index]
            if not active[rank]:
                posted.update(ops)
                active[rank] = True
            if transport.in_order and not all(_completes(is_send, m, transport, posted) for is_send, m in ops):
                return False
            active[rank] = False
        elif steps[rank][index] is not None and (True, steps[rank][index]) not in posted:
            return False
        position[rank] += 1
        return True

    progress = True
    while progress:
        progress = False
        for rank in range(p):
            while advance(rank):
                progress = True
    stuck = [r for r in range(p) if position[r] <= len(programs[r])]
    if stuck:
        waits = "; ".join(_program_wait(plan, programs[r], r, position[r], transport) for r in stuck)
        raise PlanError(f"{plan.name} p={p} m={plan.num_microbatches} v={plan.virtual_stages} deadlocks on the "
                        f"{transport} transport: {waits}")


def _completes(is_send: bool, message: Message, transport: Transport, posted: set) -> bool:
    """A send completes once its receive is posted (at once without rendezvous); a receive once its
    send is posted."""
    if is_send:
        return not transport.rendezvous or (False, message) in posted
    return (True, message) in posted


def _check_program_matches_plan(plan: PipelinePlan, programs: Programs) -> None:
    if len(programs) != plan.num_stages:
        raise PlanError(f"{len(programs)} programs for {plan.num_stages} pipeline ranks")
    for rank, (actions, program) in enumerate(zip(plan.actions, programs)):
        computes = [s for s in program if not isinstance(s, Transfer)]
        if computes != [a for a in actions if a.kind.is_compute]:
            raise PlanError(f"rank {rank}: the program runs its computes in another order than the plan")
        comm = Counter(a for s in program if isinstance(s, Transfer) for a in s.actions)
        if comm != Counter(a for a in actions if not a.kind.is_compute):
            raise PlanError(f"rank {rank}: the program posts other sends/receives than the plan")
        received: set[Message] = set()
        for index, step in enumerate(program):
            if isinstance(step, Transfer):
                received |= {message_of(plan, rank, a) for a in step.actions if a.kind.is_recv}
                continue
            needed = consumed_message(plan, rank, step)
            if needed is not None and needed not in received:
                raise PlanError(f"rank {rank} step #{index} {step} consumes the {needed} before posting its receive")


def _program_wait(plan, program, rank, index, transport) -> str:
    if index == len(program):
        return f"rank {rank} waits for its sends to be received at the end of the step"
    step = program[index]
    if isinstance(step, Transfer):
        return f"rank {rank} blocked in transfer #{index} {step}"
    return f"rank {rank} waits at step #{index} {step} for the {consumed_message(plan, rank, step)}"
