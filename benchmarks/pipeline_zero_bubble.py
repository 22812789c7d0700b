"""Our zero-bubble pipelines (ZB-H1, ZBV; ZB-H2 with --systems) and 1F1B against torch.distributed.pipelining's Schedule1F1B,
ScheduleInterleavedZeroBubble and ScheduleZBVZeroBubble, with the measured bubble next to the simulator's.

The model, batch, optimizer and timing are those of `pipeline_1f1b.py` (GPT-2, 8 layers, hidden 256,
sequence 128, vocabulary 1024, fp32, global batch 16 in 8 microbatches, AdamW, gloo on CPU), untied on
both sides (torch cannot tie across stages). torch's interleaved zero-bubble schedule runs two stages
per rank in a loop, its ZBV two in a V, as ours.

Measured bubble: our executor records every compute's busy span, from the moment its input has
arrived (`train_step(..., timeline=...)`); per timed step the idle share of the pipeline ranks' time,
the median over the steps. Predicted: the simulator on the same plan with the measured mean cost of
each compute kind (F, B or I and W) and no transfer time; replayed: the simulator with every action's
own measured duration (stage imbalance included) and the measured median transfer latency, so what
remains between it and the measurement is the executor's own overhead between computes.

    python benchmarks/pipeline_zero_bubble.py [--pp 2 4] [--steps 10] [--warmup 3] [--rounds 3] [--paired]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (StepTimer, emit_result, library_version, pair_groups, ratio_interval, run_group,  # noqa: E402
                     summarize)
from pipeline_1f1b import (HEADS, HIDDEN, LAYERS, LR, MICROBATCHES, SEED, SEQ, VOCAB, WEIGHT_DECAY, Block,  # noqa: E402
                           FinalNorm, Head, PositionEmbedding, WordEmbedding, _batch, _gpt2_init, _lm_loss,
                           build_torch, torch_adamw)

LABELS = {
    "ours-1f1b": "megatron_lite 1f1b",
    "ours-zb_h1": "megatron_lite zb_h1",
    "ours-zb_h2": "megatron_lite zb_h2",
    "ours-zbv": "megatron_lite zbv",
    "torch-1f1b": "torch Schedule1F1B",
    "torch-izb": "torch ScheduleInterleavedZeroBubble",
    "torch-zbv": "torch ScheduleZBVZeroBubble",
}
SYSTEMS = tuple(s for s in LABELS if s != "ours-zb_h2")  # ZB-H2 (2p-1 microbatches in flight) on request
PAIRS = (("ours-zbv", "torch-1f1b"), ("ours-zb_h1", "torch-1f1b"), ("ours-1f1b", "torch-1f1b"),
         ("ours-zbv", "torch-zbv"), ("ours-zb_h1", "torch-izb"), ("ours-zbv", "torch-izb"))
KEEP_TIMELINES = 64  # most recent steps whose timelines a rank keeps


def _schedule_shape(schedule: str) -> int:
    return 2 if schedule == "zbv" else 1


def build_ours(rank: int, world: int, schedule: str) -> dict:
    from megatron_lite.models.config import gpt2_config
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.optim.optimizer import OptimizerConfig, build_optimizer
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.pipeline.schedules import build_schedule, schedule_mapping
    from megatron_lite.training.step import train_step

    v = _schedule_shape(schedule)
    layout = ParallelLayout.from_mesh(ParallelSizes(pp=world), retain_host_memory=True)
    cfg = gpt2_config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                      max_seq_len=SEQ, tie_embeddings=False)
    chunks = build_model_chunks(cfg, layout, SEED, v, mapping=schedule_mapping(schedule))
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY))
    timer = optimizer.step = StepTimer(optimizer.step)
    plan = build_schedule(schedule, world, MICROBATCHES, v)
    tokens, targets = _batch()
    timelines: list = []  # filled as the steps run, returned with the run (harness "check")

    def step():
        timeline: list = []
        loss = train_step(chunks, optimizer, tokens, targets, layout, plan, timeline=timeline)[0]
        timelines.append(timeline)
        del timelines[:-KEEP_TIMELINES]
        return loss

    return {"step": step, "timer": timer, "check": timelines,
            "params": sum(p.numel() for c in chunks for p in c.parameters())}


def _torch_stage_module(stage: int, num_stages: int) -> torch.nn.Sequential:
    per = LAYERS // num_stages
    modules = [WordEmbedding(), PositionEmbedding()] if stage == 0 else []
    modules += [Block() for _ in range(per)]
    modules += [FinalNorm(), Head()] if stage == num_stages - 1 else []
    module = torch.nn.Sequential(*modules)
    _gpt2_init(module)
    return module


def build_torch_multi(rank: int, world: int, style: str) -> dict:
    """Two stages per rank: "loop" (stage r and p + r, ScheduleInterleavedZeroBubble) or "v" (stage r and
    2p - 1 - r, ScheduleZBVZeroBubble)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble

    num_stages = 2 * world
    ids = [rank, world + rank] if style == "loop" else [rank, num_stages - 1 - rank]
    modules = [_torch_stage_module(s, num_stages) for s in ids]
    stages = [PipelineStage(m, s, num_stages, torch.device("cpu")) for m, s in zip(modules, ids)]
    cls = ScheduleInterleavedZeroBubble if style == "loop" else ScheduleZBVZeroBubble
    schedule = cls(stages, MICROBATCHES, loss_fn=_lm_loss)
    optimizer = torch_adamw([p for m in modules for p in m.parameters()])
    timer = optimizer.step = StepTimer(optimizer.step)
    tokens, targets = _batch()
    first, last = 0 in ids, num_stages - 1 in ids
    last_rank = 0 if style == "v" else world - 1

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = [] if last else None
        args = (tokens,) if first else ()
        kwargs = {"target": targets, "losses": losses} if last else {}
        schedule.step(*args, **kwargs)
        optimizer.step()
        loss = torch.stack(losses).mean() if last else torch.zeros(())
        dist.broadcast(loss, src=last_rank)
        return loss.item()

    return {"step": step, "timer": timer, "params": sum(p.numel() for m in modules for p in m.parameters())}


