"""Our 1F1B pipeline vs torch.distributed.pipelining's Schedule1F1B and DeepSpeed's PipelineEngine.

Same GPT-2 (8 layers, hidden 256, 4 heads, sequence 128, vocabulary 1024, fp32), global batch 16 in
8 microbatches of 2, AdamW (decay on matrices and embeddings only), the 8 blocks split evenly over
the stages, gloo on CPU, one process per stage, the same torch thread count on every rank. Every
system runs in its own set of processes (one `run_on_ranks` call each) within one invocation; the
order of the systems alternates between pipeline sizes and rounds.

A timed step is forward + backward over all microbatches + gradient finalisation + optimizer step +
the loss reaching every rank, between two barriers; per step we take the slowest rank, then the
median over the timed steps. Next to it: CPU seconds per step summed over the ranks, which other jobs
on the machine disturb much less than wall time.

Tied embeddings: ours and DeepSpeed (TiedLayerSpec) tie the input and output embedding across the
pipeline ends (one all-reduce of its gradient per step); torch.distributed.pipelining cannot tie
across stages, so the torch model is untied and is compared with our untied model.
Optimizer: ours is the library's own (flat fp32 buffers, PyTorch's fused AdamW kernel) when it has one, the
peers use torch.optim.AdamW (DeepSpeed wraps it) with the same hyperparameters and decay groups.

    python benchmarks/pipeline_1f1b.py [--pp 2 4] [--steps 10] [--warmup 3] [--rounds 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

# DeepSpeed picks its accelerator at import time; it is imported lazily, in its own processes only.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.parallel.spawn import run_on_ranks

VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 1024, 256, 8, 4, 128
GLOBAL_BATCH, MICROBATCHES = 16, 8
LR, WEIGHT_DECAY, SEED, INIT_STD = 1e-4, 0.01, 1234, 0.02

SYSTEMS = ("ours", "deepspeed", "ours-untied", "torch")  # compared pairs next to each other in time
LABELS = {
    "ours": "megatron_lite 1f1b (tied)",
    "ours-untied": "megatron_lite 1f1b (untied)",
    "torch": "torch Schedule1F1B (untied)",
    "deepspeed": "DeepSpeed PipelineEngine (tied)",
    "deepspeed-untied": "DeepSpeed PipelineEngine (untied)",
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _adamw(params) -> torch.optim.Optimizer:
    """torch AdamW; like ours, matrices and embeddings are decayed, biases and norm weights not."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR)


_PHASES: dict = {}  # per process: set-up and warm-up seconds, CPU seconds of the timed steps


def _timed(step, warmup: int, steps: int) -> tuple[list[float], float]:
    loss = float("nan")
    start = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    _PHASES["warmup_s"] = time.perf_counter() - start
    times, cpu = [], []
    for _ in range(steps):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        dist.barrier()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    _PHASES["cpu"] = cpu
    return times, float(loss)


def _setup_started() -> None:
    _PHASES["t0"] = time.perf_counter()


def _setup_done() -> None:
    _PHASES["setup_s"] = time.perf_counter() - _PHASES["t0"]


def _result(times, loss, params) -> dict:
    return {"times": times, "loss": loss, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in params),
            "setup_s": _PHASES.get("setup_s", float("nan")), "warmup_s": _PHASES.get("warmup_s", float("nan")),
            "cpu_times": _PHASES["cpu"]}


# ----------------------------------------------------------------------------- ours


def run_ours(rank: int, world: int, tied: bool, warmup: int, steps: int) -> dict:
    _setup_started()
    from megatron_lite.models.config import gpt2_config
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.pipeline.partition import build_model_chunks
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.training.step import train_step

    layout = ParallelLayout.from_mesh(ParallelSizes(pp=world))
    cfg = gpt2_config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                      max_seq_len=SEQ, tie_embeddings=tied)
    chunks = build_model_chunks(cfg, layout, SEED)
    params = [p for c in chunks for p in c.parameters()]
    optimizer = _our_optimizer(chunks, layout, params)
    plan = build_schedule("1f1b", world, MICROBATCHES)
    tokens, targets = _batch()

    def step():
        out = train_step(chunks, optimizer, tokens, targets, layout, plan)
        return out[0] if isinstance(out, tuple) else out  # newer train_step: (loss, stats)

    _setup_done()
    times, loss = _timed(step, warmup, steps)
    return _result(times, loss, params)


