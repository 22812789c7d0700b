"""Runs one pipeline rank's action list: forwards, backwards and the transfers between stages.

- Activation shapes are static (from the config), so no shape handshake precedes a transfer.
- Consecutive communication actions are posted together, the way Megatron pairs "send forward,
  receive backward"; sends are asynchronous and a receive is waited on only by the compute action
  that consumes it. With sends that never block, the plan validator proves the list cannot deadlock.
- A forward output sent to the next stage is needed later only for its autograd graph, so its
  storage is released once the send is posted (Megatron's "deallocate output tensor"); the send's
  own reference keeps the bytes only until the transfer is known complete, which the plan tells
  (see `send_completion_points`) even where the transport cannot (gloo).
- Activations and gradients travel under different tags, because with interleaving one pair of
  ranks carries both in the same direction.
- Where the transport lets transfers proceed independently (gloo), receives are posted a little ahead
  of the plan (`receive_lookahead` of them, in plan order): gloo moves a message only once its receive
  is posted, and then needs the sender's communication thread, which on a busy CPU takes a while to
  get scheduled; posted ahead, the message arrives while the previous compute runs. NCCL serialises
  the operations of a communicator on one stream, where an early receive could hold up a send that its
  peer waits for, so there the plan's order is kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.autograd import Variable

from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.pipeline.schedules import Action, ActionKind, PipelinePlan, virtual_stage

ACTIVATION_TAG, GRAD_TAG = 0, 1
RECEIVE_LOOKAHEAD = 1  # receives posted beyond the ones the plan has reached, where the transport allows


@dataclass
class _InFlight:
    """Per-step bookkeeping, keyed by (microbatch, chunk)."""

    inputs: dict = field(default_factory=dict)      # stage input (requires grad) or token ids
    outputs: dict = field(default_factory=dict)     # stage output, or the scaled loss on the last stage
    received: dict = field(default_factory=dict)    # (kind, mb, chunk) -> (buffer, [work])
    to_send: dict = field(default_factory=dict)     # (kind, mb, chunk) -> tensor ready to send
    sends: dict = field(default_factory=dict)       # message key -> (work, tensor) until known complete
    receives: list = field(default_factory=list)    # the step's receive actions, in plan order
    posted: int = 0                                 # how many of them are posted (always a prefix)
    reached: int = 0                                # how many of them the plan has reached


def _release(tensor: torch.Tensor) -> None:
    """Drop an output's storage while keeping its autograd graph (its shape is not needed again)."""
    tensor.data = torch.empty((1,), device=tensor.device, dtype=tensor.dtype)


