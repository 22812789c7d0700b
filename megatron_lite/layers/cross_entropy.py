"""Cross-entropy over vocabulary-sharded logits; the full-vocabulary logits never exist on one rank.

Three all-reduces of [tokens]-sized tensors (max, target logit, sum of exponentials) replace a
gather of [tokens, vocab]. Padding columns (vocabulary ids >= vocab_size) are masked to -inf so they
contribute neither to the loss nor to the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp, vocab_start, vocab_size):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        valid_columns = min(max(vocab_size - vocab_start, 0), local_vocab)
        if valid_columns < local_vocab:
            logits = logits.clone()
            logits[..., valid_columns:] = float("-inf")

        logits_max = comm.all_reduce(logits.max(dim=-1).values, tp, op="max")
        shifted = logits - logits_max.unsqueeze(-1)

        local_targets = targets - vocab_start
        outside = (local_targets < 0) | (local_targets >= local_vocab)
        local_targets = local_targets.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = comm.all_reduce(target_logit, tp)

        exp = shifted.exp_()
        sum_exp = comm.all_reduce(exp.sum(dim=-1), tp)
        loss = sum_exp.log() - target_logit

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_targets, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, outside = ctx.saved_tensors
        grad = softmax
        on_this_rank = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -on_this_rank.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: CommGroup,
                                 vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Per-token loss [...] from this rank's logits [..., local_vocab] whose first column is `vocab_start`."""
    if tp.size == 1:  # the whole vocabulary is here: PyTorch's fused log-softmax + NLL, twice as fast
        logits = logits[..., :vocab_size].float()
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    return _VocabParallelCrossEntropy.apply(logits, targets, tp, vocab_start, vocab_size)
