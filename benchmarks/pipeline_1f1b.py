"""Our 1F1B pipeline vs torch.distributed.pipelining's Schedule1F1B and DeepSpeed's PipelineEngine.

Same GPT-2 (8 layers, hidden 256, 4 heads, sequence 128, vocabulary 1024, fp32), global batch 16 in
8 microbatches of 2, AdamW (decay on matrices and embeddings only), the 8 blocks split evenly over
the stages, gloo on CPU, one process per stage, the same torch thread count on every rank. Every
system runs in its own set of processes within one invocation, or with --paired each compared pair
shares one set of processes and their steps alternate (A B B A ...), so that the machine's drifting
load hits both alike; the order alternates between pipeline sizes and rounds.

A timed step is forward + backward over all microbatches + gradient finalisation + optimizer step +
the loss reaching every rank, between two barriers; per step we take the slowest rank, then the
median over the timed steps. Next to it: CPU seconds per step summed over the ranks, which other jobs
on the machine disturb much less than wall time.

Tied embeddings: ours and DeepSpeed (TiedLayerSpec) tie the input and output embedding across the
pipeline ends (one all-reduce of its gradient per step); torch.distributed.pipelining cannot tie
across stages, so the torch model is untied and is compared with our untied model.
Optimizer: ours is the library's own (flat fp32 buffers, PyTorch's fused AdamW kernel) when it has one, the
peers use torch.optim.AdamW (DeepSpeed wraps it) with the same hyperparameters and decay groups.

    python benchmarks/pipeline_1f1b.py [--pp 2 4] [--steps 10] [--warmup 3] [--rounds 1] [--paired] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import warnings

# DeepSpeed picks its accelerator at import time; it is imported lazily, in its own processes only.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (StepTimer, emit_result, library_version, pair_groups, ratio_interval, run_group,  # noqa: E402
                     summarize)

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


def torch_adamw(params) -> torch.optim.Optimizer:
    """The peers' torch AdamW; like ours, matrices and embeddings are decayed, biases and norm weights
    (every 1-D parameter) not."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR)


# ----------------------------------------------------------------------------- ours


def build_ours(rank: int, world: int, tied: bool) -> dict:
    from megatron_lite.models.config import gpt2_config
    from megatron_lite.optim.optimizer import OptimizerConfig, build_optimizer
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.training.step import train_step

    layout = ParallelLayout.from_mesh(ParallelSizes(pp=world), retain_host_memory=True)
    cfg = gpt2_config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                      max_seq_len=SEQ, tie_embeddings=tied)
    chunks = build_model_chunks(cfg, layout, SEED)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY))
    timer = optimizer.step = StepTimer(optimizer.step)
    plan = build_schedule("1f1b", world, MICROBATCHES)
    tokens, targets = _batch()

    def step():
        return train_step(chunks, optimizer, tokens, targets, layout, plan)[0]

    return {"step": step, "timer": timer, "params": sum(p.numel() for c in chunks for p in c.parameters())}


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


def build_torch(rank: int, world: int) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    first, last = rank == 0, rank == world - 1
    modules = ([WordEmbedding(), PositionEmbedding()] if first else []) + [Block() for _ in _stage_layers(rank, world)]
    modules += [FinalNorm(), Head()] if last else []
    stage_module = torch.nn.Sequential(*modules)
    _gpt2_init(stage_module)
    stage = PipelineStage(stage_module, rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=_lm_loss)
    optimizer = torch_adamw(stage_module.parameters())
    timer = optimizer.step = StepTimer(optimizer.step)
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

    return {"step": step, "timer": timer, "params": sum(p.numel() for p in stage_module.parameters())}


# ----------------------------------------------------------------------------- DeepSpeed


def _tied_head(embedding, x):
    return F.linear(x, embedding.weight)


