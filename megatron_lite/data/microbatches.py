"""A rank's batch cut into the microbatches of a step (gradient accumulation, pipeline schedules)."""

from __future__ import annotations

import torch


def split_microbatches(tensor: torch.Tensor, num_microbatches: int) -> list[torch.Tensor]:
    if tensor.shape[0] % num_microbatches:
        raise ValueError(
            f"local batch of {tensor.shape[0]} samples is not divisible by microbatches={num_microbatches}"
        )
    return list(tensor.chunk(num_microbatches, dim=0))
