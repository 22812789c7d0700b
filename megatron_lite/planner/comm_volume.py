"""Bytes one rank moves per training step, per (group, operation), as parallel/comm.py counts them.

The keys are the counters' own: the group's name as the layout creates it (a flattened view that
equals one axis carries that axis's name, e.g. dense gradients averaged over `dp_cp` count under "dp",
or "ep" when EP spans all of DP) and the comm operation; the values are the bytes of the full tensor
each call works on (CommStats.bytes). For a micro batch of b sequences of s tokens, hidden h, model
dtype d bytes, on a rank whose chunks hold L layers:

  TP    without SP: all-reduce of [b, s, h] x 4 per dense layer (2 forward after the row-parallel
        blocks, 2 backward at the column-parallel entries; 2 for a layer whose feed-forward is a mixture
        of experts, which TP does not split, +2 for its shared experts), +1 after the vocabulary-parallel
        embedding, +1 at the head's entry; with SP each becomes an all-gather and a reduce-scatter of
        the same tensor; full recompute repeats the forward ones except a dense feed-forward's exit
        (PyTorch's checkpoint stops at the last saved tensor, the input of down_proj); the
        vocabulary-parallel cross-entropy adds 3 all-reduces of [b, s] fp32 on the last stage.
  PP    per micro batch and chunk: the activation [b, s (/tp with SP), h] received and sent forward, its
        gradient received and sent backward (a send and a receive are both counted; none between two
        chunks of one rank, as at the turn of ZBV's V).
  DP    per gradient bucket (fp32, padding included): an all-reduce, or with ZeRO-1 a reduce-scatter
        and an all-gather of the updated parameters (model dtype); then one all-reduce per group of the
        "sum" reductions (SP norms and row biases over TP, replicated KV heads over their TP block, the
        two tied embedding copies over the embedding group) of the fp32 elements this rank holds.
  EP    per MoE layer forward: the routed rows' all-to-all there and back (expected value for uniform
        routing: (ep-1)/ep of the b*s*k assignments, not exact: it depends on the router) and the
        count exchange (exact); not counted by exactness tests.
  control  the step's loss divisor (int64 over DP), the loss (fp32, broadcast over PP, averaged over DP),
        and the global norm with its overflow flag (2 x fp64 over TP, PP, and EP or with ZeRO-1 DP).
"""

from __future__ import annotations

from collections import defaultdict

from megatron_lite.models.config import ModelConfig
from megatron_lite.parallel.layout import FLATTENED, location, stage_of
from megatron_lite.pipeline.schedules import schedule_mapping
from megatron_lite.planner.params import assign_buckets, group_sizes, rank_chunks, rank_parameters
from megatron_lite.planner.spec import Layout

FP32, INT64, FP64 = 4, 8, 8


def counter_name(layout: Layout, view: str) -> str | None:
    """The name under which comm.py counts the traffic of layout group `view` (None: one rank, no traffic);
    mirrors ParallelLayout.from_mesh: the mesh dims first (edp is called dp without EP), then the
    flattened views, each set of non-trivial dims named by the first group created for it."""
    sizes = {"pp": layout.pp, "edp": layout.dp // layout.ep, "ep": layout.ep, "cp": 1, "tp": layout.tp}
    if view.startswith("tp/"):
        return view
    if view == "embedding":
        return "embedding" if layout.pp > 1 else None
    parts = FLATTENED.get(view, (view,))
    nontrivial = tuple(p for p in parts if sizes[p] > 1)
    if not nontrivial:
        return None
    if len(nontrivial) == 1:
        dim = nontrivial[0]
        return "dp" if dim == "edp" and layout.ep == 1 else dim
    for name, flat in FLATTENED.items():
        if tuple(p for p in flat if sizes[p] > 1) == nontrivial:
            return name
    raise AssertionError(f"no group for {view}")  # every flattened set is listed in FLATTENED


def view_size(layout: Layout, view: str, stage: int) -> int:
    if view.startswith("tp/"):
        return int(view[3:])
    if view == "embedding":
        return 2 if layout.pp > 1 and stage in (0, layout.pp - 1) else 1
    sizes = {"pp": layout.pp, "edp": layout.dp // layout.ep, "ep": layout.ep, "cp": 1, "tp": layout.tp}
    total = 1
    for part in FLATTENED.get(view, (view,)):
        total *= sizes[part]
    return total


class Traffic:
    """Accumulates (group, op) -> bytes under the counters' names; one-rank groups are dropped."""

    def __init__(self, layout: Layout, stage: int):
        self.layout, self.stage = layout, stage
        self.bytes: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.by_view: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0])  # (view, op) -> [bytes, calls]

    def add(self, view: str, op: str, nbytes: float, times: int = 1) -> None:
        name = counter_name(self.layout, view)
        if name is not None and view_size(self.layout, view, self.stage) > 1 and times and nbytes:
            self.bytes[(name, op)] += nbytes * times
            self.calls[(name, op)] += times
            entry = self.by_view[(view, op)]
            entry[0], entry[1] = entry[0] + nbytes * times, entry[1] + times


