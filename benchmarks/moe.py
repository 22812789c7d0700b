"""Our MoE block against transformers' Mixtral block (one process), and our expert parallelism against
EP1 and DeepSpeed's MoE layer (2 gloo ranks), in a layer step and in our training step, with the
all-to-all's share of the step.

Block (one process, `--threads` torch threads): E=8 experts, top-2, Mixtral routing (fp32 softmax over
all experts, top-k, the k weights renormalised to sum to 1), SwiGLU experts, no auxiliary loss, fp32,
hidden 512, expert ffn 1024, 4096 tokens (`--small`: hidden 64, ffn 128, 256 tokens). Every system gets
the same weights and tokens; before any timing each system's output and gradients (input, router,
experts) are checked against ours (max |a - b| / max |b| < 1e-5), so all compute the same function:
  ours            megatron_lite.layers.moe.MoEBlock, torch._grouped_mm experts (grouped_mm: true)
  ours-loop       the same block with a per-expert loop (grouped_mm: false)
  hf-eager        transformers' MixtralSparseMoeBlock with experts_implementation="eager": the class's own
                  forward (a loop over the experts hit, one_hot masks, index_add_), what the block runs
                  standalone
  hf-grouped-mm   the same block with experts_implementation="grouped_mm" (what a Mixtral model built by
                  transformers picks by default: sort by expert, torch._grouped_mm on the fused gate_up_proj)
A timed call is forward + backward (a fixed output gradient, parameter gradients set to None first); the
systems alternate (A B C D, D C B A, ...), and the table shows the median over `--repeats` calls. Three
extra calls per system under torch.profiler give the share of its CPU time spent in matrix products,
and from it the "matmul floor": our matrix products' time over the peer's whole call (the ratio if all
else cost nothing).

EP (2 processes, gloo, one thread each, `--ep-tokens` tokens per rank, same sizes): one step of the MoE
layer: forward + backward on this rank's tokens, then the gradient averaging the layout needs (router
over DP=2; experts over expert-DP: DP=2 at EP1, nothing at EP2), one flat all_reduce each, the same code
for every system. The three systems run in the same processes, their steps alternating (`--rounds`:
fresh processes, the order reversed every other round, steps pooled):
  ours-ep1        MoEBlock with dp=2, ep=1: every rank holds all 8 experts, no all-to-all
  ours-ep2        MoEBlock with dp=2, ep=2: 4 experts per rank, counts exchange + two variable-size
                  all-to-alls forward (and two backward) through parallel/comm.py
  deepspeed-ep2   deepspeed.moe.layer.MoE(ep_size=2, k=2, drop_tokens=False, use_rts=False,
                  top2_2nd_expert_sampling=False): the same dropless Mixtral routing, DS_ACCELERATOR=cpu;
                  its experts are the same SwiGLU as torch.nn.Linear modules
Each rank also checks its output against a serial MoEBlock with the full weights. All-to-all time: the
benchmark wraps (in its own processes only) comm.all_to_all (called by all_to_all_rows forward and
backward) and comm.exchange_counts for ours, deepspeed.comm.all_to_all_single and the capacity
all_reduce (its counterpart of our counts exchange) for DeepSpeed, and adds the seconds spent inside
them per step: the slowest rank's, a wall time that includes waiting for the other rank.

Training step (2 processes, gloo, one thread each): megatron_lite's own train_step (build_model_chunks,
build_optimizer, AdamW; dp=2, one micro batch of 8 sequences per rank) of a LLaMA-style model, 2 layers,
hidden 256, 4 heads, sequence 128, vocabulary 1024, every feed-forward layer the MoE above (E=8, top-2,
expert ffn 512, balancing loss 0.01), at ep=1 (ours-ep1-train: the expert gradients averaged over DP by
the optimizer) and ep=2 (ours-ep2-train), alternating in the same processes; the all-to-all is timed as
above, and both must reach the same loss after the same steps.

    python benchmarks/moe.py [--repeats 10] [--steps 10] [--rounds 1] [--small] [--parts block ep train]
                             [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

# DeepSpeed picks its accelerator at import time; it is imported lazily, in the EP processes only.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_result, library_version, run_group, summarize  # noqa: E402

EXPERTS, TOP_K, SEED, STD = 8, 2, 0, 0.02
SIZES = {"default": {"hidden": 512, "ffn": 1024, "tokens": 4096},
         "small": {"hidden": 64, "ffn": 128, "tokens": 256}}
TOLERANCE = 1e-5
WORLD = 2
# The training-step part: a LLaMA-style model, every feed-forward layer this MoE, one micro batch per rank.
TRAIN = {"vocab": 1024, "layers": 2, "heads": 4, "seq": 128}
SIZES["default"].update(train_hidden=256, train_ffn=512, train_batch=16)
SIZES["small"].update(train_hidden=64, train_ffn=128, train_batch=4)

BLOCK_SYSTEMS = ("ours", "ours-loop", "hf-eager", "hf-grouped-mm")
EP_SYSTEMS = ("ours-ep1", "ours-ep2", "deepspeed-ep2")
TRAIN_SYSTEMS = ("ours-ep1-train", "ours-ep2-train")
LABELS = {
    "ours": "megatron_lite MoEBlock (grouped_mm)",
    "ours-loop": "megatron_lite MoEBlock (loop)",
    "hf-eager": "transformers Mixtral block (eager)",
    "hf-grouped-mm": "transformers Mixtral block (grouped_mm)",
    "ours-ep1": "megatron_lite DP2 EP1",
    "ours-ep2": "megatron_lite DP2 EP2",
    "deepspeed-ep2": "DeepSpeed MoE EP2",
    "ours-ep1-train": "megatron_lite train_step DP2 EP1",
    "ours-ep2-train": "megatron_lite train_step DP2 EP2",
}


# ----------------------------------------------------------------------------- weights and tokens


def full_weights(hidden: int, ffn: int) -> dict[str, torch.Tensor]:
    """The serial weights every system loads: router [E, h], gate/up [E, f, h], down [E, h, f]."""
    g = torch.Generator().manual_seed(SEED)
    normal = lambda *shape: torch.randn(*shape, generator=g) * STD  # noqa: E731
    return {"router": normal(EXPERTS, hidden), "gate": normal(EXPERTS, ffn, hidden),
            "up": normal(EXPERTS, ffn, hidden), "down": normal(EXPERTS, hidden, ffn)}


def token_batch(tokens: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [1, tokens, hidden] (unit scale, like a normed residual stream) and the output gradient."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(1, tokens, hidden, generator=g), torch.randn(1, tokens, hidden, generator=g) / tokens


def our_block(w: dict, tp, ep, grouped_mm: bool = True):
    """MoEBlock with Mixtral routing holding this EP rank's experts of `w`."""
    from megatron_lite.layers.moe import MoEBlock
    from megatron_lite.models.config import llama_config

    hidden, ffn = w["router"].shape[1], w["gate"].shape[1]
    cfg = llama_config(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=4, ffn_hidden_size=ffn,
                       moe=dict(num_experts=EXPERTS, top_k=TOP_K, expert_ffn_hidden_size=ffn,
                                router_order="softmax_topk", normalize_topk=True, aux_loss_coeff=0.0,
                                z_loss_coeff=0.0, grouped_mm=grouped_mm))
    block = MoEBlock(cfg, tp, ep, sequence_parallel=False, layer_std=STD)
    local = EXPERTS // ep.size
    mine = slice(ep.rank * local, (ep.rank + 1) * local)
    with torch.no_grad():
        block.router.weight.copy_(w["router"])
        block.experts.gate_proj.copy_(w["gate"][mine])
        block.experts.up_proj.copy_(w["up"][mine])
        block.experts.down_proj.copy_(w["down"][mine])
    return block


