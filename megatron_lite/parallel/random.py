"""Dropout random streams that respect tensor parallelism, held by the model (no global RNG state).

Where TP ranks hold the same activation (the replicated region between TP blocks, without sequence
parallelism), they must drop the same elements, or the replicas drift apart: `replicated` is seeded
identically on every TP rank. Where each TP rank holds a different piece (attention heads, or the
sequence slice under sequence parallelism), each piece needs its own mask: `tensor_parallel` is
seeded per TP rank. Pipeline stages and data-parallel replicas get distinct streams (different layers,
different samples).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.sharding import seed_for


class DropoutRNG:
    def __init__(self, seed: int, layout: ParallelLayout, stream: str = ""):
        """`stream` separates model chunks that share a rank (interleaved pipelines)."""
        where = f"{stream}/pp{layout.pp.rank}/dp{layout.dp.rank}"
        self.name = f"{where}/tp{layout.tp.rank}"
        device = layout.device
        self.replicated = torch.Generator(device).manual_seed(seed_for(seed, f"dropout/{where}"))
        self.tensor_parallel = torch.Generator(device).manual_seed(seed_for(seed, f"dropout/{where}/tp{layout.tp.rank}"))

    def get_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.replicated.get_state(), self.tensor_parallel.get_state()

    def set_state(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.replicated.set_state(state[0])
        self.tensor_parallel.set_state(state[1])

    def reseed(self, salt: str) -> None:
        """Deterministically re-seed both generators from their own seeds and `salt` (a resume under
        another layout, where saved states cannot be mapped)."""
        for generator in (self.replicated, self.tensor_parallel):
            generator.manual_seed(seed_for(generator.initial_seed(), salt))

    def recompute_contexts(self):
        """`context_fn` for torch.utils.checkpoint: the recomputation replays the masks of the forward."""
        forward_state = self.get_state()

        @contextmanager
        def forward():
            yield

        @contextmanager
        def recompute():
            after_forward = self.get_state()
            self.set_state(forward_state)
            try:
                yield
            finally:
                self.set_state(after_forward)

        return forward(), recompute()


def dropout(x: torch.Tensor, p: float, generator: torch.Generator, training: bool) -> torch.Tensor:
    """Inverted dropout with an explicit generator (torch's functional dropout takes none)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)