def _our_optimizer(chunks, layout, params):
    """The library's own AdamW (DistributedOptimizer: flat fp32 buffers) where it has one, else torch's."""
    try:
        from megatron_lite.optim.optimizer import OptimizerConfig, build_optimizer
    except ImportError:
        return _adamw(params)
    return build_optimizer(chunks, layout, OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY))


# ----------------------------------------------------------------------------- plain torch GPT-2 pieces


class Block(torch.nn.Module):
    """Pre-LN GPT-2 block with the same modules as ours: separate q/k/v/o projections, biases, SDPA."""

    def __init__(self):
        super().__init__()
        h = HIDDEN
        self.attn_norm = torch.nn.LayerNorm(h)
        self.q_proj, self.k_proj = torch.nn.Linear(h, h), torch.nn.Linear(h, h)
        self.v_proj, self.o_proj = torch.nn.Linear(h, h), torch.nn.Linear(h, h)
        self.mlp_norm = torch.nn.LayerNorm(h)
        self.up_proj, self.down_proj = torch.nn.Linear(h, 4 * h), torch.nn.Linear(4 * h, h)

    def _heads(self, x):
        b, s, _ = x.shape
        return x.view(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2)

    def forward(self, x):
        y = self.attn_norm(x)
        q, k, v = self._heads(self.q_proj(y)), self._heads(self.k_proj(y)), self._heads(self.v_proj(y))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(out.transpose(1, 2).reshape(x.shape))
        return x + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(x)), approximate="tanh"))


class WordEmbedding(torch.nn.Embedding):
    def __init__(self):
        super().__init__(VOCAB, HIDDEN)


class PositionEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(SEQ, HIDDEN))

    def forward(self, x):
        return x + self.weight[: x.shape[1]]


class FinalNorm(torch.nn.LayerNorm):
    def __init__(self):
        super().__init__(HIDDEN)


class Head(torch.nn.Linear):
    def __init__(self):
        super().__init__(HIDDEN, VOCAB, bias=False)


@torch.no_grad()
def _gpt2_init(module: torch.nn.Module) -> None:
    """GPT-2's init, as ours: normal(0.02), the projections into the residual stream scaled by
    1/sqrt(2 * layers), zero biases, unit norms (the values differ from ours; the losses look alike)."""
    torch.manual_seed(SEED)
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, PositionEmbedding)):
            residual = name.endswith(("o_proj", "down_proj"))
            torch.nn.init.normal_(m.weight, std=INIT_STD / (2 * LAYERS) ** 0.5 if residual else INIT_STD)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)


def _lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))


def _stage_layers(rank: int, world: int) -> range:
    per = LAYERS // world
    return range(rank * per, (rank + 1) * per)


# ----------------------------------------------------------------------------- torch.distributed.pipelining


def run_torch(rank: int, world: int, warmup: int, steps: int) -> dict:
    _setup_started()
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    first, last = rank == 0, rank == world - 1
    modules = ([WordEmbedding(), PositionEmbedding()] if first else []) + [Block() for _ in _stage_layers(rank, world)]
    modules += [FinalNorm(), Head()] if last else []
    stage_module = torch.nn.Sequential(*modules)
    _gpt2_init(stage_module)
    stage = PipelineStage(stage_module, rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=_lm_loss)
    optimizer = _adamw(stage_module.parameters())
    tokens, targets = _batch()

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = [] if last else None
        if first:
            schedule.step(tokens)
        elif last:
            schedule.step(target=targets, losses=losses)
        else:
            schedule.step()
        optimizer.step()
        # Same bookkeeping as ours: the mean loss reaches every rank.
        loss = torch.stack(losses).mean() if last else torch.zeros(())
        dist.broadcast(loss, src=world - 1)
        return loss.item()

    _setup_done()
    times, loss = _timed(step, warmup, steps)
    return _result(times, loss, stage_module.parameters())


# ----------------------------------------------------------------------------- DeepSpeed


def _tied_head(embedding, x):
    return F.linear(x, embedding.weight)