def serial_block(w: dict, grouped_mm: bool = True):
    from megatron_lite.parallel.layout import ParallelLayout

    serial = ParallelLayout.serial()
    return our_block(w, serial.tp, serial.group("ep"), grouped_mm)


def hf_block(w: dict, implementation: str):
    """transformers' MixtralSparseMoeBlock with `w`: gate_up_proj = [gate; up] along dim 1."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hidden, ffn = w["router"].shape[1], w["gate"].shape[1]
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOP_K, router_jitter_noise=0.0, hidden_act="silu",
                           experts_implementation=implementation)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(w["router"])
        block.experts.gate_up_proj.copy_(torch.cat([w["gate"], w["up"]], dim=1))
        block.experts.down_proj.copy_(w["down"])
    return block


def gradients_in_our_layout(module) -> dict[str, torch.Tensor]:
    """Parameter gradients of any system, named and shaped as ours (router, gate, up, down)."""
    if hasattr(module, "router"):  # ours
        e = module.experts
        return {"router": module.router.weight.grad, "gate": e.gate_proj.grad, "up": e.up_proj.grad,
                "down": e.down_proj.grad}
    gate, up = module.experts.gate_up_proj.grad.chunk(2, dim=1)
    return {"router": module.gate.weight.grad, "gate": gate, "up": up, "down": module.experts.down_proj.grad}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def forward_backward(module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    out = module(x)
    if isinstance(out, tuple):  # DeepSpeed's MoE returns (output, l_aux, expert counts)
        out = out[0]
    out.backward(grad)
    return out.detach(), x.grad


# ----------------------------------------------------------------------------- block, one process


def matmul_share(fn, calls: int = 3) -> float:
    """Share of `calls` calls' self CPU time spent in matrix products (what both sides cannot avoid)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return matmul / total if total else float("nan")