def _backward(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Backward from `output` with `grad` (None: a scalar loss), bypassing the shape check that a
    released output would fail."""
    if grad is None:
        grad = torch.ones_like(output)
    Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad,), keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True,
    )


def _message_key(action: Action, rank: int, p: int) -> tuple:
    """Identity of the message a send or receive action carries: (direction, microbatch, consumer
    virtual stage)."""
    stage = virtual_stage(rank, action.chunk, p)
    if action.kind == ActionKind.SEND_ACTIVATION:
        return ("activation", action.microbatch, stage + 1)
    if action.kind == ActionKind.SEND_GRAD:
        return ("grad", action.microbatch, stage - 1)
    return ("activation" if action.kind == ActionKind.RECV_ACTIVATION else "grad", action.microbatch, stage)


@functools.lru_cache(maxsize=32)  # a pure function of the (frozen) plan; executors are rebuilt every step
def send_completion_points(plan: PipelinePlan, rank: int) -> dict[tuple, list[tuple]]:
    """For each receive on `rank` (by message key): the sends of `rank` known complete once it arrives.

    A send S to peer P is complete once `rank` has received any message that P sent after the
    compute that consumed S (P waits on S before that compute). Transports such as gloo report a
    send complete only when waited on, so these points are where the executor can drop sent buffers
    early without ever blocking.
    """
    p = plan.num_stages
    position = {}  # message key -> (rank, index) of its receive and of the compute that consumes it
    sent_at = {}   # message key -> (rank, index) of its send
    for r, actions in enumerate(plan.actions):
        for i, action in enumerate(actions):
            if action.kind.is_recv:
                consume = next(j for j in range(i + 1, len(actions)) if actions[j].kind.is_compute)
                position[_message_key(action, r, p)] = consume
            elif action.kind.is_send:
                sent_at[_message_key(action, r, p)] = (r, i)
    points: dict[tuple, list[tuple]] = {}
    actions = plan.actions[rank]
    for i, send in enumerate(actions):
        if not send.kind.is_send:
            continue
        sent = _message_key(send, rank, p)
        consumed_at = position[sent]
        for later in actions[i + 1:]:
            if not later.kind.is_recv or later.peer != send.peer:
                continue
            key = _message_key(later, rank, p)
            if sent_at[key][1] > consumed_at:
                points.setdefault(key, []).append(sent)
                break
    return points


class PipelineExecutor:
    def __init__(self, plan: PipelinePlan, chunks: list[torch.nn.Module], layout: ParallelLayout,
                 activation_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 receive_lookahead: int | None = None):
        if len(chunks) != plan.virtual_stages:
            raise ValueError(f"{len(chunks)} model chunks for a plan with {plan.virtual_stages} virtual stages")
        self.plan, self.chunks, self.layout = plan, chunks, layout
        self.activation_shape, self.dtype = tuple(activation_shape), dtype
        self.rank = layout.pp.rank
        self.actions = plan.actions[self.rank]
        self.last_stage = plan.num_virtual_stages - 1
        self.completion_points = send_completion_points(plan, self.rank)
        self.released_outputs = 0  # forward outputs whose storage our graph no longer pins
        self.peak_pending_sends = 0  # most sends whose buffers were held at once
        if receive_lookahead is None:
            receive_lookahead = RECEIVE_LOOKAHEAD if comm.p2p_operations_independent(layout.pp) else 0
        self.receive_lookahead = receive_lookahead

    def _stage(self, chunk: int) -> int:
        return virtual_stage(self.rank, chunk, self.plan.num_stages)

    def run(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, forward_only: bool = False,
            loss_scale: float = 1.0, before_last_backward: Callable[[int], None] | None = None) -> torch.Tensor:
        """One step over the microbatches; returns the sum of their mean losses divided by their number
        (meaningful on the rank holding the last stage, zero elsewhere). Gradients accumulate in .grad.

        loss_scale: multiplies the loss before backward (fp16 dynamic loss scaling); the returned loss
            is unscaled.
        before_last_backward(chunk): called right before the last microbatch's backward of each model
            chunk, so gradient reduction can start as that chunk's gradients become final.
        targets None (forward only): the last stage keeps its logits in `self.outputs[microbatch]`
            instead of computing a loss (text generation).
        """
        self.outputs: dict[int, torch.Tensor] = {}
        state = _InFlight()
        self.loss_scale, self.before_last_backward = loss_scale, before_last_backward
        self.backwards_done = [0] * len(self.chunks)
        loss_sum = torch.zeros((), device=self.layout.device)
        actions = [a for a in self.actions if not forward_only or a.kind in _FORWARD_KINDS]
        state.receives = [a for a in actions if a.kind.is_recv]
        pending_comm: list[Action] = []
        for action in actions:
            if action.kind.is_recv:
                state.reached += 1
                if state.reached <= state.posted:
                    continue  # posted ahead already
                state.posted += 1
            if not action.kind.is_compute:
                pending_comm.append(action)
                continue
            ahead = state.receives[state.posted:state.reached + self.receive_lookahead]
            state.posted += len(ahead)
            self._communicate(pending_comm + ahead, state)
            pending_comm = []
            if action.kind == ActionKind.FORWARD:
                loss = self._forward(action, tokens, targets, state, forward_only)
                if loss is not None:
                    loss_sum += loss
            else:
                self._backward(action, state)
        self._communicate(pending_comm, state)
        for work, _ in state.sends.values():
            work.wait()
        return loss_sum

    # ------------------------------------------------------------------ compute

    def _forward(self, action, tokens, targets, state, forward_only):
        key = (action.microbatch, action.chunk)
        stage = self._stage(action.chunk)
        if stage == 0:
            stage_input = tokens[action.microbatch]
        else:
            stage_input = self._wait_received(ActionKind.RECV_ACTIVATION, key, state)
            stage_input.requires_grad_(not forward_only)
        with torch.set_grad_enabled(not forward_only):
            output = self.chunks[action.chunk](stage_input)
            if stage == self.last_stage and targets is None:
                self.outputs[action.microbatch] = output
                return None
            if stage == self.last_stage:
                loss = self.chunks[action.chunk].loss(output, targets[action.microbatch]).mean()
                output = loss / self.plan.num_microbatches
        if not forward_only:
            state.inputs[key] = stage_input
            state.outputs[key] = output
        if stage == self.last_stage:
            return output.detach()
        state.to_send[(ActionKind.SEND_ACTIVATION,) + key] = output.detach()
        return None

    def _backward(self, action, state):
        key = (action.microbatch, action.chunk)
        stage = self._stage(action.chunk)
        output = state.outputs.pop(key)
        grad = None if stage == self.last_stage else self._wait_received(ActionKind.RECV_GRAD, key, state)
        if stage == self.last_stage and self.loss_scale != 1.0:
            output = output * self.loss_scale
        self.backwards_done[action.chunk] += 1
        if self.before_last_backward and self.backwards_done[action.chunk] == self.plan.num_microbatches:
            self.before_last_backward(action.chunk)
        _backward(output, grad)
        stage_input = state.inputs.pop(key)
        if stage > 0:
            state.to_send[(ActionKind.SEND_GRAD,) + key] = stage_input.grad

    # ------------------------------------------------------------------ communication

    def _communicate(self, actions: list[Action], state: _InFlight) -> None:
        ops = []
        for action in actions:
            key = (action.kind, action.microbatch, action.chunk)
            tag = ACTIVATION_TAG if action.kind in (ActionKind.SEND_ACTIVATION, ActionKind.RECV_ACTIVATION) else GRAD_TAG
            if action.kind.is_send:
                # The contiguous copy (if one is needed) is what the send keeps alive until delivered.
                ops.append(comm.P2POp(True, state.to_send.pop(key).contiguous(), action.peer, tag))
            else:
                buffer = torch.empty(self.activation_shape, dtype=self.dtype, device=self.layout.device)
                ops.append(comm.P2POp(False, buffer, action.peer, tag))
        works = comm.start_p2p(ops, self.layout.pp)
        self.peak_pending_sends = max(self.peak_pending_sends, len(state.sends) + sum(op.is_send for op in ops))
        for action, op, work in zip(actions, ops, works):
            if op.is_send:
                state.sends[_message_key(action, self.rank, self.plan.num_stages)] = (work, op.tensor)
                output = state.outputs.get((action.microbatch, action.chunk))
                if action.kind == ActionKind.SEND_ACTIVATION and output is not None:
                    # The send holds the bytes while it needs them; the output kept for backward only
                    # needs its autograd graph, so it stops pinning the storage now.
                    _release(output)
                    self.released_outputs += 1
            else:
                state.received[(action.kind, action.microbatch, action.chunk)] = (op.tensor, work)

    def _wait_received(self, kind: ActionKind, key: tuple[int, int], state: _InFlight) -> torch.Tensor:
        buffer, work = state.received.pop((kind,) + key)
        work.wait()
        message = _message_key(Action(kind, key[0], key[1]), self.rank, self.plan.num_stages)
        for sent in self.completion_points.get(message, ()):
            entry = state.sends.pop(sent, None)  # None: a backward send that a forward-only run skips
            if entry is not None:
                entry[0].wait()  # already complete: returns at once and frees the send buffer
        return buffer


_FORWARD_KINDS = frozenset({ActionKind.FORWARD, ActionKind.SEND_ACTIVATION, ActionKind.RECV_ACTIVATION})
