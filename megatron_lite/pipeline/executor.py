"""Runs one pipeline rank's program: forwards, backwards and the transfers between stages.

- Activation shapes are static (from the config), so no shape handshake precedes a transfer.
- The program (`program.build_programs`) says which sends and receives are posted together; it is built
  for the transport the pipeline group runs on (`transport.transport_for_backend`) and the validator
  proves it cannot deadlock there. A receive is waited on only by the compute that consumes it.
- A forward output sent to the next stage is needed later only for its autograd graph, so its
  storage is released once the send is posted (Megatron's "deallocate output tensor"); the send's
  own reference keeps the bytes only until the transfer is known complete, which the program tells
  (see `program.send_completion_points`) even where the transport cannot (gloo).
- Activations and gradients travel under different tags, because with interleaving one pair of
  ranks carries both in the same direction.
- Where the transport lets transfers proceed independently (gloo), receives are posted a little ahead
  of the plan (`receive_lookahead` of them, in plan order): gloo moves a message only once its receive
  is posted, and then needs the sender's communication thread, which on a busy CPU takes a while to
  get scheduled; posted ahead, the message arrives while the previous compute runs. In-order transports
  (NCCL) get matched programs instead, where every send is posted together with the peer's receive.
- Run with an in-order transport on gloo (`transport=NCCL`), the executor waits for each transfer
  before the next step, which is what a single in-order stream does: the NCCL programs then run, and
  can be tested, on CPU (gloo's sends complete only once the receive is posted, like NCCL's rendezvous).
- Between virtual stages that live on the same rank (pp=1 with several model chunks) the tensors are
  handed over locally, without a message.
- Zero-bubble plans split each backward into I and W (`layers/weight_grad.py`): the forward and the I
  of a (microbatch, chunk) run with that pair's `WeightGradStore` active, I computes and sends the input
  gradient and leaves the weight-gradient work in the store, W drains it into `.grad` through autograd's
  accumulation. Every parameter's gradient then lands in W, so `before_last_backward` (which lets the
  gradient buffers start their DP reductions) comes before each chunk's last W. Every store is empty at
  the end of the step.
- The loss of a microbatch is the sum of its per-token losses divided by one divisor for the whole step
  (not its own mean): with ignored targets microbatches hold different numbers of valid tokens, and
  only a common divisor makes the step's loss the mean over its tokens, whatever the split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.autograd import Variable

from megatron_lite.layers.cross_entropy import IGNORE_INDEX
from megatron_lite.layers.weight_grad import WeightGradStore, backward_input, backward_weight, deferring_to
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.pipeline.program import Transfer, build_programs, completion_points, default_batching
from megatron_lite.pipeline.schedules import (Action, ActionKind, PipelinePlan, forward_only_plan,
                                              forwards_precede_backwards)
from megatron_lite.pipeline.transport import Transport, message_of, transport_for_backend

ACTIVATION_TAG, GRAD_TAG = 0, 1
RECEIVE_LOOKAHEAD = 1  # receives posted beyond the ones the plan has reached, where the transport allows


@dataclass
class _InFlight:
    """Per-step bookkeeping, keyed by (microbatch, chunk)."""

    inputs: dict = field(default_factory=dict)      # stage input (requires grad) or token ids
    outputs: dict = field(default_factory=dict)     # stage output, or the scaled loss on the last stage
    received: dict = field(default_factory=dict)    # (kind, mb, chunk) -> (buffer, work)
    local: dict = field(default_factory=dict)       # (kind, mb, chunk) -> tensor handed over on this rank
    auxiliary: dict = field(default_factory=dict)   # (mb, chunk) -> the stage's auxiliary loss / m
    to_send: dict = field(default_factory=dict)     # (kind, mb, chunk) -> tensor ready to send
    sends: dict = field(default_factory=dict)       # Message -> (work, tensor) until known complete
    stores: dict = field(default_factory=dict)      # (mb, chunk) -> WeightGradStore (zero-bubble plans)


def _release(tensor: torch.Tensor) -> None:
    """Drop an output's storage while keeping its autograd graph (its shape is not needed again)."""
    tensor.data = torch.empty((1,), device=tensor.device, dtype=tensor.dtype)


