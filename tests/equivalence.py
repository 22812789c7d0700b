"""Shared pieces of the serial-equivalence tests: tiny models, a fixed global batch, a serial reference,
and the per-rank routine that gathers full logits, losses, gradients and weights for comparison."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megatron_lite.models.config import BuildOptions, gpt2_config, llama_config
from megatron_lite.models.transformer import WORD_EMBEDDING
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.sharding import ShardSpec, gather_full, spec_of, tp_shard
from megatron_lite.models.partition import build_model_chunks, named_parameters
from megatron_lite.pipeline.schedules import build_schedule, schedule_mapping
from megatron_lite.pipeline.transport import TRANSPORTS
from megatron_lite.training.step import run_schedule, train_step

SEED = 1234
GLOBAL_BATCH, SEQ = 24, 16  # 24 splits into 1, 2, 3, 4, 6 and 8 microbatches
# Vocabulary 101 is prime: every TP > 1 pads it. LLaMA has 2 KV heads, so TP=4 replicates them.
# Eight layers so that PP=4 with two virtual stages still has one layer per chunk. With hidden 16,
# GPT-2's std 0.02 leaves attention almost uniform, so query gradients come out ~1e-5 of the others
# through cancellation and carry the rounding noise of the larger terms; std 0.1 (~0.4/sqrt(hidden))
# keeps every gradient well conditioned enough to be compared at 1e-5.
TINY_MODELS = {
    "gpt2": gpt2_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=SEQ),
    "llama": llama_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          ffn_hidden_size=64, max_seq_len=SEQ),
    "gpt2_deep": gpt2_config(vocab_size=101, hidden_size=16, num_layers=8, num_heads=2, max_seq_len=SEQ,
                              init_std=0.1),
    "llama_deep": llama_config(vocab_size=101, hidden_size=16, num_layers=8, num_heads=2, num_kv_heads=1,
                               ffn_hidden_size=32, max_seq_len=SEQ, init_std=0.1),
    # Mixtral-style: every layer MoE, softmax then top-2, renormalised, balancing and z losses.
    "moe": llama_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        ffn_hidden_size=64, max_seq_len=SEQ, init_std=0.1,
                        moe=dict(num_experts=4, top_k=2, expert_ffn_hidden_size=32, normalize_topk=True,
                                 aux_loss_coeff=0.01, z_loss_coeff=0.001)),
    # Eight experts, top-1, top-k-then-softmax, one shared expert, MoE only in the second layer.
    "moe_e8": llama_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           ffn_hidden_size=64, max_seq_len=SEQ, init_std=0.1,
                           moe=dict(num_experts=8, top_k=1, expert_ffn_hidden_size=16, router_order="topk_softmax",
                                    num_shared_experts=1, layer_freq=2, aux_loss_coeff=0.01, z_loss_coeff=0.001)),
}
_MOE = TINY_MODELS["moe"]
# The same model with the balancing and z losses over the whole global batch (exact for any split).
TINY_MODELS["moe_global"] = _MOE.with_(moe=replace(_MOE.moe, aux_loss_scope="global_batch"))
# Capacity 1.0: experts over their even share of a micro batch's assignments drop the lowest-weight ones.
TINY_MODELS["moe_capacity"] = _MOE.with_(moe=replace(_MOE.moe, capacity_factor=1.0))
# Auxiliary-loss-free balancing: a bias moved 0.01 a step (large, so 3 steps change the routing).
TINY_MODELS["moe_bias"] = _MOE.with_(moe=replace(_MOE.moe, bias_update_rate=0.01, aux_loss_coeff=0.0))
# Adam divides each gradient element by its own magnitude: an element near eps moves by up to lr
# when fp32 summation order changes it in the 8th digit (TP splits the matmul sums). LLaMA's eps
# (1e-5) keeps that amplification of rounding noise below the 1e-5 tolerance; eps=1e-8 does not.
# lr 1e-2 moves every weight by ~1% a step and compounds rounding differences to ~1e-5 by step 3 on
# the 8-rank layout; 1e-3 (a real pre-training rate) keeps them ~1e-6. A layout bug shows as >1e-3.
STEPS, LR, ADAM_EPS = 3, 1e-3, 1e-5
BUCKET_MB = 0.01  # ~2.6k fp32 elements: 2-8 buckets per chunk of the tiny models


@dataclass(frozen=True)
class Case:
    model: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # carved from dp
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    zero1: bool = False
    grad_clip: float | None = None
    receive_lookahead: int | None = None  # None: the executor's default for the backend
    transport: str | None = None  # "nccl": NCCL's in-order rendezvous semantics, emulated on gloo

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        text = f"{self.model} tp={self.tp} pp={self.pp} dp={self.dp}" + (f" ep={self.ep}" if self.ep > 1 else "")
        text += f" m={self.microbatches}"
        if self.pp > 1 or self.virtual_stages > 1 or self.schedule != "1f1b":
            text += f" {self.schedule}" + (f" v={self.virtual_stages}" if self.virtual_stages > 1 else "")
        for flag, label in ((self.sequence_parallel, "sp"), (self.zero1, "zero1")):
            text += f" {label}" if flag else ""
        text += f" recompute={self.recompute}" if self.recompute != "none" else ""
        text += f" clip={self.grad_clip}" if self.grad_clip is not None else ""
        text += f" lookahead={self.receive_lookahead}" if self.receive_lookahead is not None else ""
        text += f" transport={self.transport}" if self.transport is not None else ""
        return text

    @property
    def options(self) -> BuildOptions:
        return BuildOptions(sequence_parallel=self.sequence_parallel, recompute=self.recompute)


def global_batches(vocab: int, steps: int = STEPS):
    generator = torch.Generator().manual_seed(99)
    for _ in range(steps):
        sample = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=generator)
        yield sample[:, :-1], sample[:, 1:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error: robust to individual near-zero entries."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_training(case: Case, layout: ParallelLayout) -> dict:
    """A few AdamW steps; per step the full logits (before the step, without PP), loss, full gradients.

    With DP, each rank trains on its contiguous slice of the global batch; logits are gathered over
    TP (vocabulary) and DP (batch), parameters over TP and PP, so everything compares with one process.
    """
    cfg = TINY_MODELS[case.model]
    chunks = build_model_chunks(cfg, layout, SEED, case.virtual_stages, options=case.options,
                                mapping=schedule_mapping(case.schedule))
    optimizer = make_optimizer(case, chunks, layout)
    plan = build_schedule(case.schedule, layout.pp.size, case.microbatches, case.virtual_stages)
    dp = layout.dp
    record = {"logits": [], "loss": [], "grad_norm": [], "grads": [], "weights": None, "eval_loss": None,
              "moe_terms": [], "moe_dropped": 0, "router_margin": float("inf")}
    watch_router_margins(chunks, record)
    for tokens, targets in global_batches(cfg.vocab_size):
        tokens, targets = tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank]
        if len(chunks) == 1 and layout.pp.size == 1:  # the whole model in one chunk: its output is the logits
            record["logits"].append(_full_logits(chunks[0], tokens, layout))
        transport = TRANSPORTS[case.transport] if case.transport else None
        loss, stats = train_step(chunks, optimizer, tokens, targets, layout, plan, transport=transport)
        record["loss"].append(loss)
        record["grad_norm"].append(stats["grad_norm"])
        record["grads"].append(_full(chunks, layout, reduced_grads(optimizer)))
        record["moe_dropped"] += sum(b.load.dropped for c in chunks for b in getattr(c, "moe_blocks", dict)().values())
        record["moe_terms"].append(_moe_terms(chunks))
    record["weights"] = _full(chunks, layout)
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    with torch.no_grad():  # the trained function, on a batch seen before training
        record["eval_loss"] = run_schedule(chunks, plan, tokens.chunk(dp.size)[dp.rank],
                                           targets.chunk(dp.size)[dp.rank], layout, forward_only=True)
    return record


def watch_router_margins(chunks, record: dict) -> None:
    """Near-ties in top-k: record["router_margin"] becomes the smallest gap, over every token this run
    routes, between its k-th and (k+1)-th routing score (bias included), computed in fp64. A layout's
    rounding moves the scores by ~1e-8; a margin far above that means no choice can flip between layouts,
    so the comparisons are not luck."""
    def hook(router, args, _output):
        moe = router.moe
        if moe.top_k == moe.num_experts or args[0].shape[0] == 0:
            return
        logits = args[0].detach().double() @ router.weight.detach().double().t()
        scores = torch.softmax(logits, dim=-1) if moe.router_order == "softmax_topk" else logits
        if router.expert_bias is not None:
            scores = scores + router.expert_bias.double()
        top = torch.topk(scores, moe.top_k + 1, dim=-1).values
        record["router_margin"] = min(record["router_margin"], (top[:, -2] - top[:, -1]).min().item())

    for chunk in chunks:
        for block in getattr(chunk, "moe_blocks", dict)().values():
            block.router.register_forward_hook(hook)


def _moe_terms(chunks) -> dict[int, tuple[float, float]]:
    """This rank's MoE layers' (balancing, z) losses of the step, averaged over what was summed (micro
    batches, or one global-batch value)."""
    terms = {}
    for chunk in chunks:
        for layer, block in getattr(chunk, "moe_blocks", dict)().items():
            _, sums, summed = block.load.take()
            if summed:
                terms[layer] = tuple((sums / summed).tolist())
    return terms


def make_optimizer(case: Case, chunks, layout):
    """The framework's optimizer; small buckets so that even the tiny models have several (and padding)."""
    config = OptimizerConfig(lr=LR, eps=ADAM_EPS, weight_decay=0.1, grad_clip=case.grad_clip, zero1=case.zero1,
                             bucket_size_mb=BUCKET_MB)
    return build_optimizer(chunks, layout, config)


