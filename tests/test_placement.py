"""The placement alone drives gradient sync, ZeRO-1 and the global norm: a toy model with an "expert"
weight cut over ep=2 (carved from dp=4, averaged over the expert-DP group) and a dense weight (averaged
over all of DP), trained with the framework's optimizer, equals one process step for step."""

from __future__ import annotations

import pytest
import torch

from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.sharding import (EXPERT_DATA_PARALLEL, Reduction, Shard, ShardSpec, gather_full,
                                             initialize_parameters, make_param, spec_of)
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.parallel.stage import ModelStage
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.training.step import train_step

HIDDEN, EXPERTS, BATCH, STEPS, SEED = 8, 4, 16, 3, 7


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ToyExpertStage(torch.nn.Module):
    """scores = tanh(x W_d) W_e^T with W_e's rows (one per expert) cut over ep; every rank uses all experts
    (all-gathered over ep; the backward reduce-scatter sums the EP group's gradients, scaled by 1/ep so
    that with the edp average they are the mean over all data-parallel ranks). Auxiliary loss on h."""

    dtype = torch.float32

    def __init__(self, layout: ParallelLayout):
        super().__init__()
        self.ep = layout.group("ep")
        self.dense = make_param(ShardSpec((HIDDEN, HIDDEN), std=0.5))
        cut = Shard(0, "ep", self.ep.size, self.ep.rank, self.ep.size)
        self.expert = make_param(ShardSpec((EXPERTS, HIDDEN), shards=(cut,), std=0.5,
                                           reductions=(Reduction(EXPERT_DATA_PARALLEL, "avg"),)))
        self._auxiliary = None

    def forward(self, x):
        h = torch.tanh(x @ self.dense)
        self._auxiliary = 0.1 * h.square().mean()
        experts = comm.gather_from_sequence(_ScaleGrad.apply(self.expert, 1.0 / self.ep.size), self.ep, dim=0)
        return h @ experts.t()

    def loss(self, output, targets):
        return torch.logsumexp(output, dim=-1) - output.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def auxiliary_loss(self):
        return self._auxiliary

    def activation_shape(self, micro_batch, seq_length):
        return (micro_batch, HIDDEN)

    def rng_streams(self):
        return {}


def _train(layout: ParallelLayout, zero1: bool) -> dict:
    stage = ToyExpertStage(layout)
    assert isinstance(stage, ModelStage)
    initialize_parameters(stage, SEED)
    optimizer = build_optimizer([stage], layout, OptimizerConfig(lr=1e-2, eps=1e-5, grad_clip=0.05, zero1=zero1,
                                                                 bucket_size_mb=0.001))
    generator = torch.Generator().manual_seed(3)
    dp = layout.dp
    record = {"loss": [], "grad_norm": [], "buckets": sorted({(b.group, b.numel) for b in optimizer.buffers[0].buckets})}
    for _ in range(STEPS):
        x = torch.randn(BATCH, HIDDEN, generator=generator)
        y = torch.randint(0, EXPERTS, (BATCH,), generator=generator)
        loss, stats = train_step([stage], optimizer, x.chunk(dp.size)[dp.rank], y.chunk(dp.size)[dp.rank], layout,
                                 build_schedule("1f1b", 1, 2))
        record["loss"].append(loss)
        record["grad_norm"].append(stats["grad_norm"])
    record["weights"] = {name: gather_full(p.data, spec_of(p), layout) for name, p in stage.named_parameters()}
    return record


def _worker(rank, world, zero1):
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=4, ep=2))
    record = _train(layout, zero1)
    record["groups"] = {name: layout.group(name).ranks for name in ("dp", "ep", "edp", "dp_cp", "edp_cp")}
    return record


@pytest.mark.parametrize("zero1", [False, True], ids=["allreduce", "zero1"])
def test_expert_placement_over_ep_carved_from_dp_matches_serial(zero1):
    serial = _train(ParallelLayout.serial(), zero1)
    records = run_on_ranks(_worker, 4, zero1)
    # ep groups are DP neighbours, edp the DP ranks holding the same experts.
    assert records[0]["groups"] == {"dp": (0, 1, 2, 3), "ep": (0, 1), "edp": (0, 2), "dp_cp": (0, 1, 2, 3),
                                    "edp_cp": (0, 2)}
    assert records[3]["groups"]["ep"] == (2, 3) and records[3]["groups"]["edp"] == (1, 3)
    # One bucket per data-parallel group, each padded to a multiple of that group's size.
    groups = {group: numel for group, numel in records[0]["buckets"]}
    assert set(groups) == {"dp_cp", "edp_cp"} and groups["dp_cp"] % 4 == 0 and groups["edp_cp"] % 2 == 0
    assert all(n > 0.05 for n in serial["grad_norm"])  # clipping is active: the norm decides every update
    for record in records:
        for key in ("loss", "grad_norm"):
            for ours, reference in zip(record[key], serial[key]):
                assert abs(ours - reference) <= 1e-5 * abs(reference), (key, record[key], serial[key])
        for name, reference in serial["weights"].items():
            error = ((record["weights"][name] - reference).norm() / reference.norm()).item()
            assert error < 1e-5, (name, error)


def _partial_sum_traffic(rank, world):
    from equivalence import SEED as MODEL_SEED, TINY_MODELS, global_batches
    from megatron_lite.models.partition import build_model_chunks

    layout = ParallelLayout.from_mesh(ParallelSizes(tp=world))
    chunks = build_model_chunks(TINY_MODELS["llama"], layout, MODEL_SEED)  # 2 KV heads over TP=4
    optimizer = build_optimizer(chunks, layout, OptimizerConfig())
    tokens, targets = next(global_batches(TINY_MODELS["llama"].vocab_size, steps=1))
    train_step(chunks, optimizer, tokens, targets, layout, build_schedule("1f1b", 1, 2))
    kv = sum(p.numel() * 4 for name, p in chunks[0].named_parameters() if name.endswith(("k_proj.weight", "v_proj.weight")))
    return dict(layout.stats.bytes), kv, layout.group("tp/2").ranks


def test_partial_tp_sum_of_replicated_kv_heads_moves_one_chunk():
    """TP=4 with 2 KV heads: each KV chunk is held by a block of 2 TP ranks, and its partial gradients are
    summed over that block only: the all-reduce carries exactly this rank's chunk of the k/v weights
    (before: a zero-padded slot per chunk over all of TP, num_chunks = 2 times as much)."""
    for rank, (traffic, kv_bytes, block) in enumerate(run_on_ranks(_partial_sum_traffic, 4)):
        assert block == ((0, 1) if rank < 2 else (2, 3))
        assert traffic[("tp/2", "all_reduce")] == kv_bytes