def build_deepspeed(rank: int, world: int, tied: bool) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")  # the group already exists; never used
    from megatron_lite.optim.deepspeed_backend import import_deepspeed

    deepspeed = import_deepspeed()
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    # DeepSpeed's own broadcast of the tied weight is part of its autograd graph; torch warns on every backward.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch_adamw(model.parameters()), config=config)
    tokens, targets = _batch()
    micro = GLOBAL_BATCH // MICROBATCHES
    microbatches = [(tokens[i:i + micro], targets[i:i + micro]) for i in range(0, GLOBAL_BATCH, micro)]
    return {"step": lambda: engine.train_batch(iter(microbatches)).item(),
            "params": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- driver


_BUILDERS = {
    "ours": (build_ours, (True,)),
    "ours-untied": (build_ours, (False,)),
    "torch": (build_torch, ()),
    "deepspeed": (build_deepspeed, (True,)),
    "deepspeed-untied": (build_deepspeed, (False,)),
}

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
    parser.add_argument("--paired", action="store_true",
                        help="run each compared pair in one set of processes, their steps alternating (A B B A ...), "
                             "so that both see the same load on a shared machine")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is declared hung")
    parser.add_argument("--json", help="write the results here instead of as stdout's last line")
    args = parser.parse_args(argv)

    for pp in args.pp:
        if LAYERS % pp or MICROBATCHES < pp:
            parser.error(f"pp={pp} must divide {LAYERS} layers and be <= {MICROBATCHES} microbatches")
    print(f"model: GPT-2 {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, seq {SEQ}, vocab {VOCAB}, fp32; "
          f"global batch {GLOBAL_BATCH} = {MICROBATCHES} microbatches x {GLOBAL_BATCH // MICROBATCHES}; AdamW")
    print(f"gloo on CPU, {args.threads} torch thread(s) per rank in every run, {os.cpu_count()} CPUs; "
          f"{args.rounds} round(s) x (warmup {args.warmup} + {args.steps} timed steps) per system and pp"
          f"{', compared pairs in the same processes, steps alternating' if args.paired else ''}; "
          f"step time = slowest rank, median over the timed steps")
    print(f"megatron_lite {library_version()}; torch {torch.__version__}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)

    groups = pair_groups(args.systems, PAIRS, args.paired)
    runs: dict[tuple[str, int], list[dict]] = {}
    turn = 0
    for round_ in range(args.rounds):
        for pp in args.pp:
            order = groups if turn % 2 == 0 else [g[::-1] for g in reversed(groups)]
            turn += 1
            for group in order:
                specs = [(system, *_BUILDERS[system]) for system in group]
                for system, run in run_group(specs, pp, args.warmup, args.steps, args.threads, args.timeout).items():
                    runs.setdefault((system, pp), []).append(run)
                    print(f"  round {round_} pp={pp} {LABELS[system]:<34} median "
                          f"{statistics.median(run['step_times_s']):.3f}s (min {min(run['step_times_s']):.3f}, "
                          f"max {max(run['step_times_s']):.3f}), CPU {statistics.median(run['cpu_s']):.3f}s/step, "
                          f"loss {run['loss']:.4f}; set-up {run['setup_s']:.1f}s, "
                          f"warm-up {run['warmup_s']:.1f}s, whole run {run['wall_s']:.0f}s", flush=True)

    rows = [summarize(system, LABELS[system], runs[(system, pp)], pp=pp) for pp in args.pp for system in LABELS
            if (system, pp) in runs]
    by_key = {(r["system"], r["pp"]): r for r in rows}
    ratios = []
    for pp in args.pp:
        for ours, peer in PAIRS:
            if (ours, pp) in by_key and (peer, pp) in by_key:
                ratio = by_key[(ours, pp)]["median_s"] / by_key[(peer, pp)]["median_s"]
                cpu_ratio = by_key[(ours, pp)]["cpu_median_s"] / by_key[(peer, pp)]["cpu_median_s"]
                # Per round, the two runs were close in time (or, paired, in the same processes).
                per_round = [statistics.median(a["step_times_s"]) / statistics.median(b["step_times_s"])
                             for a, b in zip(runs[(ours, pp)], runs[(peer, pp)])]
                ratios.append({"pp": pp, "ours": ours, "peer": peer, "ratio": ratio, "cpu_ratio": cpu_ratio,
                               "per_round": per_round, "interval": ratio_interval(runs[(ours, pp)], runs[(peer, pp)]),
                               "paired": peer in runs[(ours, pp)][0]["paired_with"]})

    print(f"\nload average at end {os.getloadavg()[0]:.2f}\n")
    print(f"{'system':<36} {'pp':>3} {'median step s':>14} {'min s':>8} {'max s':>8} {'CPU s/step':>11} "
          f"{'threads':>8} {'params':>10}")
    for r in rows:
        print(f"{r['label']:<36} {r['pp']:>3} {r['median_s']:>14.3f} {r['min_s']:>8.3f} {r['max_s']:>8.3f} "
              f"{r['cpu_median_s']:>11.3f} {','.join(map(str, r['threads_per_rank'])):>8} {r['params']:>10,}")
    print()
    print(f"{'ours/peer: median step time (target <= 1.0), CPU time per step':<68} {'pp':>3} {'ratio':>7} "
          f"{'CPU':>7} {'95% interval':>13}  per round")
    for q in ratios:
        name = f"{LABELS[q['ours']]} / {LABELS[q['peer']]}{' *' if q['paired'] else ''}"
        rounds = " ".join(f"{r:.3f}" for r in q["per_round"]) if len(q["per_round"]) > 1 else ""
        interval = "{:.3f}-{:.3f}".format(*q["interval"]) if q["interval"] else "-"
        print(f"{name:<68} {q['pp']:>3} {q['ratio']:>7.3f} {q['cpu_ratio']:>7.3f} {interval:>13}  {rounds}")
    if any(q["paired"] for q in ratios):
        print("* measured in the same processes, steps alternating")
    print("95% interval: the rounds resampled (bootstrap), with 3 rounds or more")

    result = {"config": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "seq": SEQ,
                         "global_batch": GLOBAL_BATCH, "microbatches": MICROBATCHES, "dtype": "float32",
                         "optimizer": "AdamW", "threads_per_rank": args.threads, "warmup": args.warmup,
                         "steps": args.steps, "rounds": args.rounds, "paired": args.paired, "cpus": os.cpu_count(),
                         "library": library_version(), "torch": torch.__version__},
              "rows": rows, "ratios": ratios}
    return emit_result(result, args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
