"""Which sample indices each data-parallel rank trains on, step by step, resumably.

Global batch k is samples [c, c + G) where c is the number of samples consumed before it; DP
rank d takes the contiguous slice [c + d * G/dp, c + (d + 1) * G/dp). The union over ranks is
exactly what one process with the whole batch would see, and the only state is `consumed_samples`,
which does not depend on the layout: a run may resume with another DP size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class DistributedBatchSampler:
    def __init__(
        self,
        total_samples: int | None,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ):
        """`total_samples`: samples available (the last partial batch is dropped), or None for an
        endless dataset such as `GPTWindowDataset`, which reshuffles into new epochs."""
        if global_batch_size < 1 or dp_size < 1:
            raise ValueError(f"global_batch_size ({global_batch_size}) and dp_size ({dp_size}) must be >= 1")
        if global_batch_size % dp_size != 0:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the data-parallel size {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = total_samples
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro = global_batch_size // dp_size
        self.consumed_samples = consumed_samples

    def local_indices(self, batch_start: int) -> list[int]:
        """This rank's share of the global batch that starts at sample `batch_start`."""
        first = batch_start + self.dp_rank * self.micro
        return list(range(first, first + self.micro))

    def __iter__(self) -> Iterator[list[int]]:
        """Yields this rank's indices for each remaining step, from `consumed_samples` on.

        A batch counts as consumed once handed out, so a `state_dict()` taken after training on
        it resumes with the next one.
        """
        while self.total_samples is None or self.consumed_samples + self.global_batch_size <= self.total_samples:
            start = self.consumed_samples
            self.consumed_samples += self.global_batch_size
            yield self.local_indices(start)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self.consumed_samples = consumed


def get_batch(dataset, sample_indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks samples into (tokens [b, s], targets [b, s])."""
    if len(sample_indices) == 0:
        raise ValueError("get_batch needs at least one sample index")
    pairs = [dataset[i] for i in sample_indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
