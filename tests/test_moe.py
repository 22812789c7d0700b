"""Mixture of experts: the block against a dense one-hot reference, and every EP layout against one
process (loss, every gradient incl. router and experts, weights; the balancing and z losses are part
of the objective), hard routing cases, the all-to-all's bytes, bad configurations."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import equivalence
from equivalence import Case, compare, parallel_worker, serial_reference
from megatron_lite.models.config import MoEConfig, check_model_fits_layout, llama_config
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.models.transformer import build_model, parameter_counts
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.training.config import compose
from megatron_lite.training.step import train_step

TOLERANCE = 1e-5


def dense_reference(block, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a one-hot of the router's choice: plain torch."""
    moe = block.cfg.moe
    logits = x.float() @ block.router.weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    if moe.router_order == "softmax_topk":
        top, chosen = torch.topk(probs, moe.top_k, dim=-1)
    else:
        top_logits, chosen = torch.topk(logits, moe.top_k, dim=-1)
        top = torch.softmax(top_logits, dim=-1)
    if moe.normalize_topk:
        top = top / top.sum(-1, keepdim=True)
    gate = (F.one_hot(chosen, moe.num_experts).float() * top.unsqueeze(-1)).sum(1)  # [T, E]
    experts = block.experts
    out = torch.zeros_like(x)
    for e in range(moe.num_experts):
        hidden = F.silu(x @ experts.gate_proj[e].t()) * (x @ experts.up_proj[e].t())
        out = out + gate[:, e:e + 1] * (hidden @ experts.down_proj[e].t())
    return out


@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("order,normalize,k", [("softmax_topk", True, 2), ("topk_softmax", False, 2),
                                               ("softmax_topk", False, 1)])
def test_block_matches_a_dense_one_hot_reference(grouped_mm, order, normalize, k):
    cfg = llama_config(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=64,
                       moe=dict(num_experts=8, top_k=k, expert_ffn_hidden_size=16, router_order=order,
                                normalize_topk=normalize, grouped_mm=grouped_mm))
    block = build_model(cfg, ParallelLayout.serial(), seed=3).layers["0"].mlp
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ours = block(x)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, [x, block.router.weight, *block.experts.parameters()], grad)
    want = torch.autograd.grad(dense_reference(block, x), [x, block.router.weight, *block.experts.parameters()], grad)
    assert (ours - dense_reference(block, x)).abs().max() < 1e-6
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-6


def test_grouped_mm_and_loop_paths_agree_including_empty_experts():
    from megatron_lite.layers.moe import grouped_linear

    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)
    counts = [3, 0, 7, 0]
    a = grouped_linear(x, w, counts, grouped_mm=True)
    b = grouped_linear(x, w, counts, grouped_mm=False)
    assert (a - b).abs().max() < 1e-6
    ga, gb = torch.autograd.grad(a.sum(), [x, w]), torch.autograd.grad(b.sum(), [x, w])
    assert all((p - q).abs().max() < 1e-6 for p, q in zip(ga, gb))


@functools.lru_cache(maxsize=None)
def cached_serial(model_name, microbatches):
    return serial_reference(model_name, microbatches=microbatches)


MOE_CASES = [
    Case("moe", dp=2, ep=2, microbatches=2),                              # EP2 (E=4, top-2)
    Case("moe", dp=4, ep=2, microbatches=1),                              # DP2 x EP2, one microbatch per rank
    Case("moe", tp=2, dp=2, ep=2, microbatches=1),                        # TP2 x EP2
    Case("moe", tp=2, dp=2, ep=2, microbatches=2, sequence_parallel=True),
    Case("moe", pp=2, dp=2, ep=2, microbatches=2),                        # PP2 x EP2
    Case("moe", tp=2, pp=2, dp=2, ep=2, microbatches=2),                  # 8 ranks
    Case("moe_e8", dp=2, ep=2, microbatches=1),                           # E=8, top-1, shared expert
    Case("moe_e8", pp=2, dp=2, ep=2, microbatches=2, zero1=True, schedule="gpipe"),
    Case("moe", dp=2, ep=2, microbatches=2, recompute="full", zero1=True),
    Case("moe", dp=2, ep=1, microbatches=2),                              # EP1 with DP2: the baseline
    Case("moe", dp=2, ep=2, microbatches=2, virtual_stages=2, schedule="interleaved_1f1b"),  # a layer per chunk
]


@pytest.mark.parametrize("case", MOE_CASES, ids=str)
def test_expert_parallel_layouts_train_what_one_process_trains(case, equivalence_report):
    parallel = run_on_ranks(parallel_worker, case.world, case, timeout_s=240)[0]
    errors = compare(parallel, cached_serial(case.model, case.dp * case.microbatches))
    equivalence_report.append((str(case), errors))
    assert all(err < TOLERANCE for err in errors.values()), errors


