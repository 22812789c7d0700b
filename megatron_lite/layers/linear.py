"""Megatron's column- and row-parallel linear layers.

ColumnParallelLinear holds a slice of the output features, RowParallelLinear a slice of the input
features. A block (attention, MLP) enters the TP region once and feeds several column layers, so the
region crossing is a flag here rather than hidden inside every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.layers import weight_grad
from megatron_lite.layers.regions import enter_tp_region, leave_tp_region
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.sharding import column_spec, make_param, replicated_spec, row_spec


class ColumnParallelLinear(torch.nn.Module):
    """y[:, local out features] = x @ W[local rows].T (+ b[local]).

    enter_region: cross into the TP region here (set False when the caller already did, e.g. for the
        q, k and v projections that share one input).
    gather_output: return the full output on every rank (for tests and small heads).
    num_chunks: how many pieces the output dim is cut into (default TP size); fewer than TP means
        consecutive ranks hold the same piece, as for KV heads when TP > number of KV heads.
    """

    def __init__(self, in_features: int, out_features: int, tp: CommGroup, *, bias: bool = True,
                 std: float = 0.02, enter_region: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, num_chunks: int | None = None,
                 dtype=torch.float32, device=None):
        super().__init__()
        chunks = num_chunks or tp.size
        if out_features % chunks or chunks > tp.size or tp.size % chunks:
            raise ValueError(f"out_features={out_features} cannot be split into {chunks} pieces over tp={tp.size}: "
                             "the pieces must divide both the features and the TP size")
        self.tp, self.enter_region, self.gather_output = tp, enter_region, gather_output
        self.sequence_parallel = sequence_parallel
        self.weight = make_param(column_spec((out_features, in_features), tp, chunks, std=std), dtype, device)
        self.bias = make_param(column_spec((out_features,), tp, chunks, init="zeros"), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enter_region:
            [y] = column_parallel_linears(x, [self.weight], [self.bias], self.tp, self.sequence_parallel)
        else:
            y = weight_grad.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = _GatherLastDim.apply(y, self.tp)
        return y


def column_parallel_linears(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                            tp: CommGroup, sequence_parallel: bool = False) -> list[torch.Tensor]:
    """Enter the TP region once and apply several column-parallel weights to that shared input (q, k
    and v; MLP up and gate; the output head).

    Without sequence parallelism the backward all-reduce of the input gradient is started as soon as
    that gradient exists and runs while the weight gradients are computed (Megatron's overlap of the
    data-gradient all-reduce), instead of after them. Under a zero-bubble schedule the weight gradients
    are left to the W pass instead (`layers/weight_grad.py`)."""
    if sequence_parallel or tp.size == 1:
        x = enter_tp_region(x, tp, sequence_parallel)
        return [weight_grad.linear(x, w, b) for w, b in zip(weights, biases)]
    return list(_ColumnLinearsOverlapped.apply(x, tp, *[t for pair in zip(weights, biases) for t in pair]))


class _ColumnLinearsOverlapped(torch.autograd.Function):
    """y_i = x W_i^T + b_i forward; backward: dx = sum_i g_i W_i, all-reduced over TP asynchronously
    while dW_i = g_i^T x and db_i are computed (or left to the W pass, see `layers/weight_grad.py`)."""

    @staticmethod
    def forward(ctx, x, tp, *weights_and_biases):
        weights, biases = weights_and_biases[0::2], weights_and_biases[1::2]
        # The parameters themselves name W's gradients (saved tensors come back as other objects under
        # recomputation); only their values are saved.
        ctx.tp, ctx.store, ctx.params = tp, weight_grad.active_store(), weights_and_biases
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        # Autograd materialises the gradient of every output (zeros for an unused one): none is None.
        x, *weight_values = ctx.saved_tensors
        weights_and_biases = ctx.params
        weights, biases = weights_and_biases[0::2], weights_and_biases[1::2]
        grad_x = grads[0].matmul(weight_values[0])
        for grad, weight in zip(grads[1:], weight_values[1:]):
            grad_x.add_(grad.matmul(weight))
        pending = comm.all_reduce_async(grad_x, ctx.tp)
        needs = ctx.needs_input_grad[2:]

        def weight_grads() -> weight_grad.WeightGrads:
            pairs = []
            for i, (grad, weight, bias) in enumerate(zip(grads, weights, biases)):
                pairs += [(w, g) for w, g in weight_grad.linear_weight_grads(
                    x, grad, weight, bias, needs[2 * i], bias is not None and needs[2 * i + 1])]
            return pairs
        if ctx.store is not None:
            ctx.store.defer(weight_grads)
            return (pending.wait().view_as(x), None, *[None] * len(weights_and_biases))
        by_tensor = {id(t): g for t, g in weight_grads()}
        grads_params = [by_tensor.get(id(t)) if t is not None else None for t in weights_and_biases]
        return (pending.wait().view_as(x), None, *grads_params)


class RowParallelLinear(torch.nn.Module):
    """y = sum over TP ranks of x[..., local in features] @ W[:, local cols].T, then + b (replicated)."""

    def __init__(self, in_features: int, out_features: int, tp: CommGroup, *, bias: bool = True,
                 std: float = 0.02, input_is_parallel: bool = True, sequence_parallel: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"in_features={in_features} is not divisible by tp={tp.size}")
        self.tp, self.input_is_parallel, self.sequence_parallel = tp, input_is_parallel, sequence_parallel
        self.weight = make_param(row_spec((out_features, in_features), tp, std=std), dtype, device)
        self.bias = (
            make_param(replicated_spec((out_features,), partial_over_tp=sequence_parallel, init="zeros"), dtype, device)
            if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return weight_grad.linear(x, self.weight, self.bias)  # the bias joins the matmul (one addmm)
        if not self.input_is_parallel:
            x = comm.scatter_to_sequence(x, self.tp, dim=-1)
        y = leave_tp_region(weight_grad.linear(x, self.weight), self.tp, self.sequence_parallel)
        return y if self.bias is None else y + self.bias


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, y, tp):
        ctx.tp = tp
        return comm.all_gather(y, tp, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return comm.split_for_rank(grad, ctx.tp, dim=-1), None