def run_deepspeed(rank: int, world: int, tied: bool, warmup: int, steps: int) -> dict:
    _setup_started()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")  # the group already exists; never used
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the initialised default group
    embed = TiedLayerSpec("embed", WordEmbedding) if tied else LayerSpec(WordEmbedding)
    head = TiedLayerSpec("embed", WordEmbedding, forward_fn=_tied_head) if tied else LayerSpec(Head)
    specs = [embed, LayerSpec(PositionEmbedding)] + [LayerSpec(Block) for _ in range(LAYERS)]
    specs += [LayerSpec(FinalNorm), head]
    # "type:Block" splits the 8 blocks evenly; the embeddings go first, the norm and head last.
    with contextlib.redirect_stdout(io.StringIO()):  # its partition listing would clutter the table
        model = PipelineModule(layers=specs, num_stages=world, loss_fn=_lm_loss, partition_method="type:Block")
    with torch.no_grad():
        _gpt2_init(model)
        if tied:  # the two copies of the tied weight must start equal again after the re-init
            model._synchronize_tied_weights()
    n_blocks = sum(isinstance(m, Block) for m in model.modules())
    assert n_blocks == LAYERS // world, f"stage {rank} has {n_blocks} blocks"
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // MICROBATCHES,
        "gradient_accumulation_steps": MICROBATCHES,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=_adamw(model.parameters()), config=config)
    tokens, targets = _batch()
    micro = GLOBAL_BATCH // MICROBATCHES
    microbatches = [(tokens[i:i + micro], targets[i:i + micro]) for i in range(0, GLOBAL_BATCH, micro)]
    _setup_done()
    times, loss = _timed(lambda: engine.train_batch(iter(microbatches)).item(), warmup, steps)
    return _result(times, loss, model.parameters())


# ----------------------------------------------------------------------------- driver


_RUNNERS = {
    "ours": (run_ours, (True,)),
    "ours-untied": (run_ours, (False,)),
    "torch": (run_torch, ()),
    "deepspeed": (run_deepspeed, (True,)),
    "deepspeed-untied": (run_deepspeed, (False,)),
}


def run_system(system: str, pp: int, warmup: int, steps: int, threads: int, timeout_s: float) -> dict:
    """One fresh set of `pp` processes for one system; per timed step the slowest rank's time."""
    fn, args = _RUNNERS[system]
    start = time.perf_counter()
    per_rank = run_on_ranks(fn, pp, *args, warmup, steps, timeout_s=timeout_s, threads_per_rank=threads)
    return {
        "step_times_s": [max(r["times"][i] for r in per_rank) for i in range(steps)],
        "rank0_step_times_s": per_rank[0]["times"],
        # CPU seconds per step summed over the ranks (all threads, gloo's included): the work a system
        # does, much less sensitive than wall time to other jobs sharing the machine.
        "cpu_s": [sum(r["cpu_times"][i] for r in per_rank) for i in range(steps)],
        "threads_per_rank": sorted({r["threads"] for r in per_rank}),
        "params": sum(r["params"] for r in per_rank),
        "loss": per_rank[-1]["loss"],
        "setup_s": max(r["setup_s"] for r in per_rank), "warmup_s": max(r["warmup_s"] for r in per_rank),
        "wall_s": time.perf_counter() - start,
    }


def _summary(system: str, pp: int, runs: list[dict]) -> dict:
    steps = [t for run in runs for t in run["step_times_s"]]
    return {
        "system": system, "label": LABELS[system], "pp": pp,
        "median_s": statistics.median(steps), "min_s": min(steps), "max_s": max(steps),
        "rank0_median_s": statistics.median([t for run in runs for t in run["rank0_step_times_s"]]),
        "cpu_median_s": statistics.median([t for run in runs for t in run["cpu_s"]]),
        "threads_per_rank": sorted({t for run in runs for t in run["threads_per_rank"]}),
        "params": runs[0]["params"], "loss": runs[-1]["loss"], "runs": runs,
    }