def _full_logits(model, tokens, layout):
    with torch.no_grad():
        local = model(tokens)
    shape = tuple(local.shape[:-1]) + (model.cfg.vocab_size,)
    spec = ShardSpec(full_shape=shape, shards=(tp_shard(len(shape) - 1, layout.tp, padded_size=local.shape[-1] * layout.tp.size),))
    return comm.all_gather(gather_full(local, spec, layout.tp), layout.dp, dim=0)


@torch.no_grad()
def reduced_grads(optimizer) -> dict[str, torch.Tensor]:
    """Each parameter's final gradient of the last step in a DistributedOptimizer (local TP shard, fp32:
    DP-averaged, summed over TP/tied copies, unscaled, clipped). With ZeRO-1 a rank holds only its shard
    of them, so this all-gathers over DP (a collective): for tests, not for the training loop."""
    grads = {}
    for buffer in optimizer.buffers:
        full = buffer.grad_data
        if optimizer.config.zero1:
            full = buffer.grad_data.clone()
            for bucket in buffer.buckets:
                group = optimizer._groups[bucket.group]
                if group.size > 1:
                    lo, hi = bucket.shard(group.rank, group.size)
                    comm.all_gather_into(full[bucket.start:bucket.end], buffer.grad_data[lo:hi].clone(), group)
        for slot in buffer.slots:
            grads[slot.name] = full[slot.start:slot.end].view(slot.param.shape).clone()
    return grads


