"""The planner answers the framework's standard questions (seed texts in /work/shared/seeds, numbers
recomputed here, not copied), takes its bubble from the simulator, and rejects bad input clearly."""

import json
import subprocess
import sys
import time
from pathlib import Path

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from equivalence import TINY_MODELS
from megatron_lite.layers.weight_grad import WeightGradStore, backward_input, backward_weight, deferring_to
from megatron_lite.models.config import BuildOptions
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.pipeline.simulate import analytic_bubble_fraction, simulate
from megatron_lite.planner.activations import schedule_peaks
from megatron_lite.planner.cli import main
from megatron_lite.planner.cost import collective_time, link_of, replicated_time
from megatron_lite.planner.inference_time import decode_traffic, estimate_inference
from megatron_lite.planner.params import model_parameters, stage_memory
from megatron_lite.planner.search import search, structural_reason
from megatron_lite.models.transformer import parameter_counts
from megatron_lite.planner.spec import (GIB, Layout, Link, Workload, _read_preset, cluster_from_dict, load_cluster,
                                        load_model, load_workload,
                                        preset_names)
from megatron_lite.planner.training_time import estimate_training, exposed_reduction, stage_flops

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_70B = load_model("llama2_70b")


def test_presets_load_and_count_parameters():
    assert model_parameters(LLAMA2_70B) == pytest.approx(68.98e9, rel=1e-3)  # the "70B" / "140 GB" model
    assert model_parameters(load_model("llama3_405b")) == pytest.approx(405.9e9, rel=1e-3)
    assert model_parameters(load_model("mtnlg_530b")) == pytest.approx(529.6e9, rel=1e-3)
    assert load_cluster("h100_ib_8x8").num_gpus == 64


@pytest.mark.parametrize("cluster", ["a100_nvlink_4", "a100_pcie_4"])
def test_70b_fp16_on_four_a100s(cluster):
    """Which layout: TP4 on both (decode reads every weight once per token: TP4 reads a quarter per GPU
    in parallel, PP4 all of them one stage after another); memory: ~32 GiB of weights per GPU."""
    plan = search(LLAMA2_70B, load_cluster(cluster), load_workload("inference"))
    best = plan.best
    assert best.layout == Layout(tp=4)
    weights = best.stages[0].memory["parameters"]
    assert weights == stage_memory(LLAMA2_70B, Layout(tp=4), 0, 2, training=False).parameter_bytes
    assert 34.4e9 < weights < 34.6e9 and best.memory_per_gpu < 33 * GIB
    assert any("TP1 PP1 DP1" == r.layout.describe() and "parameters" in r.reason for r in plan.rejected)


def test_70b_decode_all_reduce_traffic_per_token():
    """TP4: 2 all-reduces per layer + 1 after the embedding, of [b, 1, 8192] fp16 per output token."""
    for batch in (1, 8):
        traffic = decode_traffic(LLAMA2_70B, Layout(tp=4), batch, 2, 0)
        assert traffic[("tp", "all_reduce")] == (2 * 80 + 1) * batch * 8192 * 2  # 2.64 MB at batch 1
        assert traffic[("tp", "all_gather")] == batch * 32256 * 4  # the padded logits row, fp32, for sampling


def test_latency_term_dominates_tp_over_pcie_at_batch_1():
    """Bandwidth alone: 161 all-reduces of 16 KiB cost ~0.16 ms per token over PCIe (the seed's 0.06 ms at
    64 GB/s); with 15 us per ring step (6 steps at TP4) they cost ~14.5 ms, the seed's "10-50 ms"."""
    workload = load_workload("inference")
    for cluster, low, high in (("a100_pcie_4", 10e-3, 20e-3), ("a100_nvlink_4", 3e-3, 6e-3)):
        with_latency = estimate_inference(LLAMA2_70B, load_cluster(cluster), workload, Layout(tp=4))
        bandwidth_only = estimate_inference(LLAMA2_70B, load_cluster(cluster), workload, Layout(tp=4),
                                            with_latency=False)
        assert low < with_latency.metrics["decode_tp_s"] < high
        assert bandwidth_only.metrics["decode_tp_s"] < 0.2e-3
        assert with_latency.metrics["tpot_s"] > bandwidth_only.metrics["tpot_s"]


def test_405b_on_two_nodes_of_eight():
    plan = search(load_model("llama3_405b"), load_cluster("h100_ib_2x8"), load_workload("inference"))
    assert plan.best.layout == Layout(tp=8, pp=2)
    assert any(r.layout.tp == 16 and "spans nodes" in r.reason for r in plan.rejected)


