"""Mixture-of-experts feed-forward block: router, experts over the `ep` axis, dispatch and combine.

Each token picks `top_k` experts (router in fp32). Tokens are sorted by expert; with expert
parallelism (EP ranks hold experts / ep each) the token counts are exchanged first, then one
variable-size all-to-all takes each token to the rank of its expert and one brings the results back
(both through parallel/comm.py, so the bytes are counted like every other collective). Zero tokens for
a rank or an expert is a valid case of the same code path, and every rank of an EP group issues the
same collectives in the same order whatever the routing.

Placement (sharding.ShardSpec): the router and shared experts are dense parameters; the experts are
cut along dim 0 (the global expert index) over `ep`, so a checkpoint stores them by global expert and
loads under any EP size. Their gradient is averaged over the expert-data-parallel group, and scaled by
1/ep in the backward: each expert's gradient sums the contributions of the tokens of all EP ranks of
its group, each of which is the gradient of that rank's share of the loss. Under TP the experts are
replicated (every TP rank routes the same tokens; without SP it computes the same results, with SP
its own sequence slice, and the gradients are then summed over TP like the norm weights').

The auxiliary losses (the Switch/GShard balancing loss E * sum_e f_e * P_e, the router z-loss) are
computed over the tokens of one micro batch (`micro_batch_size` sequences), summed over TP under SP,
so they do not depend on the layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.sharding import EXPERT_DATA_PARALLEL, Reduction, Shard, ShardSpec, make_param, replicated_spec

# `cfg` below is a models.config.ModelConfig: read here, not imported (layers sit below models).


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else _ScaleGradient.apply(x, scale)


def expert_spec(full_shape, ep: CommGroup, partial_over_tp: bool, std: float) -> ShardSpec:
    reductions = (Reduction(EXPERT_DATA_PARALLEL, "avg"),) + ((Reduction("tp", "sum"),) if partial_over_tp else ())
    return ShardSpec(full_shape=tuple(full_shape), shards=(Shard(0, "ep", ep.size, ep.rank, ep.size),),
                     reductions=reductions, std=std)


class _GroupedMM(torch.autograd.Function):
    """x times weight[e]^T per group of rows, torch._grouped_mm with its backward written out: the built-in
    one fails on the stride-0 gradient that a broadcast (e.g. of a sum) hands it. The weight gradient is
    computed in the weight's own [E, out, in] layout, so that it needs no transposing copy."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, weight, offs=offsets)
        grad_weight = torch._grouped_mm(grad.t(), x, offs=offsets)
        return grad_x, grad_weight, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], grouped_mm: bool) -> torch.Tensor:
    """Rows of `x` in consecutive groups (counts[e] rows for expert e) times weight[e]^T ([E, out, in])."""
    if grouped_mm and x.shape[0] and x.dtype == torch.float32 and _aligned(x, weight):
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return _GroupedMM.apply(x.contiguous(), weight, offsets)
    # unbind, not weight[e]: its backward stacks the experts' gradients once, where each select's would
    # be a zero-filled full-size tensor, summed over the experts.
    pieces = [rows @ w.t() for rows, w in zip(x.split(counts), weight.unbind(0)) if rows.shape[0]]
    # No rows at all: still a product of x and the weight, so that the backward reaches the all-to-all
    # that delivered x (the other EP ranks wait in it) and the weight gets its (zero) gradient.
    return torch.cat(pieces) if pieces else x @ weight[0].t()


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # torch._grouped_mm needs rows whose byte strides are multiples of 16.
    return all(n * x.element_size() % 16 == 0 for n in (x.shape[1], weight.shape[1]))


class Experts(torch.nn.Module):
    """This EP rank's experts (SwiGLU, or GeLU for a GeLU model), as [E_local, out, in] weights."""

    def __init__(self, cfg, ep: CommGroup, partial_over_tp: bool, layer_std: float):
        super().__init__()
        e, h, f = cfg.moe.num_experts, cfg.hidden_size, cfg.expert_ffn_size
        self.ep, self.swiglu, self.grouped_mm = ep, cfg.activation == "swiglu", cfg.moe.grouped_mm
        self.up_proj = make_param(expert_spec((e, f, h), ep, partial_over_tp, cfg.init_std))
        self.gate_proj = make_param(expert_spec((e, f, h), ep, partial_over_tp, cfg.init_std)) if self.swiglu else None
        self.down_proj = make_param(expert_spec((e, h, f), ep, partial_over_tp, layer_std))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        scale = 1.0 / self.ep.size
        up = grouped_linear(x, scale_gradient(self.up_proj, scale), counts, self.grouped_mm)
        if self.swiglu:
            gate = grouped_linear(x, scale_gradient(self.gate_proj, scale), counts, self.grouped_mm)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(up, approximate="tanh")
        return grouped_linear(hidden, scale_gradient(self.down_proj, scale), counts, self.grouped_mm)