def _roots(output: torch.Tensor, grad: torch.Tensor | None, auxiliary: torch.Tensor | None,
           auxiliary_scale: float) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """What a backward starts from: `output` with `grad` (None: a scalar loss), and the stage's auxiliary
    loss (times the loss scale)."""
    if grad is None:
        grad = torch.ones_like(output)
    tensors, grads = (output,), (grad,)
    if auxiliary is not None:
        tensors, grads = tensors + (auxiliary,), grads + (torch.full_like(auxiliary, auxiliary_scale),)
    return tensors, grads


def _backward(output: torch.Tensor, grad: torch.Tensor | None, auxiliary: torch.Tensor | None = None,
              auxiliary_scale: float = 1.0) -> None:
    """The fused backward from `_roots`, bypassing the shape check that a released output would fail."""
    tensors, grads = _roots(output, grad, auxiliary, auxiliary_scale)
    Variable._execution_engine.run_backward(
        tensors=tensors, grad_tensors=grads, keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True,
    )


class PipelineExecutor:
    def __init__(self, plan: PipelinePlan, chunks: list[torch.nn.Module], layout: ParallelLayout,
                 activation_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 receive_lookahead: int | None = None, transport: Transport | None = None,
                 batching: str | None = None, timeline: list | None = None):
        """transport: the semantics to plan for (default: the pipeline group's backend's); batching:
        how transfers are grouped (default: the transport's, see `program.default_batching`); timeline: a
        list that receives (kind, microbatch, chunk, start, end) per compute action, in perf_counter
        seconds (the measured busy spans; the idle time is what lies between them)."""
        if len(chunks) != plan.virtual_stages:
            raise ValueError(f"{len(chunks)} model chunks for a plan with {plan.virtual_stages} virtual stages")
        self.plan, self.chunks, self.layout = plan, chunks, layout
        self.activation_shape, self.dtype = tuple(activation_shape), dtype
        self.rank = layout.pp.rank
        self.last_stage = plan.num_virtual_stages - 1
        backend = comm.backend_of(layout.pp)
        self.transport = transport or transport_for_backend(backend or "gloo")
        if receive_lookahead is None:
            receive_lookahead = 0 if self.transport.in_order else RECEIVE_LOOKAHEAD
        self.receive_lookahead = receive_lookahead
        self.batching = batching or default_batching(self.transport)
        # An in-order transport emulated on a backend whose operations are independent: one transfer at
        # a time, as one stream would run them.
        self.wait_each_transfer = self.transport.in_order and backend not in (None, "nccl")
        self.timeline = timeline
        self.released_outputs = 0  # forward outputs whose storage our graph no longer pins
        self.peak_pending_sends = 0  # most sends whose buffers were held at once

    def _stage(self, chunk: int) -> int:
        return self.plan.stage_of(self.rank, chunk)

    def _is_local(self, stage: int) -> bool:
        return 0 <= stage < self.plan.num_virtual_stages and self.plan.location(stage)[0] == self.rank

    def _local_chunk(self, stage: int) -> int:
        return self.plan.location(stage)[1]

    def run(self, tokens: list[torch.Tensor], targets: list[torch.Tensor] | None, forward_only: bool = False,
            loss_scale: float = 1.0, before_last_backward: Callable[[int], None] | None = None,
            loss_divisor: float | None = None) -> torch.Tensor:
        """One step over the microbatches; returns the sum over them of their summed per-token losses
        divided by `loss_divisor` (meaningful on the rank holding the last stage, zero elsewhere), which
        is also what is backpropagated. Gradients accumulate in .grad.

        loss_divisor: None: the number of valid (not IGNORE_INDEX) targets in `targets`, so the loss is
            the mean over this rank's tokens; `run_schedule` passes the step's count over all DP ranks
            divided by the DP size (the gradient sync averages over DP), so the DP average of the
            returned losses and of the gradients is the mean over the global batch. With no valid target
            every per-token loss is 0 with no gradient, and a divisor of 0 is taken as 1: the loss is 0
            (where a mean, as F.cross_entropy's, would be 0/0 = nan).

        loss_scale: multiplies the loss before backward (fp16 dynamic loss scaling); the returned loss
            is unscaled.
        before_last_backward(chunk): called right before the last microbatch's backward of each model
            chunk, so gradient reduction can start as that chunk's gradients become final.
        targets None (forward only): the last stage keeps its logits in `self.outputs[microbatch]`
            instead of computing a loss (text generation).
        """
        plan = forward_only_plan(self.plan) if forward_only else self.plan
        if not forward_only and any(getattr(c, "needs_all_forwards_first", False) for c in self.chunks) \
                and not forwards_precede_backwards(plan):
            raise ValueError(f"aux_loss_scope=global_batch needs every forward of a step before its first backward; "
                             f"schedule {plan.name!r} with {plan.num_microbatches} microbatches interleaves them: use "
                             "parallel.schedule=gpipe (or one micro batch), or model.moe.aux_loss_scope=micro_batch")
        programs = build_programs(plan, self.batching, self.receive_lookahead)
        self.completion_points = completion_points(plan, self.batching, self.receive_lookahead, self.rank)
        self.outputs: dict[int, torch.Tensor] = {}
        state = _InFlight()
        self.loss_scale, self.before_last_backward = loss_scale, before_last_backward
        if loss_divisor is None and targets is not None:
            loss_divisor = sum(int((t != IGNORE_INDEX).sum()) for t in targets)
        self.loss_divisor = loss_divisor if loss_divisor else 1.0
        self.backwards_done = [0] * len(self.chunks)
        self.weights_done = [0] * len(self.chunks)
        loss_sum = torch.zeros((), device=self.layout.device)
        for step in programs[self.rank]:
            if isinstance(step, Transfer):
                self._communicate(plan, step.actions, state)
                continue
            self._compute_start = time.perf_counter() if self.timeline is not None else 0.0
            if step.kind == ActionKind.FORWARD:
                loss = self._forward(step, tokens, targets, state, forward_only)
                if loss is not None:
                    loss_sum += loss
            elif step.kind == ActionKind.BACKWARD_WEIGHT:
                self._weight(step, state)
            else:
                self._backward(step, state)
            if self.timeline is not None:
                self.timeline.append((step.kind.value, step.microbatch, step.chunk, self._compute_start,
                                      time.perf_counter()))
        for store in state.stores.values():
            store.check_empty()
        for work, _ in state.sends.values():
            if work is not None:
                work.wait()
        return loss_sum

    # ------------------------------------------------------------------ compute

    def _forward(self, action, tokens, targets, state, forward_only):
        key = (action.microbatch, action.chunk)
        stage = self._stage(action.chunk)
        if stage == 0:
            stage_input = tokens[action.microbatch]
        else:
            if self._is_local(stage - 1):
                stage_input = state.local.pop((ActionKind.FORWARD,) + key).detach()
            else:
                stage_input = self._wait_received(ActionKind.RECV_ACTIVATION, key, state)
            stage_input.requires_grad_(not forward_only)
        store = None
        if self.plan.split_backward and not forward_only:
            store = state.stores[key] = WeightGradStore(f"(microbatch {action.microbatch}, chunk {action.chunk})")
        with torch.set_grad_enabled(not forward_only), deferring_to(store):
            output = self.chunks[action.chunk](stage_input)
            if stage == self.last_stage and targets is None:
                self.outputs[action.microbatch] = output
                return None
            if stage == self.last_stage:
                output = self.chunks[action.chunk].loss(output, targets[action.microbatch]).sum() / self.loss_divisor
            auxiliary = self.chunks[action.chunk].auxiliary_loss()
        if not forward_only:
            state.inputs[key] = stage_input
            state.outputs[key] = output
            if auxiliary is not None:
                state.auxiliary[key] = auxiliary / self.plan.num_microbatches
        if stage == self.last_stage:
            return output.detach()
        if self._is_local(stage + 1):
            state.local[(ActionKind.FORWARD, action.microbatch, self._local_chunk(stage + 1))] = output
        else:
            state.to_send[(ActionKind.SEND_ACTIVATION,) + key] = output.detach()
        return None

    def _backward(self, action, state):
        key = (action.microbatch, action.chunk)
        stage = self._stage(action.chunk)
        output = state.outputs.pop(key)
        if stage == self.last_stage:
            grad = None
        elif self._is_local(stage + 1):
            grad = state.local.pop((ActionKind.BACKWARD,) + key)
        else:
            grad = self._wait_received(ActionKind.RECV_GRAD, key, state)
        if stage == self.last_stage and self.loss_scale != 1.0:
            output = output * self.loss_scale
        if self.backwards_done[action.chunk] == 0 and hasattr(self.chunks[action.chunk], "prepare_backward"):
            self.chunks[action.chunk].prepare_backward()
        self.backwards_done[action.chunk] += 1
        stage_input = state.inputs.pop(key)
        auxiliary = state.auxiliary.pop(key, None)
        if action.kind == ActionKind.BACKWARD_INPUT:
            store = state.stores[key]
            with deferring_to(store):  # a recomputed forward records into the same store
                input_grad = backward_input(*_roots(output, grad, auxiliary, self.loss_scale), stage_input,
                                            self.chunks[action.chunk].parameters(), store)
        else:
            if self.before_last_backward and self.backwards_done[action.chunk] == self.plan.num_microbatches:
                self.before_last_backward(action.chunk)
            _backward(output, grad, auxiliary, self.loss_scale)
            input_grad = stage_input.grad
        if stage == 0:
            return
        if self._is_local(stage - 1):
            state.local[(ActionKind.BACKWARD, action.microbatch, self._local_chunk(stage - 1))] = input_grad
        else:
            state.to_send[(ActionKind.SEND_GRAD,) + key] = input_grad

    def _weight(self, action, state):
        """W: the weight gradients that the I of this (microbatch, chunk) left in its store."""
        self.weights_done[action.chunk] += 1
        if self.before_last_backward and self.weights_done[action.chunk] == self.plan.num_microbatches:
            self.before_last_backward(action.chunk)  # every parameter's gradient lands in W
        store = state.stores.pop((action.microbatch, action.chunk))
        backward_weight(store)
        store.check_empty()

    # ------------------------------------------------------------------ communication

    def _communicate(self, plan: PipelinePlan, actions: tuple[Action, ...], state: _InFlight) -> None:
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
        if self.wait_each_transfer:
            for work in works:
                work.wait()
            works = [None] * len(works)  # done (gloo's receive works must not be waited twice)
        self.peak_pending_sends = max(self.peak_pending_sends, len(state.sends) + sum(op.is_send for op in ops))
        for action, op, work in zip(actions, ops, works):
            if op.is_send:
                state.sends[message_of(plan, self.rank, action)] = (work, op.tensor)
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
        if work is not None:
            work.wait()
            if self.timeline is not None:
                self._compute_start = time.perf_counter()  # waiting for the data is idle time
        peer = (self.rank - 1 if kind == ActionKind.RECV_ACTIVATION else self.rank + 1) % self.plan.num_stages
        message = message_of(self.plan, self.rank, Action(kind, key[0], key[1], peer))
        for sent in self.completion_points.get(message, ()):
            entry = state.sends.pop(sent, None)
            if entry is not None and entry[0] is not None:
                entry[0].wait()  # already complete: returns at once and frees the send buffer
        return buffer
