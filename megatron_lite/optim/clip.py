"""The global gradient norm over every TP, PP (and, with ZeRO-1, DP) rank, each parameter counted once.

Several ranks can hold the same gradient values, and the norm must equal the serial model's:
- a parameter replicated over TP (norm weights, row-parallel biases, position embeddings) is counted
  on TP rank 0 only;
- KV-head chunks replicated over TP (fewer chunks than TP ranks) once per chunk, on the first of the
  ranks that hold it;
- the tied embedding's copy on the last pipeline stage not at all (its twin on the first stage is);
- with ZeRO-1 each DP rank holds a disjoint shard, so shards are summed over DP; without it every DP
  rank holds the same full gradients and the DP sum is skipped.
Vocabulary padding rows have zero gradients and change nothing.
"""

from __future__ import annotations

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.sharding import spec_of


def counts_in_norm(param: torch.nn.Parameter, tp: CommGroup, is_tied_copy: bool) -> bool:
    if is_tied_copy:
        return False
    spec = spec_of(param)
    holders = tp.size if spec.dim is None else tp.size // spec.num_chunks  # TP ranks with the same values
    return tp.rank % holders == 0


def global_norm_and_overflow(grads: list[torch.Tensor], counted: torch.Tensor,
                             groups: list[CommGroup]) -> tuple[float, bool]:
    """(L2 norm of the gradients flagged in `counted`, a bool mask with one entry per gradient, over all
    `groups`; whether any of `grads` on any rank is inf or nan). One fused norm pass over the
    gradients serves both (a tensor's norm is inf or nan exactly when an element is, ~25x cheaper on
    CPU than an element-wise isfinite scan), and one 2-element all-reduce per group carries both."""
    device = grads[0].device if grads else torch.device("cpu")
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if grads:
        norms = torch.stack(torch._foreach_norm(grads)).double()
        totals[0] = norms[counted].square().sum()
        totals[1] = (~torch.isfinite(norms)).sum()
    for group in groups:
        comm.all_reduce(totals, group)
    return totals[0].sqrt().item(), bool(totals[1].item() > 0)


def clip_coefficient(norm: float, max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6))."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