class StepRouting:
    """What a router's training forwards of the current step routed (detached sums, no device sync),
    for the step-level parts: the global-batch auxiliary losses and the balancing bias."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset_scope()
        self.bias_counts = torch.zeros(num_experts, dtype=torch.int64)
        # Set by `finalize_scope` once the step's forwards are done; read by the backwards.
        self.prob_weights: torch.Tensor | None = None  # d objective / d probs[t, e], per expert
        self.z_weight: torch.Tensor | None = None      # d objective / d lse(t)^2

    def reset_scope(self) -> None:
        # tokens per expert (E), probability sums (E), lse^2 sum, tokens: one vector, one all-reduce
        self.sums = torch.zeros(2 * self.num_experts + 2, dtype=torch.float64)
        self.forwards = 0

    def add(self, counts: torch.Tensor, probs: torch.Tensor | None, lse_squared: torch.Tensor | None) -> None:
        self.bias_counts = self.bias_counts.to(counts.device) + counts
        if probs is not None:
            self.sums = self.sums.to(counts.device) + torch.cat(
                [counts.double(), probs.sum(0).double(), lse_squared.sum().double().reshape(1),
                 torch.tensor([probs.shape[0]], dtype=torch.float64, device=counts.device)])
            self.forwards += 1


class _DeferredAuxiliary(torch.autograd.Function):
    """The global-batch auxiliary losses of one micro batch, as a zero whose gradient is known only once
    every forward of the step has run (the token fractions f_e are the global batch's): d/dprobs[t, e] =
    prob_weights[e], d/dlse(t)^2 = z_weight, read from `routing` when the backward runs."""

    @staticmethod
    def forward(ctx, probs, lse_squared, routing: StepRouting):
        ctx.routing, ctx.rows = routing, probs.shape[0]
        return probs.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        routing = ctx.routing
        if routing.prob_weights is None:
            raise RuntimeError("aux_loss_scope=global_batch: a backward ran before the step's forwards were "
                               "finalised (TransformerStage.prepare_backward)")
        return ((grad * routing.prob_weights).expand(ctx.rows, -1), (grad * routing.z_weight).expand(ctx.rows),
                None)


class Router(torch.nn.Module):
    """Linear scores in fp32, top-k experts per token, and the auxiliary losses of these tokens."""

    def __init__(self, cfg, tp: CommGroup, partial_over_tp: bool):
        super().__init__()
        self.moe, self.tp, self.partial_over_tp = cfg.moe, tp, partial_over_tp
        self.weight = make_param(replicated_spec((cfg.moe.num_experts, cfg.hidden_size),
                                                 partial_over_tp=partial_over_tp, std=cfg.init_std))
        if cfg.moe.bias_update_rate > 0:
            # Not trained by the optimizer (no gradient); saved and loaded like a weight, kept in fp32.
            self.expert_bias = make_param(replicated_spec((cfg.moe.num_experts,), init="zeros"))
            self.expert_bias.requires_grad_(False)
        else:
            self.expert_bias = None
        self.step = StepRouting(cfg.moe.num_experts)
        self.last_terms: tuple[torch.Tensor, torch.Tensor] | None = None  # (balancing, z) of the last forward

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.expert_bias is not None:  # a model cast to bf16 keeps the bias exact
            self.expert_bias.data = self.expert_bias.data.float()
        return self

    def forward(self, tokens: torch.Tensor, counting: bool = False):
        """tokens [T, h] -> (weights [T, k] fp32, experts [T, k], auxiliary loss, tokens per expert [E]).
        counting: a training forward (not validation, not recomputation), whose routing the step counts."""
        moe = self.moe
        logits = tokens.float() @ self.weight.float().t()
        probs = torch.softmax(logits, dim=-1)
        scores = probs if moe.router_order == "softmax_topk" else logits
        if self.expert_bias is not None:  # the bias steers the choice only, not the weights
            experts = torch.topk(scores + self.expert_bias, moe.top_k, dim=-1).indices
            weights = scores.gather(-1, experts)
        else:
            weights, experts = torch.topk(scores, moe.top_k, dim=-1)
        if moe.router_order == "topk_softmax":
            weights = torch.softmax(weights, dim=-1)
        if moe.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.flatten(), minlength=moe.num_experts)
        if moe.aux_loss_scope == "global_batch":
            lse_squared = torch.logsumexp(logits, dim=-1).square()
            if counting:
                self.step.add(counts, probs.detach(), lse_squared.detach())
            auxiliary = None
            if torch.is_grad_enabled() and (moe.aux_loss_coeff or moe.z_loss_coeff):
                auxiliary = _DeferredAuxiliary.apply(probs, lse_squared, self.step)
            return weights, experts, auxiliary, counts
        if counting:
            self.step.add(counts, None, None)
        return weights, experts, self._auxiliary_loss(logits, probs, counts), counts

    def _auxiliary_loss(self, logits, probs, counts) -> torch.Tensor | None:
        moe = self.moe
        if moe.aux_loss_coeff == 0 and moe.z_loss_coeff == 0:
            return None
        # Sums over this rank's tokens; under SP the micro batch's tokens are spread over TP, so the sums
        # are completed there (an all-reduce whose backward is the identity: each rank's share of the
        # gradient flows into its own tokens).
        stats = torch.cat([probs.sum(0), torch.logsumexp(logits, dim=-1).square().sum().reshape(1)])
        counted = torch.cat([counts.to(probs.dtype), torch.tensor([logits.shape[0]], dtype=probs.dtype,
                                                                  device=probs.device)])
        if self.partial_over_tp:
            stats = comm.reduce_from_group(stats, self.tp)
            counted = comm.all_reduce(counted, self.tp)
        tokens = counted[-1].clamp(min=1)
        fraction = counted[:-1] / (tokens * moe.top_k)
        mean_prob = stats[:-1] / tokens
        balance = moe.num_experts * (fraction * mean_prob).sum()
        z = stats[-1] / tokens
        self.last_terms = (balance.detach(), z.detach())
        return moe.aux_loss_coeff * balance + moe.z_loss_coeff * z

    def finalize_scope(self, summed: torch.Tensor, forwards: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global-batch scope: from the step's sums over every data-parallel rank (`summed`, as in
        StepRouting.sums), set the gradients the backwards apply and return (balancing, z) of the global
        batch. The executor weights each micro batch's auxiliary loss by 1/forwards and the gradient sync
        averages over DP: both are undone here, so each rank contributes its tokens' share of the
        gradient of the one global loss."""
        moe, e = self.moe, self.moe.num_experts
        tokens = summed[-1].clamp(min=1)
        fraction = summed[:e] / (tokens * moe.top_k)
        mean_prob = summed[e:2 * e] / tokens
        scale = forwards * dp_size / tokens
        self.step.prob_weights = (scale * moe.aux_loss_coeff * e * fraction).float()
        self.step.z_weight = (scale * moe.z_loss_coeff).float()
        self.step.reset_scope()
        balance = e * (fraction * mean_prob).sum()
        return balance, summed[2 * e] / tokens

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """One step of auxiliary-loss-free balancing from the global batch's tokens per expert: experts
        above the mean get a lower bias, those below a higher one (DeepSeek-V3's sign rule)."""
        counts = counts.to(torch.float32)
        self.expert_bias += self.moe.bias_update_rate * torch.sign(counts.mean() - counts)


class MoEBlock(torch.nn.Module):
    """Router + experts (+ shared experts, a dense MLP every token goes through)."""

    def __init__(self, cfg, tp: CommGroup, ep: CommGroup, sequence_parallel: bool, layer_std: float,
                 shared: torch.nn.Module | None = None):
        super().__init__()
        self.cfg, self.ep = cfg, ep
        self.router = Router(cfg, tp, partial_over_tp=sequence_parallel)
        self.experts = Experts(cfg, ep, partial_over_tp=sequence_parallel, layer_std=layer_std)
        self.shared = shared
        self.last_auxiliary_loss: torch.Tensor | None = None
        self.load = RoutingLoad(cfg.moe.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        # Training forwards only: not validation, not the forward that recomputation repeats in backward.
        counting = self.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1
        weights, experts, auxiliary, counts = self.router(tokens, counting)
        self.last_auxiliary_loss = auxiliary
        order = self._assignment_order(experts, weights)
        if order is not None:
            kept = torch.bincount(experts.flatten()[order], minlength=self.cfg.moe.num_experts)
        if counting:
            self.load.add(counts, self.router.last_terms if self.cfg.moe.aux_loss_scope == "micro_batch" else None,
                          dropped=0 if order is None else int(counts.sum() - kept.sum()))
        if order is None:
            out = self._dispatch_and_combine(tokens, weights, experts, counts)
        else:
            out = self._dispatch_and_combine_kept(tokens, weights, order, kept)
        if self.shared is not None:
            out = out + self.shared(x).reshape(-1, shape[-1])
        return out.reshape(shape)

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments one expert takes from `num_tokens` tokens routed at once (None: dropless)."""
        moe = self.cfg.moe
        if moe.capacity_factor is None:
            return None
        return math.ceil(moe.capacity_factor * num_tokens * moe.top_k / moe.num_experts)

    def _assignment_order(self, experts, weights) -> torch.Tensor | None:
        """With a capacity: the kept assignments (indices into experts.flatten()), grouped by expert,
        each expert's in priority order. None: dropless."""
        capacity = self.capacity(experts.shape[0])
        if capacity is None:
            return None
        flat = experts.flatten()
        if self.cfg.moe.drop_policy == "probs":
            priority = torch.argsort(weights.flatten(), descending=True, stable=True)
        else:
            priority = torch.arange(flat.numel(), device=flat.device)
        order = priority[torch.argsort(flat[priority], stable=True)]
        counts = torch.bincount(flat, minlength=self.cfg.moe.num_experts)
        group_start = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - group_start[flat[order]]
        return order[rank_in_expert < capacity]

    def _exchange(self, routed, counts):
        """Rows grouped by (global) expert, `counts` per expert -> the expert outputs, same order."""
        ep = self.ep
        if ep.size == 1:  # no exchange: the rows are already grouped by expert
            return self.experts(routed, counts.tolist())
        local_experts = self.cfg.moe.num_experts // ep.size
        per_rank = counts.view(ep.size, local_experts)
        received = comm.exchange_counts(per_rank.clone(), ep)  # row j: what rank j sends to my experts
        send, recv = per_rank.sum(1).tolist(), received.sum(1).tolist()
        arrived = comm.all_to_all_rows(routed, ep, send, recv)  # by source rank, then local expert
        expert_of_row = torch.arange(local_experts, device=routed.device).repeat(ep.size).repeat_interleave(
            received.flatten())
        by_expert = torch.argsort(expert_of_row, stable=True)
        outputs = self.experts(arrived[by_expert], received.sum(0).tolist())
        outputs = outputs[torch.argsort(by_expert)]
        return comm.all_to_all_rows(outputs, ep, recv, send)

    def _dispatch_and_combine(self, tokens, weights, experts, counts) -> torch.Tensor:
        k = self.cfg.moe.top_k
        order = torch.argsort(experts.flatten(), stable=True)  # assignments grouped by expert
        returned = self._exchange(tokens[order // k], counts)
        combined = returned[torch.argsort(order)].view(-1, k, tokens.shape[-1])
        return (combined * weights.to(combined.dtype).unsqueeze(-1)).sum(dim=1)

    def _dispatch_and_combine_kept(self, tokens, weights, order, kept) -> torch.Tensor:
        k = self.cfg.moe.top_k
        rows = order // k
        returned = self._exchange(tokens[rows], kept)
        contributions = returned * weights.flatten()[order].to(returned.dtype).unsqueeze(-1)
        # A dropped assignment adds nothing; a token all of whose assignments are dropped gets 0 (plus
        # the residual and any shared expert outside this block).
        return torch.zeros_like(tokens, dtype=returned.dtype).index_add(0, rows, contributions)


class RoutingLoad:
    """What a block's training forwards routed since the last `take`: tokens per expert, and the sums of
    the balancing and z losses over its micro batches (for metrics; the loss itself is elsewhere). Kept
    as tensors: no device sync per forward."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._reset()

    def _reset(self) -> None:
        self.tokens = torch.zeros(self.num_experts, dtype=torch.int64)
        self.terms = torch.zeros(2, dtype=torch.float64)  # balancing, z
        self.terms_added = 0  # micro batches (scope micro_batch) or steps (global_batch) in `terms`
        self.dropped = 0      # assignments over an expert's capacity
        self.micro_batches = 0

    def add(self, counts: torch.Tensor, terms=None, dropped: int = 0) -> None:
        self.tokens = self.tokens.to(counts.device) + counts
        if terms is not None:
            self.add_terms(terms)
        self.dropped += dropped
        self.micro_batches += 1

    def add_terms(self, terms) -> None:
        self.terms = self.terms.to(terms[0].device) + torch.stack(list(terms)).double()
        self.terms_added += 1

    def take(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tokens per expert, summed (balancing, z) losses, how many were summed) since the last call;
        `dropped` is read before."""
        taken = self.tokens, self.terms, self.terms_added
        self._reset()
        return taken
