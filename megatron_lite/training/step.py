"""One training step without pipeline parallelism: microbatches accumulate gradients, then sync."""

from __future__ import annotations

import torch

from megatron_lite.optim.grad_sync import finalize_grads
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout


def split_microbatches(tensor: torch.Tensor, num_microbatches: int) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] % num_microbatches:
        raise ValueError(
            f"local batch of {tensor.shape[0]} samples is not divisible by microbatches={num_microbatches}"
        )
    return tensor.chunk(num_microbatches, dim=0)


def forward_backward(model, tokens: torch.Tensor, targets: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """Accumulate gradients of the mean token loss of this rank's batch; returns that loss (detached).

    Each microbatch's mean loss is divided by the microbatch count, so the accumulated gradient is
    the gradient of the mean over the rank's whole batch (microbatches hold equal token counts).
    """
    total = torch.zeros((), device=tokens.device)
    for tok, tgt in zip(split_microbatches(tokens, num_microbatches), split_microbatches(targets, num_microbatches)):
        loss = model.loss(model(tok), tgt).mean() / num_microbatches
        loss.backward()
        total += loss.detach()
    return total


def train_step(model, optimizer, tokens, targets, layout: ParallelLayout, num_microbatches: int = 1) -> float:
    """Forward/backward over this rank's batch, final gradients, optimizer step; returns the global loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model, tokens, targets, num_microbatches)
    finalize_grads(model, layout)
    optimizer.step()
    return comm.all_reduce(loss, layout.dp, op="avg").item()