def test_70b_tp2_against_tp4_with_a_100_gbs_link():
    cluster, workload = load_cluster("link_100gbs_4"), load_workload("inference")
    tp2, tp4 = (estimate_inference(LLAMA2_70B, cluster, workload, Layout(tp=t)) for t in (2, 4))
    assert tp2.memory_per_gpu < 80 * GIB and tp2.memory_per_gpu > 1.9 * tp4.memory_per_gpu
    assert tp4.metrics["tpot_s"] < tp2.metrics["tpot_s"]  # half the weights per GPU beats 3x the ring steps


def test_memory_of_a_140_gb_model_at_tp_2_4_8():
    weights = {tp: stage_memory(LLAMA2_70B, Layout(tp=tp), 0, 2, training=False).parameter_bytes for tp in (2, 4, 8)}
    total = model_parameters(LLAMA2_70B) * 2
    for tp, nbytes in weights.items():  # norms are replicated, the vocabulary padded: a little over 1/tp
        assert total / tp <= nbytes < total / tp * 1.001


def test_530b_training_layout_bubble_and_memory():
    """TP8 x PP35 x DP12 on 3,360 A100s, 1920 sequences of 2048 per step: 160 micro batches per replica."""
    cfg, cluster = load_model("mtnlg_530b"), load_cluster("a100_dgx").with_nodes(420)
    workload = Workload(kind="training", dtype="bf16", seq_length=2048, global_batch=1920)
    layout = Layout(tp=8, pp=35, dp=12, sequence_parallel=True, recompute="full")
    assert cluster.num_gpus == layout.world_size == 3360
    est = estimate_training(cfg, cluster, workload, layout)
    m = est.metrics
    assert m["microbatches"] == 160
    # The bubble is the simulator's on the plan the executor runs, with the layout's costs.
    plan = build_schedule("1f1b", 35, 160)
    p2p = simulate(plan, m["forward_s"], m["backward_s"], 0.0)
    assert p2p.bubble_fraction == pytest.approx(analytic_bubble_fraction(35, 160))  # 34/194 = 17.5%
    assert m["bubble"] >= p2p.bubble_fraction  # the P2P transfers add to it
    assert 0.17 < m["bubble"] < 0.19
    stage = est.stages[0].memory
    h = 20480  # stage 0: 3 layers of 12 h^2 over TP8, the embedding's vocabulary slice and the positions, bf16
    assert stage["parameters"] == pytest.approx(2 * (3 * 12 * h * h / 8 + 51200 * h / 8 + 2048 * h), rel=1e-3)
    assert est.memory_per_gpu < 80 * GIB


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved_1f1b", 2)])
def test_bubble_is_the_simulators(schedule, v):
    cfg = load_model("llama2_7b")
    workload = Workload(kind="training", dtype="bf16", seq_length=1024, global_batch=64)
    layout = Layout(tp=2, pp=4, dp=1, micro_batch=8, schedule=schedule, virtual_stages=v)
    est = estimate_training(cfg, load_cluster("h100_sxm"), workload, layout)
    m = est.metrics["microbatches"]
    assert m == 8
    plan = build_schedule(schedule, 4, m, v)
    assert simulate(plan).bubble_fraction == pytest.approx(analytic_bubble_fraction(4, m, v))
    assert schedule_peaks(schedule, 4, m, v) == simulate(plan).peak_in_flight
    exact = simulate(plan, est.metrics["forward_s"] / v, est.metrics["backward_s"] / v, _p2p(layout))
    assert est.metrics["bubble"] == pytest.approx(exact.bubble_fraction, rel=1e-3)  # cost ratios to 3 digits
    assert est.metrics["makespan_s"] == pytest.approx(exact.makespan, rel=1e-3)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("schedule,v", [("zb_h1", 1), ("zb_h2", 1), ("zbv", 2)])
def test_zero_bubble_bubble_is_the_simulators(schedule, v, p):
    """The zero-bubble plans are simulated as the executor runs them, with the planner's I and W costs."""
    cfg = load_model("llama2_7b")
    workload = Workload(kind="training", dtype="bf16", seq_length=1024, global_batch=64)
    layout = Layout(tp=2, pp=p, dp=1, micro_batch=8, schedule=schedule, virtual_stages=v)
    est = estimate_training(cfg, load_cluster("h100_sxm"), workload, layout)
    m = est.metrics
    plan = build_schedule(schedule, p, m["microbatches"], v)
    assert plan.split_backward and schedule_peaks(schedule, p, m["microbatches"], v) == simulate(plan).peak_in_flight
    assert m["input_s"] + m["weight_s"] == pytest.approx(m["backward_s"]) and m["input_s"] > m["weight_s"]
    exact = simulate(plan, m["forward_s"] / v, m["backward_s"] / v, _p2p(layout), input_cost=m["input_s"] / v,
                     weight_cost=m["weight_s"] / v)
    assert m["bubble"] == pytest.approx(exact.bubble_fraction, rel=1e-3)
    assert m["makespan_s"] == pytest.approx(exact.makespan, rel=1e-3)
    one_f_one_b = estimate_training(cfg, load_cluster("h100_sxm"), workload, replace(layout, schedule="1f1b",
                                                                                      virtual_stages=1))
    assert m["bubble"] < one_f_one_b.metrics["bubble"]