def run_block(size: dict, repeats: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    w = full_weights(size["hidden"], size["ffn"])
    x, grad = token_batch(size["tokens"], size["hidden"], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = {"ours": serial_block(w, True), "ours-loop": serial_block(w, False),
                   "hf-eager": hf_block(w, "eager"), "hf-grouped-mm": hf_block(w, "grouped_mm")}

    # Equivalence first: the same function, or the timing means nothing.
    ref_out, ref_x_grad = forward_backward(modules["ours"], x, grad)
    ref_grads = gradients_in_our_layout(modules["ours"])
    checks = {}
    for name, module in modules.items():
        out, x_grad = forward_backward(module, x, grad)
        diffs = {"output": rel_diff(out, ref_out), "input_grad": rel_diff(x_grad, ref_x_grad)}
        diffs.update({f"{k}_grad": rel_diff(g, ref_grads[k]) for k, g in gradients_in_our_layout(module).items()})
        checks[name] = {"max_rel_diff": max(diffs.values()), "diffs": diffs, "passed": max(diffs.values()) < TOLERANCE}
    if not all(c["passed"] for c in checks.values()):
        raise AssertionError(f"the systems do not compute the same function: {checks}")

    names = list(modules)
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for name in names:
        for _ in range(warmup):
            forward_backward(modules[name], x, grad)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            forward_backward(modules[name], x, grad)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    shares = {name: matmul_share(lambda m=modules[name]: forward_backward(m, x, grad)) for name in names}
    rows = [{"system": name, "label": LABELS[name], "median_s": statistics.median(times[name]),
             "min_s": min(times[name]), "max_s": max(times[name]), "cpu_median_s": statistics.median(cpu[name]),
             "matmul_share": shares[name], "times_s": times[name], "check": checks[name]} for name in names]
    by = {r["system"]: r for r in rows}
    # matmul_floor: ours' matrix products alone over the peer's whole call, the ratio with no other work
    # (CPU times: one thread, so the same work as wall time, without the time other jobs take the core).
    ratios = [{"ours": ours, "peer": peer, "ratio": by[ours]["median_s"] / by[peer]["median_s"],
               "cpu_ratio": by[ours]["cpu_median_s"] / by[peer]["cpu_median_s"],
               "matmul_floor": by[ours]["cpu_median_s"] * by[ours]["matmul_share"] / by[peer]["cpu_median_s"]}
              for ours, peer in (("ours", "hf-grouped-mm"), ("ours", "hf-eager"), ("ours-loop", "hf-eager"),
                                 ("ours", "ours-loop"))]
    return {"rows": rows, "ratios": ratios, "threads": threads, "repeats": repeats, "warmup": warmup,
            "equivalence_passed": True}


# ----------------------------------------------------------------------------- EP, 2 ranks


class CollectiveTimer:
    """Seconds spent inside the wrapped collectives while its system steps (harness resets `seconds`
    before each timed step and reads it after, as for a StepTimer)."""

    active: "CollectiveTimer | None" = None

    def __init__(self):
        self.seconds = 0.0

    @staticmethod
    def wrap(owner, name: str) -> None:
        fn = getattr(owner, name)
        if getattr(fn, "_timed", False):
            return

        def timed(*args, **kwargs):
            timer = CollectiveTimer.active
            if timer is None:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start

        timed._timed = True
        setattr(owner, name, timed)


def _ep_step(module, x, grad, params, reductions, timer):
    """One MoE layer step: forward + backward, then each (params, group) gradient set averaged with one
    flat all_reduce (an optimizer would read them next)."""

    def step():
        CollectiveTimer.active = timer
        try:
            out, _ = forward_backward(module, x, grad)
        finally:
            CollectiveTimer.active = None
        for group_params, group in reductions:
            grads = [p.grad for p in group_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat /= dist.get_world_size(group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return float((out * grad).sum())

    return {"step": step, "timer": timer, "params": sum(p.numel() for p in params)}


def _check_against_serial(module, w, x, grad) -> float:
    out, _ = forward_backward(module, x, grad)
    serial, _ = forward_backward(serial_block(w), x, grad)
    return rel_diff(out, serial)


def build_ours_ep(rank: int, world: int, ep: int, size: dict) -> dict:
    from megatron_lite.parallel import comm
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes

    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world, ep=ep), retain_host_memory=True)
    w = full_weights(size["hidden"], size["ffn"])
    block = our_block(w, layout.tp, layout.group("ep"))
    x, grad = token_batch(size["ep_tokens"], size["hidden"], seed=1 + rank)
    for name in ("all_to_all", "exchange_counts"):
        CollectiveTimer.wrap(comm, name)
    experts = list(block.experts.parameters())
    edp = layout.group("edp")  # the ranks holding the same experts: dp at EP1, this rank alone at EP2
    reductions = [([block.router.weight], layout.dp.group)] + ([(experts, edp.group)] if edp.size > 1 else [])
    built = _ep_step(block, x, grad, [block.router.weight, *experts], reductions, CollectiveTimer())
    built["check"] = _check_against_serial(block, w, x, grad)
    return built


def build_deepspeed_ep(rank: int, world: int, size: dict) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megatron_lite.optim.deepspeed_backend import import_deepspeed

    deepspeed = import_deepspeed()
    import deepspeed.comm
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    hidden, ffn = size["hidden"], size["ffn"]

    class SwiGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(hidden, ffn, bias=False)
            self.up = torch.nn.Linear(hidden, ffn, bias=False)
            self.down = torch.nn.Linear(ffn, hidden, bias=False)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    moe = MoE(hidden, SwiGLU(), num_experts=EXPERTS, ep_size=world, k=TOP_K, drop_tokens=False, use_rts=False,
              top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    w = full_weights(hidden, ffn)
    local = EXPERTS // world
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(w["router"])
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            e = rank * local + i  # DeepSpeed places expert e on EP rank e // local
            expert.gate.weight.copy_(w["gate"][e])
            expert.up.weight.copy_(w["up"][e])
            expert.down.weight.copy_(w["down"][e])
    for name in ("all_to_all_single", "all_reduce"):  # sharded_moe calls them as deepspeed.comm.<name>
        CollectiveTimer.wrap(deepspeed.comm, name)
    x, grad = token_batch(size["ep_tokens"], hidden, seed=1 + rank)
    gate = [moe.deepspeed_moe.gate.wg.weight]
    experts = [p for n, p in moe.named_parameters() if "deepspeed_experts" in n]
    built = _ep_step(moe, x, grad, gate + experts, [(gate, None)], CollectiveTimer())
    built["check"] = _check_against_serial(moe, w, x, grad)
    return built


def train_model_config(size: dict):
    """A small LLaMA-style model whose feed-forward layers are all this MoE (aux loss 0.01, as moe_tiny)."""
    from megatron_lite.models.config import llama_config

    return llama_config(vocab_size=TRAIN["vocab"], hidden_size=size["train_hidden"], num_layers=TRAIN["layers"],
                        num_heads=TRAIN["heads"], ffn_hidden_size=size["train_ffn"], max_seq_len=TRAIN["seq"],
                        moe=dict(num_experts=EXPERTS, top_k=TOP_K, expert_ffn_hidden_size=size["train_ffn"],
                                 router_order="softmax_topk", normalize_topk=True, aux_loss_coeff=0.01))


def build_ours_train(rank: int, world: int, ep: int, size: dict) -> dict:
    """megatron_lite's own training step (build_model_chunks + build_optimizer + train_step, AdamW), dp=2."""
    from megatron_lite.optim import OptimizerConfig, build_optimizer
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.parallel import comm
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
    from megatron_lite.pipeline.schedules import build_schedule
    from megatron_lite.training.step import train_step

    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world, ep=ep), retain_host_memory=True)
    chunks = build_model_chunks(train_model_config(size), layout, SEED)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-4))
    for name in ("all_to_all", "exchange_counts"):
        CollectiveTimer.wrap(comm, name)
    timer = CollectiveTimer()
    g = torch.Generator().manual_seed(SEED)
    batch = size["train_batch"]
    data = torch.randint(0, TRAIN["vocab"], (batch, TRAIN["seq"] + 1), generator=g)
    local = data.chunk(world)[rank]
    tokens, targets = local[:, :-1].contiguous(), local[:, 1:].contiguous()
    plan = build_schedule("1f1b", 1, 1)

    def step():
        CollectiveTimer.active = timer
        try:
            return train_step(chunks, optimizer, tokens, targets, layout, plan)[0]
        finally:
            CollectiveTimer.active = None

    return {"step": step, "timer": timer, "params": sum(p.numel() for p in chunks[0].parameters())}


