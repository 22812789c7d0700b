"""The global gradient norm over every rank of the job, each parameter's values counted once.

Several ranks can hold the same gradient values, and the norm must equal the serial model's. Which
rank counts a piece follows from its placement alone (`sharding.holds_canonical_copy`): the first of
the ranks that hold the same values along every axis it is replicated over (TP for norm weights and
row-parallel biases, the TP block of a replicated KV-head chunk, the data-parallel ranks without
ZeRO-1), every rank along the axes it is cut over (TP slices, experts over EP, ZeRO-1 shards over its
data-parallel group), and a tied tensor on its primary copy only. The sum runs over the axes along which
counted pieces differ (`norm_groups`); along the others every replica holds the whole sum.
Vocabulary padding rows have zero gradients and change nothing.
"""

from __future__ import annotations

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.sharding import holds_canonical_copy, spec_of


def norm_axes(partitioned: bool) -> tuple[str, ...]:
    """The axes the norm is summed over (besides the pipeline stages): TP and EP (cuts), and with ZeRO-1
    the data-parallel ones (each rank its own shard). Replicas along other axes each count their own."""
    return ("edp", "ep", "cp", "tp") if partitioned else ("ep", "tp")


def norm_groups(layout: ParallelLayout, partitioned: bool) -> list[CommGroup]:
    return [layout.group(name) for name in ("tp", "pp", "dp_cp" if partitioned else "ep")]


def counts_in_norm(param: torch.nn.Parameter, layout: ParallelLayout, partitioned: bool) -> bool:
    """partitioned: ZeRO-1, each rank of the parameter's data-parallel group holds another part."""
    return holds_canonical_copy(spec_of(param), layout.coordinates, layout.sizes, partitioned, norm_axes(partitioned))


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
