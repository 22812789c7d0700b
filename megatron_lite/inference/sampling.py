"""Choosing the next token from full-vocabulary logits: greedy, temperature, top-k, top-p.

Randomness is per request: request i draws from its own generator seeded from (seed, i), one uniform
number per step, so its tokens depend neither on the layout (TP, PP, DP replica) nor on which other
requests share its batch or pipeline group. A draw turns into a token by inverting the cumulative
distribution over the kept tokens in id order: deterministic on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0: greedy (argmax); top_k 0: no limit; top_p 1: no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0 \
                or self.temperature == float("inf"):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0: greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0: every token)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1: no nucleus cut)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def request_generators(params: SamplingParams, request_ids) -> list[torch.Generator] | None:
    """One CPU generator per request (None when greedy: nothing is drawn)."""
    if params.greedy:
        return None
    return [torch.Generator().manual_seed(params.seed * 1_000_003 + int(i)) for i in request_ids]


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities sorted in decreasing order [b, V], the token ids in that order) after temperature,
    top-k and top-p; the tokens cut have probability 0 (the most likely token always stays)."""
    logits = logits.float() / params.temperature
    # Stable sort of -logits: equal logits stay in id order, on every rank.
    order = torch.sort(-logits, dim=-1, stable=True).indices
    sorted_logits = logits.gather(-1, order)
    if params.top_k:
        sorted_logits[:, params.top_k:] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    if params.top_p < 1:
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= params.top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, order


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row of `logits` [b, vocab] (padding columns already -inf or cut off).

    The draw inverts the cumulative distribution in token-id order, not in probability order: two
    layouts whose logits differ in the last bits may order near-equal tokens differently, but their
    id-order CDFs differ only by those bits, so a draw picks another token only within that distance
    of a boundary."""
    if params.greedy:
        return logits.argmax(-1)
    sorted_probs, order = filtered_probabilities(logits, params)
    probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs).double()
    draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)
    # Rounding may put a draw at the very end: the last token that can be drawn.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int64).argmax(-1, keepdim=True)
    return torch.minimum(index, last).squeeze(-1)