_EP_BUILDERS = {"ours-ep1": (build_ours_ep, (1,)), "ours-ep2": (build_ours_ep, (2,)),
                "deepspeed-ep2": (build_deepspeed_ep, ()),
                "ours-ep1-train": (build_ours_train, (1,)), "ours-ep2-train": (build_ours_train, (2,))}


def run_ep(systems: list[str], size: dict, steps: int, warmup: int, rounds: int, timeout_s: float) -> dict:
    """`rounds` fresh sets of processes, the systems' order reversed every other round; steps pooled."""
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for round_ in range(rounds):
        order = systems if round_ % 2 == 0 else systems[::-1]
        specs = [(name, _EP_BUILDERS[name][0], (*_EP_BUILDERS[name][1], size)) for name in order]
        for name, run in run_group(specs, WORLD, warmup, steps, threads=1, timeout_s=timeout_s).items():
            runs[name].append(run)
            print(f"  round {round_} {LABELS[name]:<34} median {statistics.median(run['step_times_s']):.4f}s, CPU "
                  f"{statistics.median(run['cpu_s']):.4f}s/step, all-to-all {statistics.median(run['step_call_s']):.4f}s",
                  flush=True)
    rows = []
    for name in systems:
        row = summarize(name, LABELS[name], runs[name])
        row["all_to_all_median_s"] = row.pop("step_call_median_s")
        row["all_to_all_share"] = row["all_to_all_median_s"] / row["median_s"]
        checks = [c for run in runs[name] for c in run["checks"] if c is not None]
        row["check_max_rel_diff"] = max(checks) if checks else None
        rows.append(row)
    by = {r["system"]: r for r in rows}
    # round_ratios: each round's two runs, which shared the processes and the machine's load.
    ratios = [{"ours": ours, "peer": peer, "ratio": by[ours]["median_s"] / by[peer]["median_s"],
               "cpu_ratio": by[ours]["cpu_median_s"] / by[peer]["cpu_median_s"],
               "round_ratios": [statistics.median(a["step_times_s"]) / statistics.median(b["step_times_s"])
                                for a, b in zip(runs[ours], runs[peer])]}
              for ours, peer in (("ours-ep2", "ours-ep1"), ("ours-ep2", "deepspeed-ep2"),
                                 ("ours-ep2-train", "ours-ep1-train")) if ours in by and peer in by]
    return {"rows": rows, "ratios": ratios, "steps": steps, "warmup": warmup, "rounds": rounds, "world": WORLD,
            "threads_per_rank": 1,
            "equivalence_passed": all(r["check_max_rel_diff"] is None or r["check_max_rel_diff"] < TOLERANCE
                                      for r in rows)}


