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
    """torch._grouped_mm with its backward written out: the built-in one fails on the stride-0 gradient
    that a broadcast (e.g. of a sum) hands it."""

    @staticmethod
    def forward(ctx, x, weight_t, offsets):
        ctx.save_for_backward(x, weight_t, offsets)
        return torch._grouped_mm(x, weight_t, offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        x, weight_t, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, weight_t.transpose(1, 2), offs=offsets)
        grad_weight_t = torch._grouped_mm(x.t(), grad, offs=offsets)
        return grad_x, grad_weight_t, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], grouped_mm: bool) -> torch.Tensor:
    """Rows of `x` in consecutive groups (counts[e] rows for expert e) times weight[e]^T ([E, out, in])."""
    if grouped_mm and x.shape[0] and x.dtype == torch.float32 and _aligned(x, weight):
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return _GroupedMM.apply(x.contiguous(), weight.transpose(1, 2), offsets)
    pieces = [rows @ weight[e].t() for e, rows in enumerate(x.split(counts)) if rows.shape[0]]
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


class Router(torch.nn.Module):
    """Linear scores in fp32, top-k experts per token, and the auxiliary losses of these tokens."""

    def __init__(self, cfg, tp: CommGroup, partial_over_tp: bool):
        super().__init__()
        self.moe, self.tp, self.partial_over_tp = cfg.moe, tp, partial_over_tp
        self.weight = make_param(replicated_spec((cfg.moe.num_experts, cfg.hidden_size),
                                                 partial_over_tp=partial_over_tp, std=cfg.init_std))
        self.last_terms: tuple[torch.Tensor, torch.Tensor] | None = None  # (balancing, z) of the last forward

    def forward(self, tokens: torch.Tensor):
        """tokens [T, h] -> (weights [T, k] fp32, experts [T, k], auxiliary loss, tokens per expert [E])."""
        moe = self.moe
        logits = tokens.float() @ self.weight.float().t()
        probs = torch.softmax(logits, dim=-1)
        if moe.router_order == "softmax_topk":
            weights, experts = torch.topk(probs, moe.top_k, dim=-1)
        else:
            top_logits, experts = torch.topk(logits, moe.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        if moe.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.flatten(), minlength=moe.num_experts)
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
        weights, experts, auxiliary, counts = self.router(tokens)
        self.last_auxiliary_loss = auxiliary
        # Training forwards only: not validation, not the forward that recomputation repeats in backward.
        if self.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            self.load.add(counts, self.router.last_terms)
        out = self._dispatch_and_combine(tokens, weights, experts, counts)
        if self.shared is not None:
            out = out + self.shared(x).reshape(-1, shape[-1])
        return out.reshape(shape)

    def _dispatch_and_combine(self, tokens, weights, experts, counts) -> torch.Tensor:
        k, num_experts, ep = self.cfg.moe.top_k, self.cfg.moe.num_experts, self.ep
        local_experts = num_experts // ep.size
        order = torch.argsort(experts.flatten(), stable=True)  # assignments grouped by expert
        routed = tokens[order // k]
        per_rank = counts.view(ep.size, local_experts)
        received = comm.exchange_counts(per_rank.clone(), ep)  # row j: what rank j sends to my experts
        send, recv = per_rank.sum(1).tolist(), received.sum(1).tolist()
        arrived = comm.all_to_all_rows(routed, ep, send, recv)  # by source rank, then local expert
        expert_of_row = torch.arange(local_experts, device=tokens.device).repeat(ep.size).repeat_interleave(
            received.flatten())
        by_expert = torch.argsort(expert_of_row, stable=True)
        outputs = self.experts(arrived[by_expert], received.sum(0).tolist())
        outputs = outputs[torch.argsort(by_expert)]
        returned = comm.all_to_all_rows(outputs, ep, recv, send)
        combined = returned[torch.argsort(order)].view(-1, k, tokens.shape[-1])
        return (combined * weights.to(combined.dtype).unsqueeze(-1)).sum(dim=1)



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
        self.micro_batches = 0

    def add(self, counts: torch.Tensor, terms) -> None:
        self.tokens = self.tokens.to(counts.device) + counts
        if terms is not None:
            self.terms = self.terms.to(counts.device) + torch.stack(terms).double()
        self.micro_batches += 1

    def take(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tokens per expert, summed (balancing, z) losses, micro batches) since the last call."""
        taken = self.tokens, self.terms, self.micro_batches
        self._reset()
        return taken
