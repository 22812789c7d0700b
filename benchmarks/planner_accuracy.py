"""How close the planner's step time comes to this machine's: fit, predict, run, compare.

    .venv/bin/python benchmarks/planner_accuracy.py                    # llama_tiny: serial fit, TP2, PP2, DP2, 3D
    .venv/bin/python benchmarks/planner_accuracy.py --model gpt2_tiny --steps 8 --json out.json

1. Fit the machine (conf/cluster/cpu_local.yaml's terms): gloo's time per ring step against its bytes
   (Link.measured, the curve the planner prices collectives with; alpha and beta of a least-squares line
   are reported) from 2-rank all-reduces of 4 KiB to 4 MiB (the losses, activations and gradient buckets
   these runs move), each on a new tensor after 2 ms of matmuls on both ranks as training issues them and
   averaged; the bandwidth of the norms and residual adds (the work TP ranks repeat) from a forward and
   backward of them at the model's hidden size; the model's FLOP/s and fixed cost per layer and micro
   batch from serial forward+backward steps of 4 micro batches of 1 and of 4 sequences (t - norms =
   overhead + FLOPs / rate); the memory bandwidth of AdamW from the serial optimizer step.
2. Predict each layout's step time with the planner (estimate_training) on that fitted cluster; ranks
   beyond the cores share them, so a rank's compute rate and overhead scale by world / cores.
3. Run the layouts (train_step on spawned gloo ranks, one thread each), median of the timed steps of
   the slowest rank, and print |predicted - measured| / measured (target <= 15%).
4. Repeat 1-3 (--rounds): this machine's speed drifts by 10-15% within a minute, so every round predicts
   from its own fit, and the median error over the rounds is the figure.
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
from megatron_lite.planner.cost import LAYER_PASSES, NORM_PASSES, layer_forward_flops, replicated_time  # noqa: E402
from megatron_lite.planner.params import stage_memory  # noqa: E402
from megatron_lite.planner.spec import GB, Layout, Link, load_cluster, load_model, load_workload  # noqa: E402
from megatron_lite.planner.training_time import estimate_training  # noqa: E402
from megatron_lite.training.step import run_schedule, train_step  # noqa: E402

SIZES = [4 * 2**10 * 4**k for k in range(6)]  # 4 KiB .. 4 MiB: the losses, activations and gradient buckets these runs move
LAYOUTS = {"serial": Layout(), "TP2": Layout(tp=2), "PP2": Layout(pp=2), "DP2": Layout(dp=2),
           "3D": Layout(tp=2, pp=2, dp=2)}


def _all_reduce_times(rank, world, repeats, gap_s):
    """Mean seconds of an all-reduce per size, each after `gap_s` of matmuls on both ranks, as the training
    loop issues them: on a tensor just made, between computations, which on a CPU share the cores gloo's
    transport runs on (an all-reduce after compute costs 1.5-2x one issued back to back here), and the
    mean, because a step pays the slow tail too."""
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
            x = torch.empty(size // 4).fill_(1.0)  # a new tensor, as an activation is (fresh pages cost more)
            start = time.perf_counter()
            comm.all_reduce(x, layout.dp)
            times.append(time.perf_counter() - start)
        out.append(statistics.mean(times))
    return out


def fit_link(repeats: int = 60, gap_s: float = 2e-3) -> Link:
    """The measured curve of a step's time against its bytes (what the planner uses, Link.measured), and
    alpha, beta of t = 2 alpha + bytes / beta (a 2-rank ring all-reduce: 2 steps, 1x the bytes) by least
    squares on the relative error, reported and used beyond the largest size."""
    times = [max(t) for t in zip(*run_on_ranks(_all_reduce_times, 2, repeats, gap_s))]
    # minimise sum ((a + b s - t) / t)^2: the normal equations of the rows (1/t, s/t) against 1
    rows = [(1 / t, s / t) for s, t in zip(SIZES, times)]
    s11 = sum(u * u for u, _ in rows)
    s12 = sum(u * v for u, v in rows)
    s22 = sum(v * v for _, v in rows)
    r1, r2 = sum(u for u, _ in rows), sum(v for _, v in rows)
    det = s11 * s22 - s12 * s12
    intercept, slope = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    # The curve itself too: a 2-rank all-reduce of s bytes is 2 ring steps of s / 2 bytes.
    return Link(bandwidth=1 / slope, latency=max(intercept / 2, 0.0),
                measured=tuple((s / 2, t / 2) for s, t in zip(SIZES, times)))


def matmul_flops(cfg, tokens: int, repeats: int = 20) -> float:
    h, f = cfg.hidden_size, cfg.ffn_size
    x, w1, w2 = torch.randn(tokens, h), torch.randn(f, h), torch.randn(h, h)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w1)
        torch.nn.functional.linear(x, w2)
    return repeats * 2 * tokens * h * (f + h) / (time.perf_counter() - start)


def elementwise_bandwidth(cfg, tokens: int, repeats: int = 30) -> float:
    """Bytes/s of the norms and residual adds (cost.replicated_time's passes), forward and backward, at the
    model's hidden size over `tokens` rows: the work TP ranks repeat."""
    h = cfg.hidden_size
    x = torch.randn(tokens, h, requires_grad=True)
    weight, bias = torch.ones(h, requires_grad=True), torch.zeros(h, requires_grad=True)

    def norm(y):
        if cfg.norm == "rmsnorm":
            return torch.nn.functional.rms_norm(y, (h,), weight, cfg.norm_eps)
        return torch.nn.functional.layer_norm(y, (h,), weight, bias, cfg.norm_eps)

    def step():
        y = x
        for _ in range(cfg.num_layers):
            y = y + norm(y)
            y = y + norm(y)
        norm(y).backward(torch.ones_like(x))

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    passes = sum(cfg.num_layers * LAYER_PASSES[k] + NORM_PASSES[k] for k in ("forward", "backward"))
    return passes * tokens * h * 4 / seconds


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
    elementwise = elementwise_bandwidth(cfg, 4 * seq)
    probe = replace(base, elementwise_bandwidth=elementwise)
    norms_of = lambda mb: sum(replicated_time(cfg, Layout(micro_batch=mb), probe, cfg.num_layers, True, mb * seq, 4))
    t1, t4 = t1 - norms_of(1), t4 - norms_of(4)  # what the FLOPs and the per-layer overhead account for
    rate = (flops_of(4) - flops_of(1)) / max(t4 - t1, 1e-9)  # FLOP/s of the model's own work
    overhead = max(t1 - flops_of(1) / rate, 0.0) / (3 * (cfg.num_layers + 1))
    memory = stage_memory(cfg, Layout(), 0, workload.dtype_bytes)
    bandwidth = 2 * (memory.parameter_bytes + memory.gradient_bytes + memory.optimizer_bytes) / update
    link = fit_link()
    fitted = replace(base, peak_flops={workload.dtype: rate}, mfu_ceiling=1.0, layer_overhead=overhead,
                     elementwise_bandwidth=elementwise,
                     memory_bandwidth=bandwidth, intra_node=link, inter_node=link)
    facts = {"matmul_gflops": matmul_flops(cfg, 4 * seq) / 1e9, "model_gflops": rate / 1e9,
             "layer_overhead_us": overhead * 1e6, "alpha_us": link.latency * 1e6,
             "beta_gbs": link.bandwidth / GB, "adamw_gbs": bandwidth / GB, "elementwise_gbs": elementwise / GB}
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


def predict_and_measure(cfg, cluster, workload, name: str, args, cores: int) -> tuple[float, float]:
    """(predicted, measured) seconds of a step of layout `name`: the measured one the median over the timed
    steps of the slowest rank's."""
    layout = replace(LAYOUTS[name], micro_batch=args.micro_batch)
    share = max(1.0, layout.world_size / cores)  # ranks beyond the cores take turns
    rank_cluster = replace(cluster, peak_flops={k: v / share for k, v in cluster.peak_flops.items()},
                           layer_overhead=cluster.layer_overhead * share,
                           elementwise_bandwidth=cluster.elementwise_bandwidth / share)
    predicted = estimate_training(cfg, rank_cluster, workload, layout).metrics["step_s"]
    runs = run_on_ranks(_timed_steps, layout.world_size, args.model, layout, workload, args.warmup, args.steps,
                        timeout_s=600)
    return predicted, statistics.median(max(step) for step in zip(*runs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fit-repeats", type=int, default=12, help="serial steps per micro batch size in the fit")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fit-then-run rounds; the machine's speed drifts by 10-15%% within a minute here, so each "
                             "round's layouts are predicted from that round's fit and the median error counts")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    workload = load_workload("training_cpu")
    cores = len(os.sched_getaffinity(0))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in args.layouts}
    fits = []
    for round_ in range(args.rounds):
        cfg, cluster, facts = fit_cluster(args.model, workload, repeats=args.fit_repeats)
        fits.append(facts)
        print(f"round {round_ + 1}, fitted on {cores} cores: " + ", ".join(f"{k} {v:.3g}" for k, v in facts.items()))
        for name in args.layouts:
            predicted, measured = predict_and_measure(cfg, cluster, workload, name, args, cores)
            results[name].append((predicted, measured))
            print(f"  {name:6s} predicted {predicted * 1e3:8.1f} ms  measured {measured * 1e3:8.1f} ms  "
                  f"|error| {abs(predicted - measured) / measured * 100:5.1f}%")
    rows = []
    print(f"median over {args.rounds} round(s), {args.model}, {workload.global_batch} x {workload.seq_length} tokens:")
    for name in args.layouts:
        errors = [abs(p - m) / m for p, m in results[name]]
        rows.append({"layout": name, "predicted_ms": statistics.median(p for p, _ in results[name]) * 1e3,
                     "measured_ms": statistics.median(m for _, m in results[name]) * 1e3,
                     "error": statistics.median(errors), "errors": errors})
        layout = replace(LAYOUTS[name], micro_batch=args.micro_batch)
        print(f"{name:6s} {layout.describe():28s} predicted {rows[-1]['predicted_ms']:8.1f} ms  measured "
              f"{rows[-1]['measured_ms']:8.1f} ms  |error| {rows[-1]['error'] * 100:5.1f}% "
              f"(rounds {min(errors) * 100:.1f}-{max(errors) * 100:.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "fit": fits[-1], "fits": fits, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
