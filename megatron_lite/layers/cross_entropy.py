"""Cross-entropy over vocabulary-sharded logits; the full-vocabulary logits never exist on one rank.

Three all-reduces of [tokens]-sized tensors (max, target logit, sum of exponentials) replace a
gather of [tokens, vocab]. Padding columns (vocabulary ids >= vocab_size) are masked to -inf so they
contribute neither to the loss nor to the gradient. Targets equal to `ignore_index` (padding, masked
prompts) give a loss of exactly 0 and a zero gradient row, as `F.cross_entropy(ignore_index=...)`; the
losses stay per token, and dividing their sum by the number of valid targets is the caller's business
(the step's count spans microbatches and DP ranks, see `training/step.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup

IGNORE_INDEX = -100  # PyTorch's and Hugging Face's convention for "no target here"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp, vocab_start, vocab_size, ignore_index):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        valid_columns = min(max(vocab_size - vocab_start, 0), local_vocab)
        if valid_columns < local_vocab:
            logits = logits.clone()
            logits[..., valid_columns:] = float("-inf")

        logits_max = comm.all_reduce(logits.max(dim=-1).values, tp, op="max")
        shifted = logits - logits_max.unsqueeze(-1)

        # An ignored target may fall inside some rank's range (ignore_index need not be negative), so it
        # is masked like a target held elsewhere: no target logit, no -1 in the gradient.
        ignored = targets == ignore_index
        local_targets = targets - vocab_start
        outside = (local_targets < 0) | (local_targets >= local_vocab) | ignored
        local_targets = local_targets.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = comm.all_reduce(target_logit, tp)

        exp = shifted.exp_()
        sum_exp = comm.all_reduce(exp.sum(dim=-1), tp)
        loss = (sum_exp.log() - target_logit).masked_fill_(ignored, 0.0)

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_targets, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, outside, ignored = ctx.saved_tensors
        grad = softmax
        on_this_rank = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -on_this_rank.unsqueeze(-1))
        # The softmax row of an ignored token is not a gradient of anything: its loss is the constant 0.
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: CommGroup,
                                 vocab_start: int, vocab_size: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token loss [...] from this rank's logits [..., local_vocab] whose first column is `vocab_start`;
    0, with no gradient, where the target is `ignore_index`."""
    if tp.size == 1:  # the whole vocabulary is here: PyTorch's fused log-softmax + NLL, twice as fast
        logits = logits[..., :vocab_size].float()
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                               reduction="none").view(targets.shape)
    return _VocabParallelCrossEntropy.apply(logits, targets, tp, vocab_start, vocab_size, ignore_index)


def step_loss_divisor(targets: torch.Tensor, dp: CommGroup, device: torch.device | str | None = None,
                      ignore_index: int = IGNORE_INDEX) -> float:
    """What a DP rank divides each microbatch's summed per-token loss by, so that the step's loss and
    gradients are those of the mean over every valid target of the global batch: N / dp, N = valid
    (not `ignore_index`) targets in this rank's `targets` summed over `dp` (one all-reduce of one
    integer). The gradient sync averages over DP, dividing by dp once more, which leaves sum / N; the DP
    average of the ranks' losses is the global mean. N = 0 (nothing to learn from anywhere): every
    per-token loss is 0 with no gradient, and 1 is returned, so the loss is 0 where a mean (as
    `F.cross_entropy`'s) would be 0/0 = nan."""
    count = (targets != ignore_index).sum().reshape(1).to(device=device or targets.device, dtype=torch.int64)
    valid = int(comm.all_reduce(count, dp).item())
    return valid / dp.size if valid else 1.0
