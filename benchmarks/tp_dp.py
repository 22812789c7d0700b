"""Our TP=2 against megatron-core's tensor-parallel layers; our DP=2 and ZeRO-1 against DeepSpeed's.

The small GPT-2 of the pipeline benchmark (8 layers, hidden 256, 4 heads, sequence 128, vocabulary
1024, tied embeddings, fp32), global batch 16 in micro batches of 8, AdamW (decay on matrices and
embeddings only), gloo on CPU, 2 processes, the same torch thread count on every rank. Every system
runs in its own set of processes (one `run_on_ranks` call each) within one invocation; the order of
the systems alternates between rounds.

TP=2 (2 microbatches of 8, gradient accumulation):
  ours       `build_model_chunks` + `build_optimizer` + `train_step` with tp=2
  megatron   the same GPT from megatron-core 0.16's `VocabParallelEmbedding`, `ColumnParallelLinear`
             (fused QKV, MLP up, tied output layer), `RowParallelLinear` and `vocab_parallel_cross_entropy`
             (use_cpu_initialization, no gradient-accumulation fusion, no sequence parallelism), SDPA
             for the attention core as ours, [s, b, h] activations as Megatron, torch.optim.AdamW
  dtensor    (used when megatron-core is not installed, or asked for) plain torch GPT-2 blocks with
             torch.distributed.tensor.parallel.parallelize_module (Colwise q/k/v/up, Rowwise o/down,
             vocabulary-parallel embedding and head, loss_parallel), torch.optim.AdamW
DP=2 (one micro batch of 8 per rank), the same model and code on both sides (our TransformerStage):
  ours-dp / ours-zero1        our DistributedOptimizer (bucketed all-reduce / reduce-scatter overlapped
                              with backward; ZeRO-1 shards master weights and moments), 25 MB buckets
  deepspeed-z0 / deepspeed-z1 `deepspeed.initialize` through megatron_lite.optim.deepspeed_backend
                              (ZeRO stage 0 / 1, torch AdamW, same 25 MB buckets), DS_ACCELERATOR=cpu

A timed step is forward + backward of every microbatch + gradient reduction + optimizer step + the
loss reaching every rank, between two barriers; per step the slowest rank, then the median over the
timed steps. Next to it: CPU seconds per step summed over the ranks (other jobs on the machine disturb
it much less than wall time), and the seconds spent in each system's `step()` call (ours: waiting for
the DP buckets, TP/clip bookkeeping, AdamW; DeepSpeed: its ZeRO step, since it reduces in backward;
megatron / dtensor: torch AdamW).

    python benchmarks/tp_dp.py [--steps 10] [--warmup 3] [--rounds 1] [--systems ...] [--json out.json]

megatron-core is not a dependency of the project; install it for this benchmark only:
    .venv/bin/pip install -c constraints.txt megatron-core==0.16.1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

# DeepSpeed picks its accelerator at import time; it is imported lazily, in its own processes only.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import StepTimer, emit_result, library_version, pair_groups, run_group, summarize  # noqa: E402
from pipeline_1f1b import (GLOBAL_BATCH, HEADS, HIDDEN, INIT_STD, LAYERS, LR, SEED, SEQ, VOCAB,  # noqa: E402
                           WEIGHT_DECAY, _batch, torch_adamw)

WORLD, MICRO_BATCH = 2, 8
TP_MICROBATCHES = GLOBAL_BATCH // MICRO_BATCH  # TP=2, DP=1: accumulate over 2 micro batches of 8
DP_MICROBATCHES = GLOBAL_BATCH // (MICRO_BATCH * WORLD)  # DP=2: one micro batch of 8 per rank
BUCKET_MB = 25.0

SYSTEMS = ("ours-tp", "megatron-tp", "ours-dp", "deepspeed-z0", "ours-zero1", "deepspeed-z1")
LABELS = {
    "ours-tp": "megatron_lite TP=2",
    "megatron-tp": "megatron-core 0.16 TP=2 layers",
    "dtensor-tp": "DTensor parallelize_module TP=2",
    "ours-dp": "megatron_lite DP=2",
    "deepspeed-z0": "DeepSpeed DP=2 ZeRO-0",
    "ours-zero1": "megatron_lite DP=2 ZeRO-1",
    "deepspeed-z1": "DeepSpeed DP=2 ZeRO-1",
}
PAIRS = (("ours-tp", "megatron-tp"), ("ours-tp", "dtensor-tp"), ("ours-dp", "deepspeed-z0"),
         ("ours-zero1", "deepspeed-z1"))


def _gpt2_config():
    from megatron_lite.models.config import gpt2_config

    return gpt2_config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, max_seq_len=SEQ,
                       init_std=INIT_STD)


def _local_batch(dp_rank: int, dp_size: int):
    tokens, targets = _batch()
    return tokens.chunk(dp_size)[dp_rank], targets.chunk(dp_size)[dp_rank]


# ----------------------------------------------------------------------------- ours


def build_ours(rank: int, world: int, tp: int, zero1: bool) -> dict:
    from megatron_lite.optim import OptimizerConfig, build_optimizer
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.training.step import train_step

    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, dp=world // tp), retain_host_memory=True)
    chunks = build_model_chunks(_gpt2_config(), layout, SEED)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY, zero1=zero1,
                                                                bucket_size_mb=BUCKET_MB))
    timer = optimizer.step = StepTimer(optimizer.step)
    microbatches = TP_MICROBATCHES if tp > 1 else DP_MICROBATCHES
    plan = build_schedule("1f1b", 1, microbatches)
    tokens, targets = _local_batch(layout.dp.rank, layout.dp.size)

    def step():
        return train_step(chunks, optimizer, tokens, targets, layout, plan)[0]

    return {"step": step, "timer": timer, "params": sum(p.numel() for p in chunks[0].parameters())}


# ----------------------------------------------------------------------------- DeepSpeed (same model)


def build_deepspeed(rank: int, world: int, stage: int) -> dict:
    from megatron_lite.optim import OptimizerConfig
    from megatron_lite.optim.deepspeed_backend import build_deepspeed_engine, deepspeed_train_step
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.models.partition import build_model_chunks

    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated collective names
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world), retain_host_memory=True)
    chunks = build_model_chunks(_gpt2_config(), layout, SEED)
    engine = build_deepspeed_engine(chunks, layout, OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY,
                                                                    bucket_size_mb=BUCKET_MB),
                                    zero_stage=stage, microbatches=DP_MICROBATCHES, micro_batch_size=MICRO_BATCH)
    timer = engine.step = StepTimer(engine.step)
    tokens, targets = _local_batch(layout.dp.rank, layout.dp.size)

    def step():
        return deepspeed_train_step(engine, tokens, targets, layout, DP_MICROBATCHES)

    return {"step": step, "timer": timer, "params": sum(p.numel() for p in chunks[0].parameters())}


# ----------------------------------------------------------------------------- megatron-core TP layers


def _megatron_gpt(config, tp: int) -> torch.nn.Module:
    """GPT-2 from megatron-core's tensor-parallel layers; activations [s, b, h] as in Megatron."""
    from megatron.core import tensor_parallel
    from megatron.core.utils import init_method_normal, scaled_init_method_normal

    init, out_init = init_method_normal(INIT_STD), scaled_init_method_normal(INIT_STD, LAYERS)
    head_dim, local_heads = HIDDEN // HEADS, HEADS // tp

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            column = dict(config=config, init_method=init, bias=True, gather_output=False)
            row = dict(config=config, init_method=out_init, bias=True, input_is_parallel=True, skip_bias_add=False)
            self.attn_norm = torch.nn.LayerNorm(HIDDEN)
            self.qkv = tensor_parallel.ColumnParallelLinear(HIDDEN, 3 * HIDDEN, **column)
            self.o_proj = tensor_parallel.RowParallelLinear(HIDDEN, HIDDEN, **row)
            self.mlp_norm = torch.nn.LayerNorm(HIDDEN)
            self.up_proj = tensor_parallel.ColumnParallelLinear(HIDDEN, 4 * HIDDEN, **column)
            self.down_proj = tensor_parallel.RowParallelLinear(4 * HIDDEN, HIDDEN, **row)

        def forward(self, x):  # [s, b, h]
            s, b, _ = x.shape
            qkv, _ = self.qkv(self.attn_norm(x))
            q, k, v = qkv.view(s, b, local_heads, 3 * head_dim).permute(1, 2, 0, 3).split(head_dim, dim=-1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, s, d]
            attn, _ = self.o_proj(out.permute(2, 0, 1, 3).reshape(s, b, local_heads * head_dim))
            x = x + attn
            hidden, _ = self.up_proj(self.mlp_norm(x))
            mlp, _ = self.down_proj(F.gelu(hidden, approximate="tanh"))
            return x + mlp

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word = tensor_parallel.VocabParallelEmbedding(VOCAB, HIDDEN, init_method=init, config=config)
            self.position = torch.nn.Parameter(torch.randn(SEQ, HIDDEN) * INIT_STD)
            self.layers = torch.nn.ModuleList([Block() for _ in range(LAYERS)])
            self.final_norm = torch.nn.LayerNorm(HIDDEN)
            # Tied output layer, as Megatron's GPTModel: the embedding weight passed in at forward.
            self.output = tensor_parallel.ColumnParallelLinear(HIDDEN, VOCAB, config=config, init_method=init,
                                                               bias=False, skip_weight_param_allocation=True)

        def forward(self, tokens, targets):  # [b, s] -> mean loss
            x = (self.word(tokens) + self.position[: tokens.shape[1]]).transpose(0, 1).contiguous()
            for layer in self.layers:
                x = layer(x)
            logits, _ = self.output(self.final_norm(x), weight=self.word.weight)  # [s, b, vocab / tp]
            return tensor_parallel.vocab_parallel_cross_entropy(logits, targets.t().contiguous()).mean()

    return GPT()


