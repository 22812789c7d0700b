"""Shared pieces of the serial-equivalence tests: tiny models, a fixed global batch, a serial reference,
and the per-rank routine that gathers full logits, losses, gradients and weights for comparison."""

from __future__ import annotations

import torch

from megatron_lite.models.config import gpt2_config, llama_config
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.sharding import ShardSpec, gather_full, spec_of
from megatron_lite.training.step import train_step

SEED = 1234
GLOBAL_BATCH, SEQ = 8, 16
# Vocabulary 101 is prime: every TP > 1 pads it. LLaMA has 2 KV heads, so TP=4 replicates them.
TINY_MODELS = {
    "gpt2": gpt2_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=SEQ),
    "llama": llama_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          ffn_hidden_size=64, max_seq_len=SEQ),
}
# Adam divides each gradient element by its own magnitude: an element near eps moves by up to lr
# when fp32 summation order changes it in the 8th digit (TP splits the matmul sums). LLaMA's eps
# (1e-5) keeps that amplification of rounding noise below the 1e-5 tolerance; eps=1e-8 does not.
STEPS, LR, ADAM_EPS = 3, 1e-2, 1e-5


def global_batches(vocab: int, steps: int = STEPS):
    generator = torch.Generator().manual_seed(99)
    for _ in range(steps):
        sample = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=generator)
        yield sample[:, :-1], sample[:, 1:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error: robust to individual near-zero entries."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_training(model_name: str, layout: ParallelLayout, microbatches: int = 1) -> dict:
    """A few AdamW steps; per step the full logits (before the step), loss and full gradients.

    With DP, each rank trains on its contiguous slice of the global batch; logits are gathered
    over TP (vocabulary) and DP (batch) so the result is comparable with one process.
    """
    cfg = TINY_MODELS[model_name]
    model = build_model(cfg, layout, seed=SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.1)
    dp = layout.dp
    record = {"logits": [], "loss": [], "grads": [], "weights": None}
    for tokens, targets in global_batches(cfg.vocab_size):
        tokens, targets = tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank]
        with torch.no_grad():
            local_logits = model(tokens)
        logits = gather_full(local_logits, _logits_spec(model, local_logits, cfg.vocab_size, layout), layout.tp)
        record["logits"].append(comm.all_gather(logits, dp, dim=0))
        record["loss"].append(train_step(model, optimizer, tokens, targets, layout, microbatches))
        record["grads"].append(_full(model, layout, grads=True))
    record["weights"] = _full(model, layout, grads=False)
    tokens, _ = next(global_batches(cfg.vocab_size, steps=1))
    with torch.no_grad():
        local_logits = model(tokens.chunk(dp.size)[dp.rank])
    logits = gather_full(local_logits, _logits_spec(model, local_logits, cfg.vocab_size, layout), layout.tp)
    record["logits"].append(comm.all_gather(logits, dp, dim=0))  # after the last step: the trained function
    return record


def _logits_spec(model, local_logits, vocab_size, layout):
    shape = tuple(local_logits.shape[:-1]) + (vocab_size,)
    return ShardSpec(full_shape=shape, dim=len(shape) - 1, num_chunks=layout.tp.size, chunk_index=layout.tp.rank,
                     padded_size=local_logits.shape[-1] * layout.tp.size)


def _full(model, layout, grads: bool) -> dict[str, torch.Tensor]:
    return {
        name: gather_full(param.grad if grads else param.data, spec_of(param), layout.tp).clone()
        for name, param in model.named_parameters()
    }


def parallel_worker(rank: int, world: int, model_name: str, tp: int, dp: int, microbatches: int):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, dp=dp))
    record = run_training(model_name, layout, microbatches)
    return record if rank == 0 else None


def serial_reference(model_name: str) -> dict:
    return run_training(model_name, ParallelLayout.serial())


# The key bias cannot change the output (softmax is invariant to adding a constant per query), so
# its gradient is analytically zero and what autograd returns (~1e-11) is rounding noise, whose sign
# Adam then turns into full-size steps. Its gradient is measured against the gradient norm of the
# whole step, and its weights are checked by their effect: the logits after training.
FUNCTION_INVARIANT = ("attention.k_proj.bias",)


def _invariant(name: str) -> bool:
    return name.endswith(FUNCTION_INVARIANT)


def _grad_error(parallel_step: dict, serial_step: dict) -> float:
    step_norm = torch.stack([g.double().norm() for g in serial_step.values()]).norm()
    errors = []
    for name, reference in serial_step.items():
        if _invariant(name):
            errors.append(((parallel_step[name] - reference).double().norm() / step_norm).item())
        else:
            errors.append(rel_err(parallel_step[name], reference))
    return max(errors)


def compare(parallel: dict, serial: dict) -> dict[str, float]:
    """Largest relative error per quantity over all steps (and all parameters)."""
    assert set(parallel["weights"]) == set(serial["weights"]), "parameter names differ between layouts"
    return {
        "logits": max(rel_err(a, b) for a, b in zip(parallel["logits"], serial["logits"])),
        "loss": max(abs(a - b) / abs(b) for a, b in zip(parallel["loss"], serial["loss"])),
        "grads": max(_grad_error(p, s) for p, s in zip(parallel["grads"], serial["grads"])),
        "weights": max(rel_err(parallel["weights"][n], w) for n, w in serial["weights"].items() if not _invariant(n)),
    }