@pytest.mark.parametrize("model,recompute", [("llama", "none"), ("llama", "full"), ("gpt2", "none"), ("moe", "none")])
def test_weight_gradient_flops_are_what_w_runs(model, recompute):
    """The planner's split of a backward into I and W against torch's FlopCounterMode around the
    framework's own B (backward_input, recomputation inside) and W (backward_weight) of a serial model:
    W runs the linears' deferred dW = g^T x, I the rest. (The MoE's routed experts use grouped matmuls the
    counter does not see; they run in I, so W is still exact there.)"""
    cfg = TINY_MODELS[model].with_(max_seq_len=16)
    batch, seq = 2, 16
    chunk = build_model(cfg, ParallelLayout.serial(), seed=0, options=BuildOptions(recompute=recompute))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    store, counted = WeightGradStore("planner"), {}
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no FLOP formula
        with FlopCounterMode(display=False) as counter, deferring_to(store):
            loss = chunk.loss(chunk(tokens), tokens).mean()
        counted["F"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter, deferring_to(store):
            backward_input((loss,), (torch.ones_like(loss),), None, chunk.parameters(), store)
        counted["I"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            backward_weight(store)
        counted["W"] = counter.get_total_flops()
    forward, backward, weight = stage_flops(cfg, Layout(micro_batch=batch, recompute=recompute), 0, seq)
    assert counted["W"] == weight
    if not cfg.moe:
        assert (counted["F"], counted["I"]) == (forward, backward - weight)


def _p2p(layout):
    """One [b, s, h] bf16 activation over the pipeline's link."""
    link = link_of(layout, load_cluster("h100_sxm"), "pp")
    return collective_time("send", layout.micro_batch * 1024 * 4096 * 2, 2, link)


def test_zero_bubble_layouts_need_the_frameworks_chunks_per_rank():
    """The framework's own rule (pipeline/schedules.py): zbv runs exactly 2 chunks per rank, zb_h1 and
    zb_h2 one."""
    assert Layout(pp=4, schedule="zbv", virtual_stages=2).describe() == "TP1 PP4 DP1 v2 zbv"
    for v in (1, 3):
        with pytest.raises(ValueError, match=f"zbv runs two model chunks per rank in a V, got virtual_stages={v}"):
            Layout(pp=4, schedule="zbv", virtual_stages=v)
    for schedule in ("zb_h1", "zb_h2"):
        with pytest.raises(ValueError, match=f"{schedule} runs one model chunk per rank, got virtual_stages=2"):
            Layout(pp=4, schedule=schedule, virtual_stages=2)


def test_search_tries_the_schedules_asked_for():
    """By default pipelined training layouts run 1F1B; asked, the search also tries the zero-bubble plans
    (zbv with 2 chunks per rank); a layout without a pipeline runs one way whatever the list."""
    cfg, cluster = load_model("llama2_7b"), load_cluster("h100_sxm")
    workload = Workload(kind="training", dtype="bf16", seq_length=1024, global_batch=16)
    default = search(cfg, cluster, workload).ranked
    assert {e.layout.schedule for e in default} == {"1f1b"}
    asked = search(cfg, cluster, workload, schedules=("1f1b", "zb_h1", "zbv")).ranked
    piped = {(e.layout.schedule, e.layout.virtual_stages) for e in asked if e.layout.pp > 1}
    assert piped == {("1f1b", 1), ("zb_h1", 1), ("zbv", 2)}
    assert {e.layout.schedule for e in asked if e.layout.pp == 1} == {"1f1b"}


def test_rejections_name_the_binding_reason():
    cfg, cluster = LLAMA2_70B, load_cluster("a100_nvlink_4")
    workload = load_workload("training")
    assert "num_heads=64" not in (structural_reason(cfg, cluster, workload, Layout(tp=4, dp=1, pp=1)) or "")
    assert "global_batch=512" in structural_reason(cfg, cluster, workload, Layout(dp=3))
    with pytest.raises(ValueError, match="smallest requirement is .* GiB per GPU"):
        search(cfg, cluster, workload)  # 70B training does not fit 4 x 80 GiB: weights+grads+Adam alone 1.1 TB


def test_cli_answers_the_70b_question_with_table_json_and_png(tmp_path, capsys):
    for cluster in ("a100_nvlink_4", "a100_pcie_4"):
        out = tmp_path / f"{cluster}.json"
        start = time.perf_counter()
        assert main([f"cluster={cluster}", "model=llama2_70b", "workload=inference", f"json={out}",
                     f"png={tmp_path / cluster}.png"]) == 0
        assert time.perf_counter() - start < 5.0
        text = capsys.readouterr().out
        assert "chosen: TP4 PP1 DP1" in text and "TPOT ms" in text
        plan = json.loads(out.read_text())
        assert plan["chosen"] == "TP4 PP1 DP1" and plan["ranked"][0]["memory_per_gpu_gib"] < 33
        assert all(r["reason"] for r in plan["rejected"])
        assert (tmp_path / f"{cluster}.png").stat().st_size > 10_000


def test_cli_runs_as_a_script_within_5_seconds_of_planning():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "scripts/plan.py"), "model=llama2_70b", "cluster=a100_pcie_4",
                           "workload=inference"], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert "chosen: TP4 PP1 DP1" in done.stdout
    assert wall < 20  # interpreter + torch + Hydra included; the planning itself is checked above