# ----------------------------------------------------------------------------- driver


def _print_ep(ep: dict) -> None:
    print(f"{'system':<34} {'median s':>9} {'min s':>7} {'max s':>7} {'CPU s':>7} {'all-to-all s':>13} "
          f"{'share':>6} {'rel diff':>9}")
    for r in ep["rows"]:
        check = "-" if r["check_max_rel_diff"] is None else f"{r['check_max_rel_diff']:.1e}"
        print(f"{r['label']:<34} {r['median_s']:>9.4f} {r['min_s']:>7.4f} {r['max_s']:>7.4f} "
              f"{r['cpu_median_s']:>7.4f} {r['all_to_all_median_s']:>13.4f} {r['all_to_all_share']:>6.1%} {check:>9}")
    print(f"\n{'ratio, median step time (pooled); CPU time; per round':<80} {'ratio':>7} {'CPU':>7}  rounds")
    for q in ep["ratios"]:
        print(f"{_pair_label(q):<80} {q['ratio']:>7.3f} {q['cpu_ratio']:>7.3f}  "
              f"{' '.join(f'{r:.3f}' for r in q['round_ratios'])}")


def _pair_label(q: dict) -> str:
    return f"{LABELS[q['ours']]} / {LABELS[q['peer']]}"


def _deepspeed_available() -> str | None:
    """None if deepspeed imports, else why not."""
    try:
        import importlib

        importlib.import_module("deepspeed.moe.layer")
        return None
    except Exception as exc:  # noqa: BLE001 - the reason is reported
        return f"{type(exc).__name__}: {exc}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("block", "ep", "train"), default=["block", "ep", "train"])
    parser.add_argument("--small", action="store_true", help="hidden 64, ffn 128, 256 tokens: a smoke run")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward+backward calls per block system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (block) / steps (EP) per system")
    parser.add_argument("--steps", type=int, default=10, help="timed EP steps per system")
    parser.add_argument("--rounds", type=int, default=1,
                        help="EP: fresh process sets, the order of the systems reversed every other round; steps pooled")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the block benchmark")
    parser.add_argument("--ep-tokens", type=int, help="tokens per rank in the EP part (default: the block's)")
    parser.add_argument("--ep-systems", nargs="+", choices=EP_SYSTEMS, default=list(EP_SYSTEMS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the EP run is declared hung")
    parser.add_argument("--json", help="write the results here instead of as stdout's last line")
    args = parser.parse_args(argv)

    size = dict(SIZES["small" if args.small else "default"])
    size["ep_tokens"] = args.ep_tokens or size["tokens"]
    versions = [f"torch {torch.__version__}"]
    from importlib.metadata import PackageNotFoundError, version

    for package in ("transformers", "deepspeed"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    print(f"MoE: E={EXPERTS}, top-{TOP_K}, softmax then top-k renormalised (Mixtral), SwiGLU experts, fp32, "
          f"hidden {size['hidden']}, expert ffn {size['ffn']}; {os.cpu_count()} CPUs")
    print(f"megatron_lite {library_version()}; {'; '.join(versions)}; load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    result: dict = {"config": {"experts": EXPERTS, "top_k": TOP_K, **size, "dtype": "float32", "cpus": os.cpu_count(),
                               "small": args.small, "library": library_version(), "versions": versions}}

    if "block" in args.parts:
        print(f"\nblock, one process, {args.threads} thread(s), {size['tokens']} tokens: forward + backward, "
              f"median of {args.repeats} (after {args.warmup} warm-up), systems alternating")
        block = result["block"] = run_block(size, args.repeats, args.warmup, args.threads)
        print(f"{'system':<42} {'median s':>9} {'min s':>7} {'max s':>7} {'CPU s':>7} {'matmul':>7} {'max rel diff':>13}")
        for r in block["rows"]:
            print(f"{r['label']:<42} {r['median_s']:>9.4f} {r['min_s']:>7.4f} {r['max_s']:>7.4f} "
                  f"{r['cpu_median_s']:>7.4f} {r['matmul_share']:>7.1%} {r['check']['max_rel_diff']:>13.1e}")
        print(f"\n{'ratio, median time (goal: ours / transformers <= 0.7)':<80} {'ratio':>7} {'CPU':>7} "
              f"{'matmul floor':>13}")
        for q in block["ratios"]:
            print(f"{_pair_label(q):<80} {q['ratio']:>7.3f} {q['cpu_ratio']:>7.3f} {q['matmul_floor']:>13.3f}")
        print("CPU: ratio of CPU seconds (one thread: the work, without the time other jobs hold the core); matmul "
              "floor: our call's matrix-product CPU time alone over the peer's whole call")

    if "ep" in args.parts:
        systems = list(args.ep_systems)
        reason = _deepspeed_available() if "deepspeed-ep2" in systems else None
        if reason:
            print(f"\nDeepSpeed's MoE is not available ({reason}): EP2 is compared with EP1 only")
            systems.remove("deepspeed-ep2")
        print(f"\nEP, {WORLD} gloo processes x 1 thread, {size['ep_tokens']} tokens per rank: forward + backward + "
              f"gradient averaging, slowest rank, median of {args.rounds} x {args.steps} steps (after {args.warmup} "
              f"each), systems alternating in the same processes", flush=True)
        ep = result["ep"] = run_ep(systems, size, args.steps, args.warmup, args.rounds, args.timeout)
        ep["deepspeed_unavailable"] = reason
        _print_ep(ep)
        if not ep["equivalence_passed"]:
            raise AssertionError(f"an EP system differs from the serial block: "
                                 f"{[(r['system'], r['check_max_rel_diff']) for r in ep['rows']]}")

    if "train" in args.parts:
        print(f"\ntraining step, {WORLD} gloo processes x 1 thread: LLaMA-style, {TRAIN['layers']} layers, hidden "
              f"{size['train_hidden']}, every FFN this MoE (expert ffn {size['train_ffn']}, aux loss 0.01), seq "
              f"{TRAIN['seq']}, {size['train_batch'] // WORLD} sequences per rank, AdamW; train_step, slowest rank, "
              f"median of {args.rounds} x {args.steps} steps (after {args.warmup} each)", flush=True)
        train = result["train"] = run_ep(list(TRAIN_SYSTEMS), size, args.steps, args.warmup, args.rounds, args.timeout)
        losses = [r["loss"] for r in train["rows"]]
        train["loss_rel_diff"] = abs(losses[1] - losses[0]) / abs(losses[0])
        train["equivalence_passed"] = train["loss_rel_diff"] < TOLERANCE
        _print_ep(train)
        print(f"loss after the same steps: EP1 {losses[0]:.6f}, EP2 {losses[1]:.6f}")
        if not train["equivalence_passed"]:
            raise AssertionError(f"EP1 and EP2 trained differently: losses {losses}")

    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    return emit_result(result, args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