def test_the_balancing_loss_is_part_of_what_is_compared():
    """Guard: without the auxiliary losses the serial run differs, so the comparisons above see them."""
    with_aux = cached_serial("moe", 2)
    original = equivalence.TINY_MODELS["moe"]
    equivalence.TINY_MODELS["moe"] = original.with_(moe=MoEConfig(**{**original.moe.__dict__, "aux_loss_coeff": 0.0,
                                                                      "z_loss_coeff": 0.0}))
    try:
        without = serial_reference("moe", microbatches=2)
    finally:
        equivalence.TINY_MODELS["moe"] = original
    router = "layers.0.mlp.router.weight"
    assert equivalence.rel_err(with_aux["grads"][0][router], without["grads"][0][router]) > 1e-3


# ---- hard routing cases -----------------------------------------------------------------------------

HARD = llama_config(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=16,
                    moe=dict(num_experts=4, top_k=2, expert_ffn_hidden_size=16, aux_loss_coeff=0.01))


def hard_case_step(layout, collapse: bool, trace: bool = False):
    """One training step on a 6 x 7 batch (42 tokens: divisible by no expert or rank count). collapse:
    router weights zero, so every token picks the same two experts, which live on one EP rank: the other
    EP rank and the other two experts receive nothing."""
    from equivalence import _full, reduced_grads

    chunks = build_model_chunks(HARD, layout, seed=5)
    if collapse:
        with torch.no_grad():
            for name, p in chunks[0].named_parameters():
                if "router" in name:
                    p.zero_()
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-3, eps=1e-5))
    batch = torch.randint(0, HARD.vocab_size, (6, 8), generator=torch.Generator().manual_seed(1))
    local = batch.chunk(layout.dp.size)[layout.dp.rank]
    if trace:
        layout.stats.trace = []
    # micro batches of 3 sequences in every layout (the balancing loss is defined per micro batch)
    plan = build_schedule("1f1b", 1, 2 // layout.dp.size)
    loss, _ = train_step(chunks, optimizer, local[:, :-1], local[:, 1:], layout, plan)
    sequence = list(layout.stats.trace or [])
    layout.stats.trace = None
    return {"loss": loss, "grads": _full(chunks, layout, reduced_grads(optimizer)), "trace": sequence,
            "tokens": [b.load.take()[0].tolist() for b in chunks[0].moe_blocks().values()]}


def hard_worker(rank, world, collapse):
    return hard_case_step(ParallelLayout.from_mesh(ParallelSizes(dp=2, ep=2)), collapse, trace=True)


@pytest.mark.parametrize("collapse", [True, False], ids=["all-to-experts-0-1", "ragged"])
def test_hard_routing_cases_match_serial_without_hanging(collapse):
    serial = hard_case_step(ParallelLayout.serial(), collapse)
    results = run_on_ranks(hard_worker, 2, collapse, timeout_s=120)
    if collapse:  # equal scores: top-k picks the same two experts for every token
        for tokens in results[0]["tokens"] + results[1]["tokens"]:
            used = [e for e, n in enumerate(tokens) if n]
            assert len(used) == 2 and used[0] // 2 == used[1] // 2, tokens  # both on one EP rank
    assert results[0]["loss"] == pytest.approx(serial["loss"], rel=1e-6)
    for name, grad in results[0]["grads"].items():
        assert equivalence.rel_err(grad, serial["grads"][name]) < 1e-5, name
    assert results[0]["trace"] == results[1]["trace"] and results[0]["trace"]  # one collective sequence


# ---- all-to-all bytes ----------------------------------------------------------------------------------

def bytes_worker(rank, world):
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=2, ep=2))
    cfg = HARD.with_(num_layers=1)
    model = build_model(cfg, layout, seed=5)
    block = model.layers["0"].mlp
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    layout.stats.reset()
    block(x).sum().backward()
    with torch.no_grad():  # which of this rank's token-expert pairs go to the other EP rank's experts
        logits = x.reshape(-1, 32) @ block.router.weight.t()
        chosen = torch.topk(torch.softmax(logits, -1), 2, dim=-1).indices
        owner = chosen // 2  # experts 0, 1 on EP rank 0; 2, 3 on rank 1
    return {"sent": int((owner != layout.group("ep").rank).sum()), "report": layout.stats.report()}


def test_all_to_all_bytes_equal_the_tokens_sent():
    """Forward: dispatch sends the rows for the other rank's experts, combine returns the rows received;
    backward the same two in reverse: 2 x (sent + received) x hidden x 4 bytes per rank."""
    results = run_on_ranks(bytes_worker, 2, timeout_s=60)
    for rank, r in enumerate(results):
        received = results[1 - rank]["sent"]
        assert r["report"]["ep/all_to_all"] == 2 * (r["sent"] + received) * 32 * 4, r
        assert r["report"]["ep/all_to_all_counts"] == 2 * 8  # one int64 per peer, forward only
        assert r["sent"] > 0