@pytest.mark.parametrize("argv,message", [
    (["model=llama9"], "unknown model 'llama9'; valid names: gpt2_124m"),
    (["cluster=dgx9"], "unknown cluster 'dgx9'; valid names: a100_dgx"),
    (["workload.batch=0"], "workload.batch=0 must be a positive integer"),
    (["cluster.memory_gib=-1"], "cluster.memory_bytes"),
    (["model=llama3_405b"], "smallest requirement is"),
    (["layout.tp=3", "layout.pp=1", "layout.dp=1"], "not divisible by parallel.tp=3"),
    (["layout.tp=4", "layout.pp=1", "layout.dp=1", "layout.schedule=zbv"],
     "zbv runs two model chunks per rank in a V, got virtual_stages=1; use virtual_stages=2"),
    (["schedules=[1f1b,zb_h3]"], "schedules=['1f1b', 'zb_h3'] must list one or more of"),
])
def test_bad_input_is_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in preset_names("model") if n != "hf"])
def test_every_model_preset_plans(name):
    """The planner's parameter count is the framework's own (the serial model built on the meta device),
    and each preset gets a plan for inference on one H200 node (MoE included)."""
    cfg = load_model(name)
    assert model_parameters(cfg) == parameter_counts(cfg)[0]
    plan = search(cfg, load_cluster("h200"), load_workload("inference"))
    assert plan.best.memory_per_gpu <= 141 * GIB


def test_experts_are_split_over_ep_and_sp_not_tp():
    """A mixture of experts is not cut over TP: without SP every TP rank computes all its tokens' experts."""
    from megatron_lite.planner.cost import rank_layer_flops

    cfg = load_model("mixtral_8x7b")
    serial = rank_layer_flops(cfg, Layout(), 0, 4096, 4096)[0]
    assert rank_layer_flops(cfg, Layout(tp=2, sequence_parallel=True), 0, 4096, 4096)[0] == pytest.approx(serial / 2)
    assert rank_layer_flops(cfg, Layout(tp=2), 0, 4096, 4096)[0] > 0.7 * serial
    assert rank_layer_flops(cfg, Layout(dp=2, ep=2), 0, 4096, 4096)[0] == serial  # tokens x top_k rows per EP rank


def test_objectives_rank_differently():
    cfg, cluster, workload = LLAMA2_70B, load_cluster("a100_pcie_4"), load_workload("inference_batch8")
    by_memory = search(cfg, cluster, workload, objective="memory").ranked
    assert [e.memory_per_gpu for e in by_memory] == sorted(e.memory_per_gpu for e in by_memory)
    by_throughput = search(cfg, cluster, workload, objective="throughput").ranked
    rates = [e.metrics["tokens_per_s"] for e in by_throughput]
    assert rates == sorted(rates, reverse=True)
    with pytest.raises(ValueError, match="objective='cheap' is not one of"):
        search(cfg, cluster, workload, objective="cheap")


