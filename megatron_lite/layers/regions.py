"""Where activations enter and leave a tensor-parallel block.

Without sequence parallelism the activation outside a block is replicated over TP: enter = identity
forward / all-reduce backward, leave = all-reduce. With sequence parallelism it is split along the
sequence (dim 1 of [batch, seq, hidden]): enter = all-gather, leave = reduce-scatter.
"""

from __future__ import annotations

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup

SEQUENCE_DIM = 1


def enter_tp_region(x: torch.Tensor, tp: CommGroup, sequence_parallel: bool = False) -> torch.Tensor:
    if sequence_parallel:
        return comm.gather_from_sequence(x, tp, SEQUENCE_DIM)
    return comm.copy_to_group(x, tp)


def leave_tp_region(y: torch.Tensor, tp: CommGroup, sequence_parallel: bool = False) -> torch.Tensor:
    if sequence_parallel:
        return comm.reduce_scatter_to_sequence(y, tp, SEQUENCE_DIM)
    return comm.reduce_from_group(y, tp)
