"""Vocabulary-parallel embedding: each TP rank holds a contiguous slice of the (padded) vocabulary."""

from __future__ import annotations

import torch

from megatron_lite.layers import weight_grad
from megatron_lite.layers.regions import leave_tp_region
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.sharding import ShardSpec, make_param, tp_shard


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 1) -> int:
    """Smallest size >= vocab_size divisible by tp_size * multiple (Megatron's padding rule)."""
    step = tp_size * multiple
    return -(-vocab_size // step) * step


def vocab_shard_spec(vocab_size: int, hidden_size: int, tp: CommGroup, *, pad_multiple: int = 1,
                     std: float = 0.02, init_name: str | None = None) -> ShardSpec:
    """A [vocab, hidden] table split by rows over TP after padding the vocabulary (embedding or head)."""
    shard = tp_shard(0, tp, padded_size=padded_vocab_size(vocab_size, tp.size, pad_multiple))
    return ShardSpec(full_shape=(vocab_size, hidden_size), shards=(shard,), std=std, init_name=init_name)


class VocabParallelEmbedding(torch.nn.Module):
    """Row i of the full table lives on the rank whose vocabulary slice holds i; padding rows are zero.

    The output is summed over TP (each token's row is non-zero on exactly one rank): an all-reduce,
    or a reduce-scatter along the sequence under sequence parallelism.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: CommGroup, *, pad_multiple: int = 1,
                 std: float = 0.02, sequence_parallel: bool = False, init_name: str | None = None,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.tp, self.sequence_parallel = tp, sequence_parallel
        spec = vocab_shard_spec(vocab_size, hidden_size, tp, pad_multiple=pad_multiple, std=std, init_name=init_name)
        self.vocab_size = vocab_size
        self.rows_per_rank = spec.local_shape[0]
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = make_param(spec, dtype, device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return weight_grad.embedding(token_ids, self.weight)
        local_ids = token_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        rows = weight_grad.embedding(local_ids.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp_region(rows, self.tp, self.sequence_parallel)
