"""The model-stage protocol: what the framework needs from one model chunk (one virtual pipeline stage).

`optim/`, `checkpoint/` and `pipeline/` talk to a model through this protocol and the placement each
parameter carries (`sharding.spec_of`), never through a model's attributes, so any model whose chunks
implement it (the transformer of `models/`, a mixture of experts, a toy model in a test) is trained,
checkpointed and pipelined by the same code:

- `named_parameters()`   parameter names equal in every layout (the serial model's), each parameter with
                         its placement: shards, gradient reductions, ties between stages;
- `__call__(x)`          the stage's forward: token ids or hidden states in, hidden states or (last
                         stage) the outputs `loss` takes;
- `loss(output, targets)` per-token losses of the last stage (0 where the target is ignored; the step
                         divides their sum by the valid targets of the global batch);
- `auxiliary_loss()`     a scalar added to the objective by the last forward of this stage (already
                         weighted, averaged over this rank's tokens like the main loss), or None; it is
                         backpropagated with the stage's backward, on every stage that has one;
- optional step hooks (a chunk without them has nothing to do there): `needs_all_forwards_first` (a
                         step's backwards need all its forwards done: the executor refuses a schedule
                         that interleaves them), `prepare_backward()` (before the step's first backward of
                         the chunk; may run a collective, in the same order on every rank of a stage) and
                         `finish_step(skipped)` (after the optimizer step; may run a collective);
- `activation_shape(micro_batch, seq_length)`  the tensor that travels between stages;
- `dtype`                of the parameters and of the activations sent between stages;
- `rng_streams()`        the stage's random generators by a name that identifies what they draw for
                         (objects with get_state/set_state/reseed), so a checkpoint restores each into
                         the same stream or re-seeds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class RNGStream(Protocol):
    def get_state(self) -> object: ...

    def set_state(self, state: object) -> None: ...

    def reseed(self, salt: str) -> None: ...


@runtime_checkable
class ModelStage(Protocol):
    dtype: torch.dtype

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def auxiliary_loss(self) -> torch.Tensor | None: ...

    def activation_shape(self, micro_batch: int, seq_length: int) -> tuple[int, ...]: ...

    def rng_streams(self) -> dict[str, RNGStream]: ...