def activation_bytes(cfg: ModelConfig, layout: Layout, seq_length: int, dtype_bytes: int) -> int:
    """The [b, s, h] tensor TP all-reduces (full sequence)."""
    return layout.micro_batch * seq_length * cfg.hidden_size * dtype_bytes


def training_step_traffic(cfg: ModelConfig, layout: Layout, seq_length: int, global_batch: int, dtype_bytes: int,
                          stage: int = 0, dp_rank: int = 0, bucket_size_mb: float = 25.0,
                          include_expected: bool = True) -> dict[tuple[str, str], float]:
    """Bytes per (group, op) that the rank at pipeline stage `stage`, data-parallel rank `dp_rank` moves
    in one optimizer step. include_expected=False leaves out the router-dependent EP all-to-all."""
    return dict(step_traffic(cfg, layout, seq_length, global_batch, dtype_bytes, stage, dp_rank, bucket_size_mb,
                             include_expected).bytes)


def step_traffic(cfg: ModelConfig, layout: Layout, seq_length: int, global_batch: int, dtype_bytes: int,
                 stage: int = 0, dp_rank: int = 0, bucket_size_mb: float = 25.0,
                 include_expected: bool = True) -> Traffic:
    """training_step_traffic with call counts, and bytes per layout group (`by_view`, for timing)."""
    m = microbatches(layout, global_batch)
    t = Traffic(layout, stage)
    act = activation_bytes(cfg, layout, seq_length, dtype_bytes)
    tokens = layout.micro_batch * seq_length
    sp = layout.sequence_parallel and layout.tp > 1
    recompute = int(layout.recompute == "full")
    forwards = 1 + recompute
    num_chunks = layout.pp * layout.virtual_stages
    moe_layers = 0
    for layers, first, last in rank_chunks(cfg, layout, stage):
        # TP region crossings per micro batch: forward entries and exits, backward entries and exits.
        fwd_in, fwd_out, bwd = last, first, 0  # the head enters, the embedding leaves (per direction)
        for layer in layers:
            dense_ffn = not cfg.is_moe_layer(layer) or cfg.moe.num_shared_experts > 0
            blocks = 2 if dense_ffn else 1  # attention, and the feed-forward when TP splits it
            # Recomputation stops at the last tensor backward needs (the input of the last row-parallel
            # matmul), so a dense feed-forward's exit is not run again.
            fwd_in += blocks * (1 + recompute)
            fwd_out += blocks + (blocks - dense_ffn) * recompute
            bwd += blocks
            moe_layers += cfg.is_moe_layer(layer)
        bwd_in, bwd_out = bwd + last, bwd + first
        if sp:  # entering gathers the sequence (its backward scatters), leaving scatters (backward gathers)
            t.add("tp", "all_gather", act, m * (fwd_in + bwd_out))
            t.add("tp", "reduce_scatter", act, m * (fwd_out + bwd_in))
        else:  # entering is the identity (its backward all-reduces), leaving all-reduces
            t.add("tp", "all_reduce", act, m * (fwd_out + bwd_in))
        if last:
            t.add("tp", "all_reduce", tokens * FP32, 3 * m)
    if moe_layers:
        _moe_traffic(cfg, layout, t, moe_layers, tokens // (layout.tp if sp else 1), dtype_bytes, m, forwards,
                     include_expected)
    p2p = act // (layout.tp if sp else 1)
    mapping = schedule_mapping(layout.schedule)
    for chunk in range(layout.virtual_stages):
        # per direction (forward and backward): one transfer per neighbouring stage on another rank (the
        # turn of ZBV's V hands over within the last rank)
        vstage = stage_of(stage, chunk, layout.pp, mapping)
        transfers = sum(0 <= n < num_chunks and location(n, layout.pp, mapping)[0] != stage
                        for n in (vstage - 1, vstage + 1))
        if layout.pp > 1:
            t.add("pp", "send", p2p, m * transfers)
            t.add("pp", "recv", p2p, m * transfers)
    _gradient_traffic(cfg, layout, t, stage, dp_rank, dtype_bytes, bucket_size_mb)
    t.add("dp", "all_reduce", INT64)  # the step's valid-target count
    t.add("pp", "broadcast", FP32)  # the loss, from the last stage
    t.add("dp", "all_reduce", FP32)  # its DP average
    for view in ("tp", "pp", "dp_cp" if layout.zero1 else "ep"):
        t.add(view, "all_reduce", 2 * FP64)  # global norm and overflow flag
    return t


