"""AdamW on flat fp32 tensors, and which parameters it decays.

The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps added after the
square root), written out so it runs on ranges of the ZeRO-1 shard rather than on whole parameters.
"""

from __future__ import annotations

import math

import torch

from megatron_lite.parallel.sharding import spec_of


def uses_weight_decay(param: torch.nn.Parameter) -> bool:
    """Megatron's rule: matrices and embeddings are decayed; biases and norm weights (every 1-D
    parameter) are not. Decided on the full serial shape, so every layout decays the same set."""
    return len(spec_of(param).full_shape) > 1


@torch.no_grad()
def adamw_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           decayed: list[torch.Tensor], *, step: int, lr: float, betas: tuple[float, float], eps: float,
           weight_decay: float) -> None:
    """One AdamW update of `master` in place. `decayed`: views of `master` that get weight decay."""
    beta1, beta2 = betas
    if weight_decay and decayed:
        torch._foreach_mul_(decayed, 1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
