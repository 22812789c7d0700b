"""Zero-bubble schedules (ZB-H1, ZB-H2, ZBV) train the same model as one process (fp32, 1e-5, three steps):
PP2, PP4, PP2xDP2, PP2xTP2; fewer microbatches than stages, as many, and a count that is no multiple;
recomputation on and off; ZeRO-1; NCCL's in-order semantics emulated on gloo."""

import pytest

from equivalence import Case
from megatron_lite.models.partition import split_layers
from test_equivalence import check_case

CASES = (
    [Case("gpt2_deep", pp=p, microbatches=m, schedule="zb_h1") for p, m in ((2, 1), (2, 3), (4, 4), (4, 6))]
    + [Case("gpt2_deep", pp=p, microbatches=m, schedule="zb_h2") for p, m in ((2, 1), (2, 4), (4, 3), (4, 8))]
    + [Case("gpt2_deep", pp=p, microbatches=m, schedule="zbv", virtual_stages=2)
       for p, m in ((2, 1), (2, 2), (2, 3), (4, 3), (4, 6))]
    + [
        Case("llama_deep", pp=2, dp=2, microbatches=3, schedule="zb_h1", zero1=True),
        Case("llama_deep", pp=2, dp=2, microbatches=2, schedule="zbv", virtual_stages=2, zero1=True),
        Case("llama_deep", tp=2, pp=2, microbatches=3, schedule="zb_h1", sequence_parallel=True, recompute="full"),
        Case("gpt2_deep", tp=2, pp=2, microbatches=2, schedule="zbv", virtual_stages=2, recompute="selective"),
        Case("gpt2_deep", pp=2, microbatches=4, schedule="zb_h1", recompute="full", grad_clip=0.05),
        Case("gpt2_deep", pp=4, microbatches=3, schedule="zb_h1", transport="nccl"),
        Case("llama_deep", pp=2, microbatches=4, schedule="zbv", virtual_stages=2, transport="nccl"),
    ]
)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_zero_bubble_matches_serial(case, equivalence_report):
    check_case(case, equivalence_report)


def test_zbv_needs_layers_divisible_into_its_chunks():
    with pytest.raises(ValueError, match=r"num_layers=6 cannot be split into pp\*virtual_stages=4\*2=8"):
        split_layers(6, 4, 2)


def _timeline_worker(rank, world, schedule, v):
    from equivalence import SEED, TINY_MODELS, Case, global_batches, make_optimizer
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.pipeline.schedules import build_schedule, schedule_mapping
    from megatron_lite.training.step import run_schedule

    layout = ParallelLayout.from_mesh(ParallelSizes(pp=2, dp=2))
    case = Case("gpt2_deep", pp=2, dp=2, microbatches=4, schedule=schedule, virtual_stages=v)
    chunks = build_model_chunks(TINY_MODELS["gpt2_deep"], layout, SEED, v, mapping=schedule_mapping(schedule))
    optimizer = make_optimizer(case, chunks, layout)
    plan = build_schedule(schedule, 2, 4, v)
    tokens, targets = next(global_batches(101, steps=1))
    tokens, targets = tokens.chunk(2)[layout.dp.rank], targets.chunk(2)[layout.dp.rank]
    timeline: list = []
    optimizer.zero_grad()
    run_schedule(chunks, plan, tokens, targets, layout, loss_scale=optimizer.loss_scale,
                 before_last_backward=optimizer.before_last_backward, timeline=timeline)
    started_during_backward = len(optimizer.grad_sync.launch_order)  # before step() starts the rest
    buckets = sum(len(b.buckets) for b in optimizer.buffers)
    optimizer.step()
    return timeline, started_during_backward, buckets


