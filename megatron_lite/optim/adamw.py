"""AdamW on flat fp32 tensors, and which parameters it decays.

The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps added after the
square root), applied to flat ranges of the ZeRO-1 shard rather than to whole parameters.
"""

from __future__ import annotations

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
    """One AdamW update of `master` in place. `decayed`: views of `master` that get weight decay.

    Decoupled decay first (as torch.optim.AdamW does), then the moment update and step in one pass
    of PyTorch's fused kernel (CPU and CUDA) over the whole flat range: 3-4x faster than the same
    update written as separate elementwise ops, which each read and write every element."""
    if weight_decay and decayed:
        torch._foreach_mul_(decayed, 1 - lr * weight_decay)
    step_count = torch.tensor(float(step), device=master.device)
    torch._fused_adamw_([master], [grad], [exp_avg], [exp_avg_sq], [], [step_count], lr=lr, beta1=betas[0],
                        beta2=betas[1], weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
