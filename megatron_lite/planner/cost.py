"""Time of collectives (an alpha-beta model per link) and of compute (FLOPs over a share of the peak,
and, where the cluster gives their bandwidth, the norms and residual adds every TP rank repeats).

A ring over n ranks sends, per rank, 2(n-1)/n of the tensor in 2(n-1) steps for an all-reduce and
(n-1)/n of it in n-1 steps for an all-gather or a reduce-scatter; every step pays the link's latency
(alpha) once, every byte 1/bandwidth (beta), or, on a link with a measured curve, each step the
curve's time for its bytes. A point-to-point transfer is one step. An all-to-all
sends what leaves the rank in n-1 steps. `with_latency=False` drops the alpha terms: the bandwidth-only
figure most back-of-envelope tables quote.

Which link a group uses follows from the rank order (TP innermost, then DP with EP inside it, then
PP): a group whose ranks lie in one node uses the intra-node link, otherwise the inter-node one.
"""

from __future__ import annotations

from megatron_lite.models.config import ModelConfig
from megatron_lite.planner.spec import Cluster, Layout, Link
from megatron_lite.training.metrics import _layer_forward_flops

STEPS = {"all_reduce": lambda n: 2 * (n - 1), "all_gather": lambda n: n - 1, "reduce_scatter": lambda n: n - 1,
         "all_to_all": lambda n: n - 1, "all_to_all_counts": lambda n: n - 1, "send": lambda n: 1,
         "recv": lambda n: 0, "broadcast": lambda n: 1}
WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: 1.0, "all_to_all_counts": lambda n: 1.0,
        "send": lambda n: 1.0, "recv": lambda n: 0.0, "broadcast": lambda n: 1.0}


def collective_time(op: str, nbytes: float, n: int, link: Link, with_latency: bool = True) -> float:
    """Seconds one call of `op` on a tensor of `nbytes` (the counters' convention: the full tensor; for
    an all-to-all the bytes sent) takes over n ranks on `link`."""
    if n <= 1 or op not in STEPS:
        return 0.0
    steps = STEPS[op](n)
    if link.measured and with_latency and steps:  # the measured curve, per step of its share of the bytes
        return steps * link.step_time(WIRE[op](n) * nbytes / steps)
    alpha = steps * link.latency if with_latency else 0.0
    return alpha + WIRE[op](n) * nbytes / link.bandwidth


def group_span(layout: Layout, view: str) -> tuple[int, int]:
    """(size, highest global rank) of the group `view` that holds rank 0."""
    tp, dp, ep, pp = layout.tp, layout.dp, layout.ep, layout.pp
    spans = {"tp": (tp, tp - 1), "dp": (dp, tp * (dp - 1)), "dp_cp": (dp, tp * (dp - 1)), "ep": (ep, tp * (ep - 1)),
             "edp": (dp // ep, tp * ep * (dp // ep - 1)), "edp_cp": (dp // ep, tp * ep * (dp // ep - 1)),
             "pp": (pp, tp * dp * (pp - 1)), "embedding": (min(pp, 2), tp * dp * (pp - 1))}
    if view.startswith("tp/"):
        return int(view[3:]), int(view[3:]) - 1
    return spans[view]


def link_of(layout: Layout, cluster: Cluster, view: str) -> Link:
    _, highest = group_span(layout, view)
    return cluster.intra_node if highest < cluster.gpus_per_node else cluster.inter_node


def layer_forward_flops(cfg: ModelConfig, layer: int, tokens: int, seq_length: int) -> tuple[float, float]:
    """(dense matmuls, attention core) forward FLOPs of one layer over `tokens` tokens of sequences of
    `seq_length` (training/metrics.py's convention: full s x s attention, MoE layers count the active experts)."""
    dense, core = _layer_forward_flops(cfg, seq_length, layer)
    return dense * tokens, core * tokens


def compute_time(flops: float, cluster: Cluster, dtype: str) -> float:
    return flops / (cluster.flops(dtype) * cluster.mfu_ceiling)


# Passes over a [tokens, hidden] activation per layer that its two norms and two residual adds make, as
# fused kernels would: a norm reads x and writes y (backward: reads x and dy, writes dx), an add reads
# two and writes one (backward: accumulates the residual's gradient, the same). TP does not split them;
# SP does. The final norm of the last stage makes one norm's.
NORM_PASSES = {"forward": 2, "backward": 3}
LAYER_PASSES = {k: 2 * v + 2 * 3 for k, v in NORM_PASSES.items()}


def replicated_time(cfg: ModelConfig, layout: Layout, cluster: Cluster, layers: int, final_norm: bool,
                    tokens: int, dtype_bytes: int) -> tuple[float, float]:
    """(forward, backward) seconds of the norms and residual adds of `layers` layers (and the final norm)
    over one micro batch of `tokens` on one rank; 0 where the cluster does not model them apart."""
    if not cluster.elementwise_bandwidth:
        return 0.0, 0.0
    rows = tokens / (layout.tp if layout.sequence_parallel and layout.tp > 1 else 1)
    unit = rows * cfg.hidden_size * dtype_bytes / cluster.elementwise_bandwidth
    return tuple(unit * (layers * LAYER_PASSES[k] + final_norm * NORM_PASSES[k]) for k in ("forward", "backward"))


def rank_layer_flops(cfg: ModelConfig, layout: Layout, layer: int, tokens: int, seq_length: int) -> tuple[float, float]:
    """(all, attention core) forward FLOPs of one layer on one rank: TP splits the attention and dense
    feed-forwards; a mixture of experts is not split over TP (every TP rank routes its tokens, all of
    them, or its sequence slice under SP) and over EP each rank computes about tokens x top_k rows."""
    dense, core = layer_forward_flops(cfg, layer, tokens, seq_length)
    t = layout.tp
    if not cfg.is_moe_layer(layer):
        return (dense + core) / t, core / t
    routed = _routed_flops(cfg, tokens)
    u = t if layout.sequence_parallel and t > 1 else 1
    return (dense - routed + core) / t + routed / u, core / t


def _routed_flops(cfg: ModelConfig, tokens: int) -> float:
    """Forward FLOPs of an MoE layer's router and routed experts over `tokens` (not split over TP)."""
    moe = cfg.moe
    mats = 3 if cfg.activation == "swiglu" else 2
    return 2 * cfg.hidden_size * (moe.num_experts + cfg.expert_ffn_size * mats * moe.top_k) * tokens


def rank_layer_weight_flops(cfg: ModelConfig, layout: Layout, layer: int, tokens: int, seq_length: int) -> float:
    """FLOPs of the weight gradients a zero-bubble W runs for one layer on one rank. W computes dW = g^T x
    of the linears whose weight gradient layers/weight_grad.py defers (attention projections, dense and
    shared-expert feed-forwards), as many FLOPs as their forward; the attention core has no weights, and
    the router's and routed experts' gradients come from autograd during I. I is the rest of the backward."""
    forward, core = rank_layer_flops(cfg, layout, layer, tokens, seq_length)
    if not cfg.is_moe_layer(layer):
        return forward - core
    u = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    return forward - core - _routed_flops(cfg, tokens) / u