def test_data_parallel_buckets_expose_at_least_the_last_reduction():
    """The bucket reductions start as the last backward makes their gradients final (evenly over it) and run
    one after another: one bucket is exposed whole; many small ones hide all but the last; reductions
    longer than the backward expose their excess plus the hold-ups. Worked by hand."""
    assert exposed_reduction([3.0], backward_s=10.0) == 3.0
    assert exposed_reduction([1.0] * 4, backward_s=10.0) == pytest.approx(1.0)  # ready at 2.5, 5, 7.5, 10
    assert exposed_reduction([4.0] * 4, backward_s=10.0) == pytest.approx(8.5)  # 2.5 + 16 = 18.5
    assert exposed_reduction([], backward_s=10.0) == 0.0
    # The step pays it: a one-bucket DP2 step is the serial makespan's half plus the whole all-reduce.
    cfg, cluster = load_model("llama_tiny"), load_cluster("cpu_local")
    workload = load_workload("training_cpu")
    one = estimate_training(cfg, cluster, workload, Layout(dp=2, micro_batch=4), bucket_size_mb=1000)
    many = estimate_training(cfg, cluster, workload, Layout(dp=2, micro_batch=4), bucket_size_mb=0.25)
    gradient_bytes = 4 * model_parameters(cfg)
    assert one.metrics["step_s"] - one.metrics["makespan_s"] > collective_time(
        "all_reduce", gradient_bytes, 2, cluster.intra_node)
    assert many.metrics["step_s"] < one.metrics["step_s"]


def test_a_measured_link_curve_prices_each_ring_step():
    """Link.measured: linear between the points, the first point's time below it, 1/bandwidth per byte
    beyond the last; a collective pays its steps, each the curve's time for the step's share of bytes."""
    link = Link(bandwidth=1e9, latency=5e-6, measured=((1000, 1e-3), (5000, 2e-3)))
    assert link.step_time(10) == 1e-3 and link.step_time(3000) == pytest.approx(1.5e-3)
    assert link.step_time(15000) == pytest.approx(2e-3 + 10000 / 1e9)
    # all-reduce over 4 ranks: 6 steps of a quarter each; over 2: 2 steps of half; a send: 1 step of all
    assert collective_time("all_reduce", 12000, 4, link) == pytest.approx(6 * link.step_time(3000))
    assert collective_time("all_reduce", 6000, 2, link) == pytest.approx(2 * link.step_time(3000))
    assert collective_time("send", 3000, 2, link) == pytest.approx(link.step_time(3000))
    assert collective_time("all_reduce", 6000, 2, link, with_latency=False) == pytest.approx(6000 / 1e9)
    for bad in (((2000, 1e-3), (1000, 2e-3)), ((0, 1e-3),), ((1000, -1.0),)):
        with pytest.raises(ValueError, match="link.measured"):
            Link(bandwidth=1e9, latency=0.0, measured=bad)
    parsed = cluster_from_dict({**_read_preset("cluster", "cpu_local"), "elementwise_bandwidth_gbs": 6,
                                "intra_node": {"bandwidth_gbs": 1, "latency_us": 5, "measured_bytes_us": [[1000, 1000]]}})
    assert parsed.intra_node.measured == ((1000.0, 1e-3),) and parsed.elementwise_bandwidth == 6e9


def test_norms_and_residuals_are_repeated_by_tp_ranks_unless_sequence_parallel():
    """cost.replicated_time: (2 norms + 2 adds per layer, 1 final norm) passes over [tokens, hidden],
    not divided by TP, divided by it under SP; nothing where the cluster does not model them."""
    cfg = load_model("llama_tiny")
    cluster = replace(load_cluster("cpu_local"), elementwise_bandwidth=1e9)
    unit = 512 * cfg.hidden_size * 4 / 1e9
    serial = replicated_time(cfg, Layout(), cluster, 4, True, 512, 4)
    assert serial == pytest.approx((unit * (4 * 10 + 2), unit * (4 * 12 + 3)))
    assert replicated_time(cfg, Layout(tp=2), cluster, 4, True, 512, 4) == pytest.approx(serial)
    sp = replicated_time(cfg, Layout(tp=2, sequence_parallel=True), cluster, 4, True, 512, 4)
    assert sp == pytest.approx(tuple(t / 2 for t in serial))
    assert replicated_time(cfg, Layout(), replace(cluster, elementwise_bandwidth=0.0), 4, True, 512, 4) == (0.0, 0.0)
    # and the step time holds them: TP2 pays more than half the serial compute for them
    workload = load_workload("training_cpu")
    fast = estimate_training(cfg, replace(cluster, elementwise_bandwidth=1e15), workload, Layout(tp=2, micro_batch=4))
    slow = estimate_training(cfg, cluster, workload, Layout(tp=2, micro_batch=4))
    assert slow.metrics["step_s"] - fast.metrics["step_s"] == pytest.approx(4 * sum(serial), rel=1e-3)