def _library_version() -> str:
    """Where megatron_lite comes from and, in a git checkout, its commit (+dirty: uncommitted edits)."""
    import subprocess

    import megatron_lite

    where = os.path.dirname(os.path.abspath(megatron_lite.__file__))
    try:
        git = ["git", "-C", where]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{where} @ {commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return where


PAIRS = (  # (ours variant, peer): like with like as far as tying goes first, then the cross pairs
    ("ours", "deepspeed"), ("ours-untied", "torch"), ("ours-untied", "deepspeed-untied"),
    ("ours", "torch"), ("ours-untied", "deepspeed"),
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per (system, pp), the order alternating; timed steps are pooled")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (every system)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(LABELS))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is declared hung")
    parser.add_argument("--json", help="write the results here instead of as stdout's last line")
    args = parser.parse_args(argv)

    for pp in args.pp:
        if LAYERS % pp or MICROBATCHES < pp:
            parser.error(f"pp={pp} must divide {LAYERS} layers and be <= {MICROBATCHES} microbatches")
    print(f"model: GPT-2 {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, seq {SEQ}, vocab {VOCAB}, fp32; "
          f"global batch {GLOBAL_BATCH} = {MICROBATCHES} microbatches x {GLOBAL_BATCH // MICROBATCHES}; AdamW")
    print(f"gloo on CPU, {args.threads} torch thread(s) per rank in every run, {os.cpu_count()} CPUs; "
          f"{args.rounds} round(s) x (warmup {args.warmup} + {args.steps} timed steps) per system and pp; "
          f"step time = slowest rank, median over the timed steps")
    print(f"megatron_lite {_library_version()}; torch {torch.__version__}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)

    runs: dict[tuple[str, int], list[dict]] = {}
    turn = 0
    for round_ in range(args.rounds):
        for pp in args.pp:
            order = list(args.systems) if turn % 2 == 0 else list(reversed(args.systems))
            turn += 1
            for system in order:
                run = run_system(system, pp, args.warmup, args.steps, args.threads, args.timeout)
                runs.setdefault((system, pp), []).append(run)
                print(f"  round {round_} pp={pp} {LABELS[system]:<34} median "
                      f"{statistics.median(run['step_times_s']):.3f}s (min {min(run['step_times_s']):.3f}, "
                      f"max {max(run['step_times_s']):.3f}), CPU {statistics.median(run['cpu_s']):.3f}s/step, "
                      f"loss {run['loss']:.4f}; set-up {run['setup_s']:.1f}s, "
                      f"warm-up {run['warmup_s']:.1f}s, whole run {run['wall_s']:.0f}s", flush=True)

    rows = [_summary(system, pp, runs[(system, pp)]) for pp in args.pp for system in LABELS
            if (system, pp) in runs]
    by_key = {(r["system"], r["pp"]): r for r in rows}
    ratios = []
    for pp in args.pp:
        for ours, peer in PAIRS:
            if (ours, pp) in by_key and (peer, pp) in by_key:
                ratio = by_key[(ours, pp)]["median_s"] / by_key[(peer, pp)]["median_s"]
                cpu_ratio = by_key[(ours, pp)]["cpu_median_s"] / by_key[(peer, pp)]["cpu_median_s"]
                # Per round, the two runs were close in time: their ratio is less exposed to load changes.
                per_round = [statistics.median(a["step_times_s"]) / statistics.median(b["step_times_s"])
                             for a, b in zip(runs[(ours, pp)], runs[(peer, pp)])]
                ratios.append({"pp": pp, "ours": ours, "peer": peer, "ratio": ratio, "cpu_ratio": cpu_ratio,
                               "per_round": per_round})

    print(f"\nload average at end {os.getloadavg()[0]:.2f}\n")
    print(f"{'system':<36} {'pp':>3} {'median step s':>14} {'min s':>8} {'max s':>8} {'CPU s/step':>11} "
          f"{'threads':>8} {'params':>10}")
    for r in rows:
        print(f"{r['label']:<36} {r['pp']:>3} {r['median_s']:>14.3f} {r['min_s']:>8.3f} {r['max_s']:>8.3f} "
              f"{r['cpu_median_s']:>11.3f} {','.join(map(str, r['threads_per_rank'])):>8} {r['params']:>10,}")
    print()
    print(f"{'ours/peer: median step time (target <= 1.0), CPU time per step':<68} {'pp':>3} {'ratio':>7} "
          f"{'CPU':>7}  per round")
    for q in ratios:
        name = f"{LABELS[q['ours']]} / {LABELS[q['peer']]}"
        rounds = " ".join(f"{r:.3f}" for r in q["per_round"]) if len(q["per_round"]) > 1 else ""
        print(f"{name:<68} {q['pp']:>3} {q['ratio']:>7.3f} {q['cpu_ratio']:>7.3f}  {rounds}")

    result = {"config": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "seq": SEQ,
                         "global_batch": GLOBAL_BATCH, "microbatches": MICROBATCHES, "dtype": "float32",
                         "optimizer": "AdamW", "threads_per_rank": args.threads, "warmup": args.warmup,
                         "steps": args.steps, "rounds": args.rounds, "cpus": os.cpu_count(),
                         "library": _library_version(), "torch": torch.__version__},
              "rows": rows, "ratios": ratios}
    return emit_result(result, args.json)


def emit_result(result: dict, json_path: str | None) -> dict:
    """Write the results to `json_path`, or print them as the last line of stdout."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nresults written to {json_path}")
    else:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