@pytest.mark.parametrize("schedule, v", [("zb_h1", 1), ("zbv", 2)])
def test_measured_timeline_and_dp_sync_overlapped_with_w(schedule, v):
    """The executor records each compute's busy span (after its data arrived); every DP bucket's reduction
    starts during the step's last W's, none waits for the optimizer step."""
    from megatron_lite.parallel.spawn import run_on_ranks
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.pipeline.simulate import measured

    results = run_on_ranks(_timeline_worker, 4, schedule, v)
    plan = build_schedule(schedule, 2, 4, v)
    for timeline, started, buckets in results:
        assert started == buckets > 1
        assert sorted(k for k, *_ in timeline) == sorted(["F", "I", "W"] * 4 * v)
        assert all(a[4] <= b[3] for a, b in zip(timeline, timeline[1:]))  # one compute at a time
    result = measured(plan, [results[0][0], results[2][0]])  # pipeline ranks 0 and 1 of DP replica 0
    assert 0 <= result.inner_bubble_fraction <= result.bubble_fraction < 1


def _precision_worker(rank, world, dtype_name, model="gpt2_deep"):
    import torch

    from equivalence import SEED, TINY_MODELS, global_batches
    from megatron_lite.models.config import BuildOptions
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.optim import OptimizerConfig, build_optimizer
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.training.step import train_step

    dtype = getattr(torch, dtype_name)
    layout = ParallelLayout.from_mesh(ParallelSizes(pp=2))
    cfg = TINY_MODELS[model]
    out = {}
    for schedule in ("1f1b", "zb_h1"):
        chunks = build_model_chunks(cfg, layout, SEED, options=BuildOptions(dtype=dtype))
        optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-2, grad_clip=1.0, bucket_size_mb=0.01,
                                                                    initial_loss_scale=2.0**12))
        plan = build_schedule(schedule, 2, 4)
        losses = [train_step(chunks, optimizer, t, y, layout, plan)[0] for t, y in global_batches(cfg.vocab_size)]
        out[schedule] = losses, torch.cat([b.param_data.clone() for b in optimizer.buffers])
    return out


@pytest.mark.parametrize("dtype, model", [("float32", "gpt2_deep"), ("bfloat16", "gpt2_deep"), ("float16", "gpt2_deep"),
                                          ("float32", "moe")])
def test_zb_h1_equals_1f1b_bitwise_in_every_precision(dtype, model):
    """Split backwards compute every gradient with the same operations as the fused ones and accumulate
    them microbatch by microbatch in the same order: with fp32, bf16 (fp32 master weights) and fp16 (loss
    scaling), clipping on, and for a mixture of experts (expert gradients held from I to W, balancing
    and z losses), ZB-H1 trains exactly what 1F1B trains on the same layout."""
    import torch

    from megatron_lite.parallel.spawn import run_on_ranks

    for out in run_on_ranks(_precision_worker, 2, dtype, model):
        (losses, params), (zb_losses, zb_params) = out["1f1b"], out["zb_h1"]
        assert losses == zb_losses and torch.equal(params, zb_params)


def test_benchmark_reports_measured_and_predicted_bubble(tmp_path):
    """benchmarks/pipeline_zero_bubble.py end to end on the smallest setting: our ZBV next to torch's
    ScheduleZBVZeroBubble, one timed step, the measured bubble next to the simulator's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "zb.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "pipeline_zero_bubble.py"), "--pp", "2", "--steps", "1",
                    "--warmup", "0", "--rounds", "1", "--systems", "ours-zbv", "torch-zbv", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"ours-zbv", "torch-zbv"} and not result["failures"]
    bubble = rows["ours-zbv"]["bubble"]
    assert 0 <= bubble["measured_inner"] <= bubble["measured"] < 1 and 0 <= bubble["replayed"] < 1
    assert [(q["ours"], q["peer"]) for q in result["ratios"]] == [("ours-zbv", "torch-zbv")]


@pytest.mark.parametrize("schedule, v", [("zb_h1", 1), ("zbv", 2)])
def test_single_stage_matches_serial(schedule, v, equivalence_report):
    """pp=1: every handover is local (ZBV's two chunks both on the one rank, the embedding shared)."""
    from equivalence import compare, run_training, serial_reference
    from megatron_lite.parallel.layout import ParallelLayout

    case = Case("gpt2_deep", microbatches=3, schedule=schedule, virtual_stages=v)
    errors = compare(run_training(case, ParallelLayout.serial()), serial_reference("gpt2_deep"))
    equivalence_report.append((str(case), errors))
    assert all(err < 1e-5 for err in errors.values()), errors
