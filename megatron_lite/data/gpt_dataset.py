"""GPT training samples: shuffled fixed-length windows over a token stream, and weighted blends.

Both datasets are indexable by any sample index >= 0 (later epochs are reshuffled), so a
trainer draws as many samples as it likes and the index alone says which tokens it gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_lite.data.indexed import IndexedTokens


class GPTWindowDataset:
    """Sample i -> (tokens[:-1], tokens[1:]) for a window of seq_length + 1 stream tokens.

    Window w covers stream tokens [w * seq_length, w * seq_length + seq_length + 1): neighbours
    share one token so every token is a target exactly once per epoch, and windows run across
    document boundaries (the EOD ids tell the model where documents end), as Megatron does.
    """

    def __init__(self, indexed: IndexedTokens, seq_length: int, seed: int):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.indexed = indexed
        self.seq_length = seq_length
        self.seed = seed
        self.num_windows = (indexed.num_tokens - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(
                f"{indexed.prefix}: {indexed.num_tokens} tokens, too few for one window of "
                f"seq_length + 1 = {seq_length + 1}"
            )
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Samples per epoch; indices past it continue into later, reshuffled epochs."""
        return self.num_windows

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window order of one epoch, a permutation of range(num_windows)."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            # (seed, epoch) rather than seed + epoch: seed 0 epoch 1 must not replay seed 1 epoch 0.
            rng = np.random.default_rng([self.seed, epoch])
            self._cached_epoch = (epoch, rng.permutation(self.num_windows))
        return self._cached_epoch[1]

    def window_start(self, index: int) -> int:
        """Stream offset of sample `index`'s first token."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, position = divmod(int(index), self.num_windows)
        return int(self.epoch_order(epoch)[position]) * self.seq_length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.indexed.tokens(self.window_start(index), self.seq_length + 1)
        window = torch.from_numpy(window.astype(np.int64))
        return window[:-1], window[1:]


def blending_index(weights: np.ndarray, num_samples: int, start_counts: np.ndarray | None = None):
    """Megatron's greedy blend: at each step pick the dataset lagging its target the most.

    Returns (dataset id, sample index within that dataset) per step. Ties go to the lowest id,
    so each count stays within 1 of weight * steps.
    """
    counts = np.zeros(len(weights), np.int64) if start_counts is None else start_counts.copy()
    step0 = int(counts.sum())
    dataset_ids = np.empty(num_samples, np.int64)
    sample_ids = np.empty(num_samples, np.int64)
    for i in range(num_samples):
        choice = int(np.argmax(weights * (step0 + i + 1) - counts))
        dataset_ids[i], sample_ids[i] = choice, counts[choice]
        counts[choice] += 1
    return dataset_ids, sample_ids, counts


class BlendedDataset:
    """Serves samples from `datasets` in proportion to `weights` (normalised), deterministically.

    The blend itself needs no randomness; `seed` fixes which dataset wins ties, so equal weights
    do not always start with the first dataset.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int, chunk: int = 4096):
        if len(datasets) == 0 or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets, {len(weights)} weights")
        weights = np.asarray(weights, np.float64)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights.tolist()}")
        # Permute once by seed, then blend in that order: ties go to the first in the order.
        self._order = np.random.default_rng(seed).permutation(len(datasets))
        self.datasets = list(datasets)
        self.weights = weights / weights.sum()
        self._chunk = chunk
        self._dataset_ids = np.zeros(0, np.int64)
        self._sample_ids = np.zeros(0, np.int64)
        self._counts = np.zeros(len(datasets), np.int64)

    def _extend_to(self, size: int) -> None:
        # The greedy blend is sequential, so it is built lazily in chunks as indices are asked for.
        missing = size - len(self._dataset_ids)
        if missing <= 0:
            return
        missing = max(missing, self._chunk)
        ids, samples, self._counts = blending_index(self.weights[self._order], missing, self._counts)
        self._dataset_ids = np.concatenate([self._dataset_ids, self._order[ids]])
        self._sample_ids = np.concatenate([self._sample_ids, samples])

    def source(self, index: int) -> tuple[int, int]:
        """(dataset id, index within it) that blended sample `index` comes from."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        self._extend_to(int(index) + 1)
        return int(self._dataset_ids[index]), int(self._sample_ids[index])

    def __getitem__(self, index: int):
        dataset_id, sample_id = self.source(index)
        return self.datasets[dataset_id][sample_id]
