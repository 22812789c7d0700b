"""What a pipeline message is, and how the transport that carries it behaves.

One message identity serves the executor, the validator and the simulator: a message is the
activation or gradient of one microbatch, delivered to one virtual stage, over one (sender, receiver)
channel. The same identity names the send and the receive of it, so matching is a dictionary lookup
and not a convention repeated in three files.

A `Transport` states the two properties that decide whether a plan can hang:
- `in_order`: a rank's transfers complete in the order they were posted, batch after batch (NCCL runs
  the point-to-point operations of a communicator in order on one stream). Without it (gloo) every
  posted operation proceeds on its own and only a compute that consumes a receive waits for it.
- `rendezvous`: a send completes only once the peer has posted the matching receive (NCCL above its
  per-peer buffer size, and gloo always: gloo moves a message only when its receive is posted).
    Without it a send completes at once (small NCCL messages, which hide the problem in tiny tests).
The validator (`validate.validate_program`) proves a rank program deadlock-free under the transport it
will run on, and `program.build_programs` builds, for an in-order transport, programs whose transfers
are grouped so that no rank can wait on a peer that waits on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.pipeline.schedules import Action, ActionKind, PipelinePlan

ACTIVATION, GRADIENT = "F", "B"


@dataclass(frozen=True)
class Message:
    """One transfer between pipeline ranks, named the same way by its send and its receive."""

    direction: str  # ACTIVATION (forward) or GRADIENT (backward)
    microbatch: int
    consumer: int  # the virtual stage that consumes it
    sender: int  # pipeline ranks
    receiver: int

    @property
    def channel(self) -> tuple[int, int, str]:
        """Messages of one channel are matched in the order they were posted (one tag per direction)."""
        return self.sender, self.receiver, self.direction

    def __str__(self) -> str:
        what = "activation" if self.direction == ACTIVATION else "gradient"
        return f"{what} of mb={self.microbatch} for virtual stage {self.consumer} (rank {self.sender} -> {self.receiver})"


def message_of(plan: PipelinePlan, rank: int, action: Action) -> Message:
    """The message a send or receive action of `rank` carries."""
    stage = plan.stage_of(rank, action.chunk)
    direction = ACTIVATION if action.kind in (ActionKind.SEND_ACTIVATION, ActionKind.RECV_ACTIVATION) else GRADIENT
    if action.kind.is_send:
        consumer = stage + 1 if direction == ACTIVATION else stage - 1
        return Message(direction, action.microbatch, consumer, rank, action.peer)
    if action.kind.is_recv:
        return Message(direction, action.microbatch, stage, action.peer, rank)
    raise ValueError(f"{action} is a compute action, it carries no message")


@dataclass(frozen=True)
class Transport:
    name: str
    in_order: bool
    rendezvous: bool

    def __str__(self) -> str:
        return self.name


GLOO = Transport("gloo", in_order=False, rendezvous=True)
NCCL = Transport("nccl", in_order=True, rendezvous=True)
NCCL_EAGER = Transport("nccl-eager", in_order=True, rendezvous=False)  # messages within NCCL's buffers
TRANSPORTS = {t.name: t for t in (GLOO, NCCL, NCCL_EAGER)}


def transport_for_backend(backend: str) -> Transport:
    """The semantics to plan for on a process-group backend (anything but gloo is treated like NCCL:
    in-order and rendezvous is the stricter model, so a plan proven there runs anywhere)."""
    return GLOO if backend == "gloo" else NCCL