# ---- configuration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["parallel.dp=3", "parallel.ep=2"], "parallel.ep=2 must divide parallel.dp=3"),
    (["parallel.dp=6", "parallel.ep=3", "trainer.global_batch_size=24"], "model.moe.num_experts=8 is not divisible by parallel.ep=3"),
    (["model.moe.top_k=9"], "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    (["model.moe.top_k=0"], "model.moe.top_k=0 must be between 1"),
    (["model.moe.layers=[0,7]"], r"model.moe.layers=\[0, 7\] names layer\(s\) \[7\] outside the model's 4 layers"),
    (["model.moe.router_order=random"], "model.moe.router_order='random' is not one of"),
    (["model.moe.capacity_factor=0"], r"model.moe.capacity_factor=0(.0)? must be > 0 \(e.g. 1.25\), or null"),
    (["model.moe.capacity_factor=-1.5"], "model.moe.capacity_factor=-1.5 must be > 0"),
    (["model.moe.drop_policy=random"], "model.moe.drop_policy='random' is not one of"),
    (["model.moe.bias_update_rate=-0.1"], "model.moe.bias_update_rate=-0.1 must be >= 0"),
    (["model.moe.aux_loss_scope=sequence"], "model.moe.aux_loss_scope='sequence' is not one of"),
    (["optim.backend=deepspeed", "parallel.dp=2", "parallel.ep=2"], "optim.backend=deepspeed trains MoE models with "
                                                                      "parallel.ep=1"),
])
def test_bad_moe_configs_are_named_before_any_process_starts(overrides, message):
    from megatron_lite.training.setup import check_run_config

    with pytest.raises(ValueError, match=message):
        cfg = compose(["model=moe_tiny", *overrides])
        check_run_config(cfg, cfg.world_size)


def test_ep_needs_an_moe_model():
    with pytest.raises(ValueError, match="parallel.ep=2 needs a mixture-of-experts model"):
        check_model_fits_layout(llama_config(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2),
                                ParallelSizes(dp=2, ep=2))


@pytest.mark.parametrize("preset,total,active", [("mixtral_8x7b", 46.7, 12.9), ("olmoe_1b_7b", 6.92, 1.28),
                                                 ("qwen_moe_a2_7b", 14.3, 2.7)])
def test_presets_have_the_published_parameter_counts(preset, total, active):
    cfg = compose([f"model={preset}"]).model_config().with_(vocab_pad_multiple=1)
    counted_total, counted_active = parameter_counts(cfg)  # published figures have 3 significant digits
    assert counted_total / 1e9 == pytest.approx(total, rel=5e-3)
    assert counted_active / 1e9 == pytest.approx(active, rel=5e-3)


# ---- checkpoints move between EP sizes -----------------------------------------------------------------

def checkpoint_worker(rank, world, sizes: ParallelSizes, root: str, load: bool, steps: tuple[int, int]):
    """Train steps [first, last) of the global batches on `sizes` (from the checkpoint under root if
    `load`, saving one at the end otherwise); micro batches of 6 sequences in every layout."""
    from megatron_lite.checkpoint.checkpoint import load_checkpoint, save_checkpoint

    layout = ParallelLayout.from_mesh(sizes) if world > 1 else ParallelLayout.serial()
    cfg = equivalence.TINY_MODELS["moe"]
    chunks = build_model_chunks(cfg, layout, equivalence.SEED)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-3, eps=1e-5))
    if load:
        load_checkpoint(root, chunks, optimizer, layout)
    plan = build_schedule("1f1b", sizes.pp, 4 // sizes.dp)
    losses = []
    for step, (tokens, targets) in enumerate(equivalence.global_batches(cfg.vocab_size, steps=steps[1])):
        if step < steps[0]:
            continue
        dp = layout.dp
        loss, _ = train_step(chunks, optimizer, tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank],
                             layout, plan)
        losses.append(loss)
    if not load:
        save_checkpoint(root, steps[1], chunks, optimizer, layout, {"step": steps[1]})
    return losses


@pytest.mark.parametrize("target", [pytest.param(ParallelSizes(), marks=pytest.mark.matrix), ParallelSizes(dp=4, ep=4),
                                    pytest.param(ParallelSizes(tp=2), marks=pytest.mark.matrix),
                                    ParallelSizes(dp=2, ep=2)], ids=["ep1", "ep4", "tp2-ep1", "ep2"])
def test_a_checkpoint_saved_at_ep2_continues_under_other_expert_layouts(tmp_path, target):
    root = str(tmp_path / "ckpt")
    saved = ParallelSizes(dp=2, ep=2)
    run_on_ranks(checkpoint_worker, saved.world_size, saved, root, False, (0, 1), timeout_s=120)
    reference = run_on_ranks(checkpoint_worker, saved.world_size, saved, str(tmp_path / "unused"), False, (0, 3),
                             timeout_s=120)[0][1:]
    resumed = run_on_ranks(checkpoint_worker, target.world_size, target, root, True, (1, 3), timeout_s=120)[0]
    assert resumed == pytest.approx(reference, rel=1e-6)