def _full(chunks, layout, grads: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full serial tensors of every parameter (or of its gradient, from `grads` by name), from all TP and
    PP ranks."""
    mine = {}
    for name, param in named_parameters(chunks):
        if grads is not None and not param.requires_grad:
            continue  # not trained by gradients (an MoE balancing bias)
        tie = spec_of(param).tie
        key = WORD_EMBEDDING + "@last_stage" if tie is not None and not tie.primary else name
        local = grads[name] if grads is not None else param.data
        mine[key] = gather_full(local, spec_of(param), layout).clone()
    merged = {}
    for part in comm.all_gather_object(mine, layout.pp):
        merged.update(part)
    return merged


def parallel_worker(rank: int, world: int, case: Case):
    if case.receive_lookahead is not None:  # this process only
        from megatron_lite.pipeline import executor
        executor.RECEIVE_LOOKAHEAD = case.receive_lookahead
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=case.tp, pp=case.pp, dp=case.dp, ep=case.ep))
    record = run_training(case, layout)
    return record if rank == 0 else None


def serial_reference(model_name: str, grad_clip: float | None = None, microbatches: int = 1) -> dict:
    """One process, same model and optimizer settings (ZeRO-1 and bucketing are trivial with dp=1).
    An MoE model's balancing loss is defined per micro batch: its reference runs the parallel case's
    micro batch size (dp x m microbatches)."""
    record = run_training(Case(model_name, grad_clip=grad_clip, microbatches=microbatches), ParallelLayout.serial())
    assert record["router_margin"] > ROUTER_MARGIN, (
        f"{model_name}: a token's k-th and (k+1)-th routing scores are {record['router_margin']:.2e} apart: a layout's "
        "rounding (~1e-7 at most) could flip its choice; change the seed or the data")
    return record


# Layouts move the routing scores by ~1e-8 (1e-7 at the very most); the serial reference's top-k choices
# must all be decided by more than this, so that no near-tie can make a comparison pass or fail by luck.
ROUTER_MARGIN = 1e-6


# The key bias cannot change the output (softmax is invariant to adding a constant per query), so
# its gradient is analytically zero and what autograd returns (~1e-11) is rounding noise, whose sign
# Adam then turns into full-size steps. Its gradient is measured against the gradient norm of the
# whole step, and its weights are checked by their effect: the losses after training.
FUNCTION_INVARIANT = ("attention.k_proj.bias",)


def _invariant(name: str) -> bool:
    return name.endswith(FUNCTION_INVARIANT)


def _serial_name(name: str) -> str:
    return name.split("@")[0]


def _grad_error(parallel_step: dict, serial_step: dict) -> float:
    step_norm = torch.stack([g.double().norm() for g in serial_step.values()]).norm()
    errors = []
    for name, value in parallel_step.items():
        reference = serial_step[_serial_name(name)]
        if _invariant(name):
            errors.append(((value - reference).double().norm() / step_norm).item())
        else:
            errors.append(rel_err(value, reference))
    return max(errors)


def _weights_error(parallel: dict, serial: dict) -> float:
    """Relative error of the whole parameter vector after training. Per tensor it is ill-conditioned:
    a zero-initialised bias is nothing but accumulated Adam updates, so its relative error is the
    element-wise rounding noise of its gradients (gradients are compared per tensor above)."""
    names = [n for n in parallel if not _invariant(n)]
    diff = torch.stack([(parallel[n].double() - serial[_serial_name(n)].double()).norm() for n in names]).norm()
    return (diff / torch.stack([serial[_serial_name(n)].double().norm() for n in names]).norm()).item()


def compare(parallel: dict, serial: dict) -> dict[str, float]:
    """Largest relative error per quantity over all steps (and all parameters)."""
    names = {_serial_name(n) for n in parallel["weights"]}
    assert names == set(serial["weights"]), f"parameter names differ: {names ^ set(serial['weights'])}"
    errors = {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(parallel["loss"], serial["loss"])),
        "grads": max(_grad_error(p, s) for p, s in zip(parallel["grads"], serial["grads"])),
        "weights": _weights_error(parallel["weights"], serial["weights"]),
        "eval_loss": abs(parallel["eval_loss"] - serial["eval_loss"]) / abs(serial["eval_loss"]),
        "grad_norm": max(abs(a - b) / abs(b) for a, b in zip(parallel["grad_norm"], serial["grad_norm"])),
    }
    if parallel["logits"]:
        errors["logits"] = max(rel_err(a, b) for a, b in zip(parallel["logits"], serial["logits"]))
    return errors
