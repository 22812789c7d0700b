"""Mixture-of-experts routing options against independent references: the global-batch scope of the
balancing and z losses (exact for any TP, PP, DP, EP and number of micro batches), a capacity factor
with token dropping (against a per-token loop), auxiliary-loss-free balancing (a bias bitwise equal in
every layout), and a checkpoint whose expert count differs from the model."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import equivalence
from equivalence import Case, compare, parallel_worker, run_training, serial_reference
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.training.config import compose

TOLERANCE = 1e-5


@functools.lru_cache(maxsize=None)
def cached_serial(model_name, microbatches):
    return serial_reference(model_name, microbatches=microbatches)


def _run(case):
    return run_on_ranks(parallel_worker, case.world, case, timeout_s=240)[0]


# ---- global-batch scope ---------------------------------------------------------------------------------

GLOBAL_CASES = [  # each against one process with the whole global batch as one micro batch
    Case("moe_global", microbatches=4, schedule="gpipe"),                         # 1 vs 4 micro batches
    Case("moe_global", dp=2),                                                     # DP1 vs DP2
    Case("moe_global", dp=2, ep=2, microbatches=2, schedule="gpipe"),             # EP1 vs EP2
    Case("moe_global", tp=2),                                                     # TP1 vs TP2
    Case("moe_global", tp=2, microbatches=2, schedule="gpipe", sequence_parallel=True),
    Case("moe_global", pp=2, microbatches=2, schedule="gpipe"),                   # PP1 vs PP2
]


@pytest.mark.parametrize("case", GLOBAL_CASES, ids=str)
def test_global_batch_scope_is_the_same_for_every_split(case, equivalence_report):
    """Loss, every gradient (the router's carries the auxiliary losses) and the balancing and z values
    equal one process that routes the whole global batch at once."""
    parallel = _run(case) if case.world > 1 else run_training(case, ParallelLayout.serial())
    serial = cached_serial("moe_global", 1)
    errors = compare(parallel, serial)
    equivalence_report.append((str(case), errors))
    assert all(err < TOLERANCE for err in errors.values()), errors
    for got, want in zip(parallel["moe_terms"], serial["moe_terms"]):
        assert got and set(got) <= set(want)
        for layer, terms in got.items():
            assert terms == pytest.approx(want[layer], rel=1e-6), layer


def test_global_and_micro_batch_scopes_differ():
    """Guard: with 4 micro batches the per-micro-batch losses give another router gradient, so the
    comparisons above see which scope ran."""
    micro = cached_serial("moe", 4)
    global_scope = cached_serial("moe_global", 1)
    router = "layers.0.mlp.router.weight"
    assert equivalence.rel_err(micro["grads"][0][router], global_scope["grads"][0][router]) > 1e-4


def test_global_batch_scope_refuses_a_schedule_that_interleaves_forwards_and_backwards():
    with pytest.raises(ValueError, match="aux_loss_scope=global_batch needs every forward of a step before its "
                                         "first backward; schedule '1f1b' with 2 microbatches"):
        run_training(Case("moe_global", microbatches=2), ParallelLayout.serial())
    from megatron_lite.training.setup import check_run_config

    cfg = compose(["model=moe_tiny", "model.moe.aux_loss_scope=global_batch", "trainer.global_batch_size=8",
                   "trainer.micro_batch_size=2"])
    with pytest.raises(ValueError, match="parallel.schedule=1f1b with 4 microbatches interleaves them: use "
                                         "parallel.schedule=gpipe"):
        check_run_config(cfg, cfg.world_size)
    check_run_config(compose(["model=moe_tiny", "model.moe.aux_loss_scope=global_batch", "parallel.schedule=gpipe"]), 1)


# ---- capacity factor and token dropping -----------------------------------------------------------------

def dropping_reference(block, x: torch.Tensor, capacity: int, policy: str) -> tuple[torch.Tensor, int]:
    """Plain torch and Python: route, then let each expert take its `capacity` assignments of highest
    weight (ties: earlier first) or earliest, and sum the kept ones per token."""
    moe = block.cfg.moe
    probs = torch.softmax(x.float() @ block.router.weight.float().t(), dim=-1)
    top, chosen = torch.topk(probs, moe.top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out, dropped = torch.zeros_like(x), 0
    for e in range(moe.num_experts):
        assigned = [(t, j) for t in range(x.shape[0]) for j in range(moe.top_k) if chosen[t, j] == e]
        if policy == "probs":
            assigned.sort(key=lambda tj: (-top[tj].item(), tj[0] * moe.top_k + tj[1]))
        dropped += max(0, len(assigned) - capacity)
        experts = block.experts
        for t, j in assigned[:capacity]:
            hidden = F.silu(x[t] @ experts.gate_proj[e].t()) * (x[t] @ experts.up_proj[e].t())
            out[t] = out[t] + top[t, j] * (hidden @ experts.down_proj[e].t())
    return out, dropped


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_capacity_drops_what_a_per_token_loop_drops(policy, grouped_mm):
    cfg = equivalence.TINY_MODELS["moe_capacity"]
    cfg = cfg.with_(num_layers=1, moe=replace(cfg.moe, drop_policy=policy, grouped_mm=grouped_mm,
                                              capacity_factor=0.75))
    block = build_model(cfg, ParallelLayout.serial(), seed=3).layers["0"].mlp
    x = torch.randn(3, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    capacity = block.capacity(21)
    assert capacity == 8  # ceil(0.75 * 21 * 2 / 4)
    x1, x2 = x.clone().requires_grad_(), x.reshape(21, -1).clone().requires_grad_()
    got = block(x1).reshape(21, -1)
    want, dropped = dropping_reference(block, x2, capacity, policy)
    assert dropped > 0 and block.load.dropped == dropped
    assert equivalence.rel_err(got, want) < 1e-6
    got_grads = torch.autograd.grad(got.square().sum(), [x1, block.router.weight, block.experts.up_proj])
    want_grads = torch.autograd.grad(want.square().sum(), [x2, block.router.weight, block.experts.up_proj])
    for g, w in zip(got_grads, want_grads):
        assert equivalence.rel_err(g.reshape(w.shape), w) < 1e-6


CAPACITY_CASES = [  # drops depend on the tokens routed at once: one rank's micro batch, as in the reference
    Case("moe_capacity", dp=2, ep=2, microbatches=2),
    Case("moe_capacity", tp=2, dp=2, ep=2, microbatches=1),
]


@pytest.mark.parametrize("case", CAPACITY_CASES, ids=str)
def test_expert_parallel_layouts_drop_what_one_process_drops(case, equivalence_report):
    parallel = _run(case)
    serial = cached_serial("moe_capacity", case.dp * case.microbatches)
    errors = compare(parallel, serial)
    # The logits compared are one forward of each rank's whole batch, whose capacity differs from the
    # reference's (one forward of the global batch): they are not a same-tokens comparison here.
    errors.pop("logits")
    equivalence_report.append((str(case), errors))
    assert all(err < TOLERANCE for err in errors.values()), errors
    assert parallel["moe_dropped"] > 0


# ---- auxiliary-loss-free balancing ------------------------------------------------------------------------

def test_the_bias_steers_the_choice_but_not_the_weights():
    cfg = equivalence.TINY_MODELS["moe_bias"].with_(num_layers=1)
    router = build_model(cfg, ParallelLayout.serial(), seed=3).layers["0"].mlp.router
    x = torch.randn(10, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    weights, experts, _, _ = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    assert (experts == 0).any(dim=-1).all()  # the bias made expert 0 everyone's choice
    picked = probs.gather(-1, experts)
    assert torch.allclose(weights, picked / picked.sum(-1, keepdim=True), rtol=1e-6)
    router.update_bias(torch.tensor([5, 1, 1, 1]))  # mean 2: the busy expert down, the others up
    assert router.expert_bias.tolist() == pytest.approx([10.0 - 0.01, 0.01, 0.01, 0.01], abs=1e-6)
    assert build_model(cfg, ParallelLayout.serial(), seed=3, options=replace(
        equivalence.Case("moe_bias").options, dtype=torch.bfloat16)).layers["0"].mlp.router.expert_bias.dtype \
        == torch.float32


BIAS_CASES = [
    Case("moe_bias", dp=2, ep=2, microbatches=2),
    Case("moe_bias", tp=2, dp=2, ep=2, microbatches=1, sequence_parallel=True),
    Case("moe_bias", pp=2, dp=2, ep=2, microbatches=2),
]


@pytest.mark.parametrize("case", BIAS_CASES, ids=str)
def test_balancing_biases_are_bitwise_equal_in_every_layout(case, equivalence_report):
    parallel = _run(case)
    serial = cached_serial("moe_bias", case.dp * case.microbatches)
    errors = compare(parallel, serial)
    equivalence_report.append((str(case), errors))
    assert all(err < TOLERANCE for err in errors.values()), errors
    biases = [n for n in serial["weights"] if n.endswith("expert_bias")]
    assert len(biases) == 2
    for name in biases:
        assert torch.equal(parallel["weights"][name], serial["weights"][name]), name
        assert serial["weights"][name].abs().sum() > 0  # it moved


# ---- checkpoints -------------------------------------------------------------------------------------------

def expert_count_worker(rank, world, root):
    from megatron_lite.checkpoint.checkpoint import load_checkpoint, save_checkpoint

    layout = ParallelLayout.serial()
    cfg = equivalence.TINY_MODELS["moe_bias"]
    save_checkpoint(root, 1, [build_model(cfg, layout, seed=1)], None, layout, {"step": 1})
    more = cfg.with_(moe=replace(cfg.moe, num_experts=8))
    try:
        load_checkpoint(root, [build_model(more, layout, seed=1)], None, layout)
    except Exception as err:  # noqa: BLE001 - the message is what is checked
        return f"{type(err).__name__}: {err}"
    return None


def test_a_checkpoint_with_another_expert_count_is_refused(tmp_path):
    message = run_on_ranks(expert_count_worker, 1, str(tmp_path / "ckpt"), timeout_s=60)[0]
    assert message is not None and "model.moe.num_experts: 4 in the checkpoint, 8 in this model" in message, message