def build_megatron(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex are not installed|CUDA_DEVICE_MAX_CONNECTIONS).*")
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                                 gradient_accumulation_fusion=False, sequence_parallel=False,
                                 params_dtype=torch.float32)
    torch.manual_seed(SEED)  # same full weights on every rank; each keeps its shard
    model = _megatron_gpt(config, world)
    optimizer = torch_adamw(model.parameters())
    timer = optimizer.step = StepTimer(optimizer.step)
    tokens, targets = _batch()
    micro = [(tokens[i:i + MICRO_BATCH], targets[i:i + MICRO_BATCH]) for i in range(0, GLOBAL_BATCH, MICRO_BATCH)]

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for tok, tgt in micro:
            loss = model(tok, tgt)
            (loss / len(micro)).backward()
            total += loss.detach()
        optimizer.step()
        return (total / len(micro)).item()

    return {"step": step, "timer": timer, "params": sum(p.numel() for p in model.parameters()),
            "close": parallel_state.destroy_model_parallel}


# ----------------------------------------------------------------------------- DTensor TP


def build_dtensor(rank: int, world: int) -> dict:
    """Plain torch GPT-2 (the pipeline benchmark's modules) split by parallelize_module."""
    from pipeline_1f1b import Block, FinalNorm, PositionEmbedding, WordEmbedding, _gpt2_init
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                                   parallelize_module)

    head_dim = HIDDEN // HEADS

    class TPBlock(Block):
        """The pipeline benchmark's block, with as many heads as the local q/k/v columns hold."""

        def forward(self, x):
            b, s, _ = x.shape
            y = self.attn_norm(x)
            q, k, v = (proj(y).view(b, s, -1, head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
            return x + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(x)), approximate="tanh"))

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word, self.position = WordEmbedding(), PositionEmbedding()
            self.layers = torch.nn.ModuleList([TPBlock() for _ in range(LAYERS)])
            self.final_norm = FinalNorm()
            self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
            self.head.weight = self.word.weight  # tied

        def forward(self, tokens):
            x = self.position(self.word(tokens))
            for layer in self.layers:
                x = layer(x)
            return self.head(self.final_norm(x))

    mesh = init_device_mesh("cpu", (world,))
    model = GPT()
    _gpt2_init(model)
    plan = {"word": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(LAYERS):
        plan.update({f"layers.{i}.{name}": ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj", "up_proj")})
        plan.update({f"layers.{i}.{name}": RowwiseParallel() for name in ("o_proj", "down_proj")})
    parallelize_module(model, mesh, plan)
    model.head.weight = model.word.weight  # parallelize_module replaced both; both are Shard(0): tie again
    optimizer = torch_adamw(model.parameters())
    timer = optimizer.step = StepTimer(optimizer.step)
    tokens, targets = _batch()
    micro = [(tokens[i:i + MICRO_BATCH], targets[i:i + MICRO_BATCH]) for i in range(0, GLOBAL_BATCH, MICRO_BATCH)]

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for tok, tgt in micro:
            logits = model(tok)
            with loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1), tgt.reshape(-1))
                (loss / len(micro)).backward()
            total += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
        optimizer.step()
        return (total / len(micro)).item()

    params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return {"step": step, "timer": timer, "params": params}


# ----------------------------------------------------------------------------- driver


_BUILDERS = {
    "ours-tp": (build_ours, (WORLD, False)),
    "megatron-tp": (build_megatron, ()),
    "dtensor-tp": (build_dtensor, ()),
    "ours-dp": (build_ours, (1, False)),
    "deepspeed-z0": (build_deepspeed, (0,)),
    "ours-zero1": (build_ours, (1, True)),
    "deepspeed-z1": (build_deepspeed, (1,)),
}


def _megatron_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per system, the order alternating; timed steps are pooled")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (every system)")
    parser.add_argument("--systems", nargs="+", choices=list(LABELS),
                        help="default: all, with dtensor-tp in place of megatron-tp when megatron-core is missing")
    parser.add_argument("--paired", action="store_true",
                        help="run each compared pair in one set of processes, their steps alternating (A B B A ...), "
                             "so that both see the same load on a shared machine")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is declared hung")
    parser.add_argument("--json", help="write the results here instead of as stdout's last line")
    args = parser.parse_args(argv)

    systems = list(args.systems or SYSTEMS)
    if "megatron-tp" in systems and not _megatron_available():
        if args.systems:
            parser.error("megatron-core is not installed: pip install -c constraints.txt megatron-core==0.16.1, "
                         "or use --systems ... dtensor-tp")
        print("megatron-core is not installed: TP=2 is compared with DTensor parallelize_module instead")
        systems[systems.index("megatron-tp")] = "dtensor-tp"

    print(f"model: GPT-2 {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, seq {SEQ}, vocab {VOCAB}, tied, fp32; "
          f"global batch {GLOBAL_BATCH}: TP=2 {TP_MICROBATCHES} microbatches x {MICRO_BATCH}, DP=2 "
          f"{DP_MICROBATCHES} x {MICRO_BATCH} per rank; AdamW")
    print(f"gloo on CPU, {WORLD} processes, {args.threads} torch thread(s) per rank in every run, {os.cpu_count()} "
          f"CPUs; {args.rounds} round(s) x (warmup {args.warmup} + {args.steps} timed steps) per system"
          f"{', compared pairs in the same processes, steps alternating' if args.paired else ''}; step time = "
          f"slowest rank, median over the timed steps")
    versions = [f"torch {torch.__version__}"]
    for package in ("megatron-core", "deepspeed"):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001 - not installed
            pass
    print(f"megatron_lite {library_version()}; {'; '.join(versions)}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)

    groups = pair_groups(systems, PAIRS, args.paired)
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for group in groups if round_ % 2 == 0 else [g[::-1] for g in reversed(groups)]:
            specs = [(system, *_BUILDERS[system]) for system in group]
            for system, run in run_group(specs, WORLD, args.warmup, args.steps, args.threads, args.timeout).items():
                runs.setdefault(system, []).append(run)
                print(f"  round {round_} {LABELS[system]:<32} median {statistics.median(run['step_times_s']):.3f}s "
                      f"(min {min(run['step_times_s']):.3f}, max {max(run['step_times_s']):.3f}), CPU "
                      f"{statistics.median(run['cpu_s']):.3f}s/step, step() "
                      f"{statistics.median(run['step_call_s']):.3f}s, loss {run['loss']:.4f}; set-up "
                      f"{run['setup_s']:.1f}s, warm-up {run['warmup_s']:.1f}s, whole run {run['wall_s']:.0f}s", flush=True)

    rows = [summarize(system, LABELS[system], runs[system]) for system in LABELS if system in runs]
    by_system = {r["system"]: r for r in rows}
    ratios = []
    for ours, peer in PAIRS:
        if ours in by_system and peer in by_system:
            a, b = by_system[ours], by_system[peer]
            ratios.append({"ours": ours, "peer": peer, "ratio": a["median_s"] / b["median_s"],
                           "cpu_ratio": a["cpu_median_s"] / b["cpu_median_s"],
                           "paired": peer in a["runs"][0]["paired_with"]})

    print(f"\nload average at end {os.getloadavg()[0]:.2f}\n")
    print(f"{'system':<34} {'median step s':>14} {'min s':>7} {'max s':>7} {'CPU s/step':>11} {'step() s':>9} "
          f"{'threads':>8} {'params/rank':>12} {'loss':>7}")
    for r in rows:
        print(f"{r['label']:<34} {r['median_s']:>14.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['cpu_median_s']:>11.3f} {r['step_call_median_s']:>9.3f} "
              f"{','.join(map(str, r['threads_per_rank'])):>8} {r['params_per_rank']:>12,} {r['loss']:>7.4f}")
    print()
    print(f"{'ours/reference, median step time (target <= 1.0); CPU time per step':<70} {'ratio':>7} {'CPU':>7}")
    for q in ratios:
        name = LABELS[q["ours"]] + " / " + LABELS[q["peer"]] + (" *" if q["paired"] else "")
        print(f"{name:<70} {q['ratio']:>7.3f} {q['cpu_ratio']:>7.3f}")
    if any(q["paired"] for q in ratios):
        print("* measured in the same processes, steps alternating")

    result = {"config": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "seq": SEQ,
                         "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "tp_microbatches": TP_MICROBATCHES,
                         "dp_microbatches": DP_MICROBATCHES, "dtype": "float32", "optimizer": "AdamW",
                         "bucket_size_mb": BUCKET_MB, "world": WORLD, "threads_per_rank": args.threads,
                         "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "paired": args.paired,
                         "cpus": os.cpu_count(),
                         "library": library_version(), "versions": versions},
              "rows": rows, "ratios": ratios}
    return emit_result(result, args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