_BUILDERS = {
    "ours-1f1b": (build_ours, ("1f1b",)),
    "ours-zb_h1": (build_ours, ("zb_h1",)),
    "ours-zb_h2": (build_ours, ("zb_h2",)),
    "ours-zbv": (build_ours, ("zbv",)),
    "torch-1f1b": (build_torch, ()),
    "torch-izb": (build_torch_multi, ("loop",)),
    "torch-zbv": (build_torch_multi, ("v",)),
}


def measured_bubbles(system: str, pp: int, runs: list[dict], steps: int) -> dict | None:
    """Median measured bubble over the timed steps and the simulator's prediction from measured costs."""
    if not system.startswith("ours-"):
        return None
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.pipeline.simulate import mean_costs, measured, measured_comm_cost, measured_costs, simulate

    schedule = system.removeprefix("ours-")
    plan = build_schedule(schedule, pp, MICROBATCHES, _schedule_shape(schedule))
    fractions, inner, predicted, replayed = [], [], [], []
    for run in runs:
        per_rank = run["checks"]  # per rank: the timelines of its last steps
        for i in range(1, steps + 1):
            timelines = [rank_timelines[-i] for rank_timelines in per_rank]
            result = measured(plan, timelines)
            fractions.append(result.bubble_fraction)
            inner.append(result.inner_bubble_fraction)
            costs = mean_costs(timelines)
            backward = costs.get("B", costs.get("I", 0.0) + costs.get("W", 0.0))
            predicted.append(simulate(plan, costs["F"], backward, 0.0, costs.get("I"), costs.get("W")).bubble_fraction)
            replayed.append(simulate(plan, comm_cost=measured_comm_cost(plan, timelines),
                                     action_costs=measured_costs(timelines)).bubble_fraction)
    return {"measured": statistics.median(fractions), "measured_inner": statistics.median(inner),
            "predicted": statistics.median(predicted), "replayed": statistics.median(replayed)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per (system, pp), the order alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (every system)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(LABELS))
    parser.add_argument("--paired", action="store_true", help="compared pairs in one set of processes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is declared hung")
    parser.add_argument("--json", help="write the results here instead of as stdout's last line")
    args = parser.parse_args(argv)
    for pp in args.pp:
        if LAYERS % (2 * pp) or MICROBATCHES < pp:
            parser.error(f"pp={pp}: 2*pp must divide {LAYERS} layers and pp be <= {MICROBATCHES} microbatches")
    if args.steps > 64:
        parser.error("--steps must be <= 64 (timelines kept per rank)")
    print(f"model: GPT-2 {LAYERS} layers, hidden {HIDDEN}, seq {SEQ}, vocab {VOCAB}, fp32, untied; "
          f"{MICROBATCHES} microbatches; gloo on CPU, {args.threads} thread(s) per rank, {os.cpu_count()} CPUs; "
          f"{args.rounds} round(s) x (warmup {args.warmup} + {args.steps} timed steps)")
    print(f"megatron_lite {library_version()}; torch {torch.__version__}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)

    groups = pair_groups(args.systems, PAIRS, args.paired)
    runs: dict[tuple[str, int], list[dict]] = {}
    failures: dict[tuple[str, int], str] = {}
    for round_ in range(args.rounds):
        for turn, pp in enumerate(args.pp):
            order = groups if (round_ + turn) % 2 == 0 else [g[::-1] for g in reversed(groups)]
            for group in order:
                if any((s, pp) in failures for s in group):
                    continue
                specs = [(system, *_BUILDERS[system]) for system in group]
                try:
                    result = run_group(specs, pp, args.warmup, args.steps, args.threads, args.timeout)
                except Exception as error:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                    for system in group:
                        failures[(system, pp)] = str(error).splitlines()[0][:200]
                        print(f"  pp={pp} {LABELS[system]} failed: {failures[(system, pp)]}", flush=True)
                    continue
                for system, run in result.items():
                    runs.setdefault((system, pp), []).append(run)
                    print(f"  round {round_} pp={pp} {LABELS[system]:<36} median "
                          f"{statistics.median(run['step_times_s']):.3f}s, loss {run['loss']:.4f}", flush=True)

    rows = []
    for pp in args.pp:
        for system in LABELS:
            if (system, pp) in runs:
                row = summarize(system, LABELS[system], runs[(system, pp)], pp=pp)
                row["bubble"] = measured_bubbles(system, pp, runs[(system, pp)], args.steps)
                for run in row["runs"]:
                    run["checks"] = None  # the timelines stay out of the JSON
                rows.append(row)
    by_key = {(r["system"], r["pp"]): r for r in rows}
    ratios = []
    for pp in args.pp:
        for ours, peer in PAIRS:
            if (ours, pp) in by_key and (peer, pp) in by_key:
                ratios.append({"pp": pp, "ours": ours, "peer": peer,
                               "ratio": by_key[(ours, pp)]["median_s"] / by_key[(peer, pp)]["median_s"],
                               "interval": ratio_interval(runs[(ours, pp)], runs[(peer, pp)])})

    print(f"\nload average at end {os.getloadavg()[0]:.2f}\n")
    print(f"{'system':<38} {'pp':>3} {'median step s':>14} {'bubble measured':>16} {'inner':>7} {'predicted':>10} "
          f"{'replayed':>9}")
    for r in rows:
        b = r["bubble"]
        cells = (f"{b['measured']:>16.3f} {b['measured_inner']:>7.3f} {b['predicted']:>10.3f} {b['replayed']:>9.3f}"
                 if b else f"{'-':>16} {'-':>7} {'-':>10} {'-':>9}")
        print(f"{r['label']:<38} {r['pp']:>3} {r['median_s']:>14.3f} {cells}")
    print(f"\n{'ours / peer (median step time)':<64} {'pp':>3} {'ratio':>7} {'95% interval':>13}")
    for q in ratios:
        interval = "{:.3f}-{:.3f}".format(*q["interval"]) if q["interval"] else "-"
        print(f"{LABELS[q['ours']] + ' / ' + LABELS[q['peer']]:<64} {q['pp']:>3} {q['ratio']:>7.3f} {interval:>13}")
    for (system, pp), error in failures.items():
        print(f"{LABELS[system]} at pp={pp} did not run: {error}")
    print("95% interval: the rounds resampled (bootstrap), with 3 rounds or more")
    result = {"config": {"layers": LAYERS, "hidden": HIDDEN, "seq": SEQ, "vocab": VOCAB, "microbatches": MICROBATCHES,
                         "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "paired": args.paired,
                         "threads_per_rank": args.threads, "cpus": os.cpu_count(), "library": library_version(),
                         "torch": torch.__version__},
              "rows": rows, "ratios": ratios, "failures": {f"{s}@pp{p}": e for (s, p), e in failures.items()}}
    return emit_result(result, args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
