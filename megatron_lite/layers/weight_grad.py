"""The backward split into B (input gradient) and W (weight gradients) for zero-bubble pipelines.

A fused backward computes, for every layer, the gradient of its input and of its weights. Zero-bubble
schedules (Qi et al. 2024) run the first part as soon as the gradient arrives (B, on the critical
path between stages) and the second later (W, filling idle slots). Here:

- The linears (column-, row- and vocab-parallel: `layers/linear.py`, the output head) and the
  vocabulary-parallel embedding run as autograd functions that look, at forward time, for the
  `WeightGradStore` the executor opened for this (model chunk, microbatch) (`deferring_to`). Their
  backward then computes the input gradient and appends a closure for the weight gradient to that
  store, returning no gradient for the weight. Without a store they compute both at once: the fused
  backward runs the very same operations, which is why B followed by W equals it bitwise.
- Every other parameter (norms, the biases added outside a matmul, learned positions, MoE experts)
  gets its gradient from autograd during B (`backward_input` differentiates with respect to the
  stage input and the chunk's parameters without accumulating), held in the store until W.
- `backward_weight` (W) runs the closures and accumulates everything through autograd's own
  accumulation into `.grad`, so the gradient buffers' post-accumulate hooks (fp32 main grads, DP
  bucket reduction) fire exactly as they do after a fused backward: once per parameter and W.

With recomputation the recomputed forward runs inside B, under the same store. A store must be empty
at the end of every step (`WeightGradStore.check_empty`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch.autograd import Variable

WeightGrads = list[tuple[torch.Tensor, torch.Tensor | None]]  # (parameter, its gradient) pairs


class WeightGradStore:
    """The weight-gradient work of one (model chunk, microbatch) between its B and its W."""

    def __init__(self, name: str = ""):
        self.name = name
        self._closures: list[Callable[[], WeightGrads]] = []
        self._held: WeightGrads = []

    def defer(self, closure: Callable[[], WeightGrads]) -> None:
        self._closures.append(closure)

    def hold(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        self._held.append((param, grad))

    def __len__(self) -> int:
        return len(self._closures) + len(self._held)

    def drain(self) -> WeightGrads:
        """Run the deferred work: every (parameter, gradient) pair, in the order B produced them."""
        pairs = list(self._held)
        for closure in self._closures:
            pairs += closure()
        self._closures, self._held = [], []
        return pairs

    def check_empty(self) -> None:
        if len(self):
            raise RuntimeError(f"weight-gradient store {self.name} still holds {len(self)} pieces of work at the end "
                               "of the step: a B ran without its W")


# The store that layers built for deferral report their weight-gradient work to, set by the executor
# around the forward (and B, for recomputation) of one (chunk, microbatch). A plain module variable
# rather than a thread-local: autograd may run backward functions on its own device threads.
_active: WeightGradStore | None = None


@contextmanager
def deferring_to(store: WeightGradStore | None) -> Iterator[None]:
    global _active
    previous, _active = _active, store
    try:
        yield
    finally:
        _active = previous


def active_store() -> WeightGradStore | None:
    """What a deferring layer records at forward time (None: compute weight gradients in backward)."""
    return _active


def linear_weight_grads(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, needs_weight: bool, needs_bias: bool) -> WeightGrads:
    """dW = g^T x and db = sum g over the flattened leading dims (autograd's own formulas for F.linear),
    paired with `weight` and `bias`, which must be the parameters themselves."""
    grad_2d = grad.reshape(-1, grad.shape[-1])
    pairs: WeightGrads = []
    if needs_weight:
        pairs.append((weight, grad_2d.t().mm(x.reshape(-1, x.shape[-1]))))
    if needs_bias:
        pairs.append((bias, grad_2d.sum(0)))
    return pairs


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose weight gradient is deferred when a store is active (see the module docstring)."""
    if not torch.is_grad_enabled() or not (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return torch.nn.functional.linear(x, weight, bias)
    return LinearFunction.apply(x, weight, bias)


class LinearFunction(torch.autograd.Function):
    """y = x W^T + b whose backward leaves dW, db to the store active at forward time, if any."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # The parameters themselves name the gradients W accumulates: saved tensors come back as other
        # tensor objects under recomputation (detached copies of the recomputed forward's).
        ctx.store, ctx.params = active_store(), (weight, bias)
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight_value = ctx.saved_tensors
        weight, bias = ctx.params
        grad_x = grad.matmul(weight_value) if ctx.needs_input_grad[0] else None
        needs_weight, needs_bias = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        if ctx.store is not None:
            ctx.store.defer(lambda: linear_weight_grads(x, grad, weight, bias, needs_weight, needs_bias))
            return grad_x, None, None
        grads = linear_weight_grads(x, grad, weight, bias, needs_weight, needs_bias)
        grad_w = grads.pop(0)[1] if needs_weight else None
        grad_b = grads.pop(0)[1] if needs_bias else None
        return grad_x, grad_w, grad_b


class EmbeddingFunction(torch.autograd.Function):
    """F.embedding whose weight gradient (aten's embedding_backward) can be left to a store."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.store, ctx.num_rows, ctx.weight = active_store(), weight.shape[0], weight  # see LinearFunction
        ctx.save_for_backward(ids)
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        weight, rows = ctx.weight, ctx.num_rows

        def weight_grads() -> WeightGrads:
            return [(weight, torch.ops.aten.embedding_backward(grad, ids, rows, -1, False, False))]
        if ctx.store is not None:
            ctx.store.defer(weight_grads)
            return None, None
        return None, weight_grads()[0][1]


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return torch.nn.functional.embedding(ids, weight)
    return EmbeddingFunction.apply(ids, weight)


def backward_input(outputs: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...],
                   stage_input: torch.Tensor | None, params: Iterable[torch.Tensor],
                   store: WeightGradStore) -> torch.Tensor | None:
    """B: the gradient of `stage_input` (None if it needs none); the gradients autograd computes on the
    way for `params` are held in `store` (deferring layers have already put their work there)."""
    params = [p for p in params if p.requires_grad]
    inputs = ([stage_input] if stage_input is not None and stage_input.requires_grad else []) + params
    if not inputs:
        return None
    results = Variable._execution_engine.run_backward(
        tensors=outputs, grad_tensors=grads, keep_graph=False, create_graph=False, inputs=tuple(inputs),
        allow_unreachable=True, accumulate_grad=False,
    )
    offset = len(inputs) - len(params)
    for param, grad in zip(params, results[offset:]):
        if grad is not None:
            store.hold(param, grad)
    return results[0] if offset else None


def backward_weight(store: WeightGradStore) -> None:
    """W: accumulate every weight gradient of the store into `.grad` through autograd's accumulation
    (hooks included), one accumulation per parameter."""
    summed: dict[int, list] = {}
    for param, grad in store.drain():
        if grad is None:
            continue
        if not (param.is_leaf and param.requires_grad):
            raise RuntimeError(f"weight-gradient store {store.name}: a gradient of shape {tuple(grad.shape)} is "
                               "paired with a tensor that is no trainable parameter; it would be lost")
        entry = summed.get(id(param))
        if entry is None:
            summed[id(param)] = [param, grad]
        else:
            entry[1] = entry[1] + grad
    if not summed:
        return
    params, grads = zip(*summed.values())
    Variable._execution_engine.run_backward(
        tensors=params, grad_tensors=grads, keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True,
    )