def microbatches(layout: Layout, global_batch: int) -> int:
    per_replica, rest = divmod(global_batch, layout.dp * layout.micro_batch)
    if rest or not per_replica:
        raise ValueError(f"global batch {global_batch} does not split into micro batches of {layout.micro_batch} "
                         f"over DP={layout.dp}")
    return per_replica


def _moe_traffic(cfg, layout: Layout, t: Traffic, layers: int, tokens: int, dtype_bytes: int, m: int, forwards: int,
                 include_expected: bool) -> None:
    """`layers` MoE layers on this rank, `tokens` routed per micro batch by each of them."""
    moe, ep = cfg.moe, layout.ep
    sp = layout.sequence_parallel and layout.tp > 1
    t.add("ep", "all_to_all_counts", (ep - 1) * (moe.num_experts // ep) * INT64, layers * m * forwards)
    if include_expected:  # dispatch and combine per forward, their gradients' way back per backward
        rows = tokens * moe.top_k * (ep - 1) / ep
        t.add("ep", "all_to_all", rows * cfg.hidden_size * dtype_bytes, layers * m * (2 * forwards + 2))
    losses = moe.aux_loss_coeff > 0 or moe.z_loss_coeff > 0
    if moe.aux_loss_scope == "micro_batch" and losses and sp:  # routing sums completed over the sequence
        t.add("tp", "all_reduce", (moe.num_experts + 1) * FP32, 2 * layers * m * forwards)
    if moe.aux_loss_scope == "global_batch" and losses:  # one sum of every layer's routing over DP (and TP)
        for view in ("dp", "tp") if layout.sequence_parallel else ("dp",):
            t.add(view, "all_reduce", layers * (2 * moe.num_experts + 2) * FP64)
    if moe.bias_update_rate > 0:  # the step's token counts per expert for the balancing bias
        for view in ("dp", "tp") if layout.sequence_parallel else ("dp",):
            t.add(view, "all_reduce", layers * moe.num_experts * INT64)


def _gradient_traffic(cfg, layout: Layout, t: Traffic, stage: int, dp_rank: int, dtype_bytes: int,
                      bucket_size_mb: float) -> None:
    sizes = group_sizes(layout)
    ranks = {"dp_cp": dp_rank, "edp_cp": dp_rank // layout.ep}
    sums: dict[str, dict[str, int]] = defaultdict(dict)  # group -> key -> elements
    for params in rank_parameters(cfg, layout, stage):
        for bucket in assign_buckets(params, layout, bucket_size_mb):
            n = sizes[bucket.group]
            if layout.zero1:
                t.add(bucket.group, "reduce_scatter", bucket.numel * FP32)
                t.add(bucket.group, "all_gather", bucket.numel * dtype_bytes)
                size = bucket.numel // n
                lo = bucket.start + (ranks[bucket.group] * size if n > 1 else 0)
                hi = lo + (size if n > 1 else bucket.numel)
            else:
                t.add(bucket.group, "all_reduce", bucket.numel * FP32)
                lo, hi = bucket.start, bucket.end
            for param, start in bucket.slots:
                held = max(0, min(hi, start + param.numel) - max(lo, start))
                for group in param.partial_sums:
                    key = "tied" if param.tied else param.name
                    if held:
                        sums[group][key] = held
    for group, entries in sums.items():
        t.add(group, "all_reduce", sum(entries.values()) * FP32)
