"""How close the planner's step time comes to this machine's: fit, predict, run, compare.

    .venv/bin/python benchmarks/planner_accuracy.py                    # llama_tiny: serial fit, TP2, PP2, DP2, 3D
    .venv/bin/python benchmarks/planner_accuracy.py --model gpt2_tiny --steps 8 --json out.json

1. Fit the machine (conf/cluster/cpu_local.yaml's terms): alpha and beta of gloo from all-reduces of
   16 KiB to 4 MiB (the activations and gradient buckets these runs move) between 2 ranks, each issued
   after 2 ms of matmuls on both ranks as training issues them and averaged (least squares on the
   relative error of t = 2 alpha + bytes / beta); the matmul FLOP/s of the model's own shapes (one
   thread); the fixed cost per layer and micro batch from serial forward+backward steps of 4 micro
   batches of 1 and of 4 sequences (t = overhead + FLOPs / rate); the memory bandwidth of AdamW from
   the serial optimizer step.
2. Predict each layout's step time with the planner (estimate_training) on that fitted cluster; ranks
   beyond the cores share them, so a rank's compute rate and overhead scale by world / cores.
3. Run the layouts (train_step on spawned gloo ranks, one thread each), median of the timed steps of
   the slowest rank, and print |predicted - measured| / measured (target <= 15%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.models.partition import build_model_chunks  # noqa: E402
from megatron_lite.optim import OptimizerConfig, build_optimizer  # noqa: E402
from megatron_lite.parallel import comm  # noqa: E402
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes  # noqa: E402
from megatron_lite.parallel.spawn import run_on_ranks  # noqa: E402
from megatron_lite.pipeline.schedules import build_schedule  # noqa: E402
from megatron_lite.planner.comm_volume import microbatches  # noqa: E402
from megatron_lite.planner.cost import layer_forward_flops  # noqa: E402
from megatron_lite.planner.params import stage_memory  # noqa: E402
from megatron_lite.planner.spec import GB, Layout, Link, load_cluster, load_model, load_workload  # noqa: E402
from megatron_lite.planner.training_time import estimate_training  # noqa: E402
from megatron_lite.training.step import run_schedule, train_step  # noqa: E402

SIZES = [16 * 2**10 * 4**k for k in range(5)]  # 16 KiB .. 4 MiB: the activations and gradient buckets these runs move
LAYOUTS = {"serial": Layout(), "TP2": Layout(tp=2), "PP2": Layout(pp=2), "DP2": Layout(dp=2),
           "3D": Layout(tp=2, pp=2, dp=2)}


def _all_reduce_times(rank, world, repeats, gap_s):
    """Mean seconds of an all-reduce per size, each after `gap_s` of matmuls on both ranks, as the training
    loop issues them: between computations, which on a CPU share the cores gloo's transport runs on (an
    all-reduce after compute costs 1.5-2x one issued back to back here), and the mean, because a step pays
    the slow tail too."""
    torch.set_num_threads(1)
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world))
    a = torch.randn(128, 128)
    start = time.perf_counter()
    for _ in range(50):
        a @ a
    matmuls = max(1, round(gap_s / ((time.perf_counter() - start) / 50)))
    matmuls = int(comm.all_reduce(torch.tensor([float(matmuls)]), layout.dp, op="max").item())  # same work on both
    out = []
    for size in SIZES:
        x = torch.zeros(size // 4)
        for _ in range(3):
            comm.all_reduce(x, layout.dp)
        times = []
        for _ in range(repeats):
            for _ in range(matmuls):
                a @ a
            start = time.perf_counter()
            comm.all_reduce(x, layout.dp)
            times.append(time.perf_counter() - start)
        out.append(statistics.mean(times))
    return out


def fit_link(repeats: int = 60, gap_s: float = 2e-3) -> Link:
    """alpha, beta of t = 2 alpha + bytes / beta (a 2-rank ring all-reduce: 2 steps, 1x the bytes), by least
    squares on the relative error, so that the small and middle sizes (a TP all-reduce of activations is
    tens to hundreds of KiB) count as much as the largest."""
    times = [max(t) for t in zip(*run_on_ranks(_all_reduce_times, 2, repeats, gap_s))]
    # minimise sum ((a + b s - t) / t)^2: the normal equations of the rows (1/t, s/t) against 1
    rows = [(1 / t, s / t) for s, t in zip(SIZES, times)]
    s11 = sum(u * u for u, _ in rows)
    s12 = sum(u * v for u, v in rows)
    s22 = sum(v * v for _, v in rows)
    r1, r2 = sum(u for u, _ in rows), sum(v for _, v in rows)
    det = s11 * s22 - s12 * s12
    intercept, slope = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    return Link(bandwidth=1 / slope, latency=max(intercept / 2, 0.0))


def matmul_flops(cfg, tokens: int, repeats: int = 20) -> float:
    h, f = cfg.hidden_size, cfg.ffn_size
    x, w1, w2 = torch.randn(tokens, h), torch.randn(f, h), torch.randn(h, h)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w1)
        torch.nn.functional.linear(x, w2)
    return repeats * 2 * tokens * h * (f + h) / (time.perf_counter() - start)


def _serial_times(cfg, seq: int, micro: int, repeats: int, microbatches: int = 4) -> tuple[float, float]:
    """(forward + backward of one micro batch, one optimizer step), medians, one process; the micro batch's
    time from steps of `microbatches` of them, so that what a step pays once is not counted per micro batch."""
    layout = ParallelLayout.serial()
    chunks = build_model_chunks(cfg, layout, 0)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig())
    tokens = torch.randint(0, cfg.vocab_size, (micro * microbatches, seq + 1))
    plan = build_schedule("1f1b", 1, microbatches)
    compute, update = [], []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        run_schedule(chunks, plan, tokens[:, :-1], tokens[:, 1:], layout)
        mid = time.perf_counter()
        optimizer.step()
        compute.append((mid - start) / microbatches)
        update.append(time.perf_counter() - mid)
    return statistics.median(compute[2:]), statistics.median(update[2:])


def fit_cluster(model: str, workload, repeats: int):
    torch.set_num_threads(1)
    cfg = load_model(model)
    seq = workload.seq_length
    base = load_cluster("cpu_local")
    flops_of = lambda mb: sum(sum(layer_forward_flops(cfg, i, mb * seq, seq)) for i in range(cfg.num_layers)) * 3
    (t1, update), (t4, _) = _serial_times(cfg, seq, 1, repeats), _serial_times(cfg, seq, 4, repeats)
    rate = (flops_of(4) - flops_of(1)) / max(t4 - t1, 1e-9)  # FLOP/s of the model's own work
    overhead = max(t1 - flops_of(1) / rate, 0.0) / (3 * (cfg.num_layers + 1))
    memory = stage_memory(cfg, Layout(), 0, workload.dtype_bytes)
    bandwidth = 2 * (memory.parameter_bytes + memory.gradient_bytes + memory.optimizer_bytes) / update
    link = fit_link()
    fitted = replace(base, peak_flops={workload.dtype: rate}, mfu_ceiling=1.0, layer_overhead=overhead,
                     memory_bandwidth=bandwidth, intra_node=link, inter_node=link)
    facts = {"matmul_gflops": matmul_flops(cfg, 4 * seq) / 1e9, "model_gflops": rate / 1e9,
             "layer_overhead_us": overhead * 1e6, "alpha_us": link.latency * 1e6,
             "beta_gbs": link.bandwidth / GB, "adamw_gbs": bandwidth / GB}
    return cfg, fitted, facts


def _timed_steps(rank, world, model, layout: Layout, workload, warmup, steps):
    cfg = load_model(model)
    fw = ParallelLayout.from_mesh(ParallelSizes(tp=layout.tp, pp=layout.pp, dp=layout.dp))
    chunks = build_model_chunks(cfg, fw, 0)
    optimizer = build_optimizer(chunks, fw, OptimizerConfig())
    plan = build_schedule("1f1b", layout.pp, microbatches(layout, workload.global_batch))
    sample = torch.randint(0, cfg.vocab_size, (workload.global_batch, workload.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    tokens, targets = (t.chunk(fw.dp.size)[fw.dp.rank] for t in (sample[:, :-1], sample[:, 1:]))
    times = []
    for _ in range(warmup + steps):
        comm.barrier()
        start = time.perf_counter()
        train_step(chunks, optimizer, tokens, targets, fw, plan)
        comm.barrier()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    workload = load_workload("training_cpu")
    cfg, cluster, facts = fit_cluster(args.model, workload, repeats=8)
    cores = len(os.sched_getaffinity(0))
    print(f"fitted on {cores} cores: " + ", ".join(f"{k} {v:.3g}" for k, v in facts.items()))
    rows = []
    for name in args.layouts:
        layout = replace(LAYOUTS[name], micro_batch=args.micro_batch)
        share = max(1.0, layout.world_size / cores)  # ranks beyond the cores take turns
        rank_cluster = replace(cluster, peak_flops={k: v / share for k, v in cluster.peak_flops.items()},
                               layer_overhead=cluster.layer_overhead * share)
        predicted = estimate_training(cfg, rank_cluster, workload, layout).metrics["step_s"]
        runs = run_on_ranks(_timed_steps, layout.world_size, args.model, layout, workload, args.warmup, args.steps,
                            timeout_s=600)
        measured = statistics.median(max(step) for step in zip(*runs))
        error = abs(predicted - measured) / measured
        rows.append({"layout": name, "predicted_ms": predicted * 1e3, "measured_ms": measured * 1e3, "error": error})
        print(f"{name:6s} {layout.describe():28s} predicted {predicted * 1e3:8.1f} ms  measured "
              f"{measured * 1e3:8.1f} ms  |error| {error * 100:5.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "fit": facts, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
