"""Ignored targets (-100): the loss of a step is the mean over the valid targets of the whole global batch,
in every layout, as `F.cross_entropy(ignore_index=-100)` of a plain serial model on that batch.

The reference is independent of the step code: full serial logits, PyTorch's cross-entropy and autograd.
The batches are made so that a per-microbatch or per-rank mean would be visibly wrong: the number of
valid targets differs a lot between microbatches, and in one batch a whole DP share (and so a whole
microbatch) has none.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from equivalence import _full, _grad_error, reduced_grads
from megatron_lite.layers.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from megatron_lite.models.config import gpt2_config
from megatron_lite.models.partition import build_model_chunks, named_parameters
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.training.step import run_schedule, train_step

TOLERANCE = 1e-5
SEED, BATCH, SEQ, MICROBATCHES = 7, 8, 16, 2  # 8 rows: 4 per DP rank, 2 per microbatch at dp=2
# Vocabulary 101 is prime, so TP=2 pads it; std 0.1 spreads the per-token losses (see equivalence.py),
# which the negative control needs: with near-uniform logits every token's loss is log(101).
CFG = gpt2_config(vocab_size=101, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=SEQ, init_std=0.1)


# ----------------------------------------------------------------------------- the cross-entropy itself


def _ce_case(vocab: int, local_vocab: int, tp: int, ignore_index: int):
    """Full logits padded to tp * local_vocab (the padding holds large values, which must not count),
    targets over the whole vocabulary (both TP halves, the last id), some ignored, one row entirely."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, tp * local_vocab, generator=generator) * 3
    logits[..., vocab:] = 50.0
    targets = torch.randint(0, vocab, (3, 5), generator=generator)
    targets[0, 1], targets[2, 4] = vocab - 1, 0
    targets[1] = ignore_index
    targets[0, 3] = targets[2, 0] = ignore_index
    grad_out = torch.rand(3, 5, generator=generator) + 0.5
    return logits, targets, grad_out


def _reference_ce(logits, targets, grad_out, vocab, ignore_index):
    full = logits[..., :vocab].clone().requires_grad_()
    loss = F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                           reduction="none").view(targets.shape)
    (loss * grad_out).sum().backward()
    grad = torch.cat([full.grad, torch.zeros_like(logits[..., vocab:])], dim=-1)  # padding: no gradient
    return loss.detach(), grad


def _ce_on_rank(logits, targets, grad_out, tp_group, vocab, local_vocab, ignore_index):
    start = tp_group.rank * local_vocab
    local = logits[..., start:start + local_vocab].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, tp_group, start, vocab, ignore_index=ignore_index)
    (loss * grad_out).sum().backward()
    return loss.detach(), local.grad


def _ce_worker(rank, world, vocab, local_vocab, ignore_index):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=world))
    logits, targets, grad_out = _ce_case(vocab, local_vocab, world, ignore_index)
    loss, grad = _ce_on_rank(logits, targets, grad_out, layout.tp, vocab, local_vocab, ignore_index)
    ref_loss, ref_grad = _reference_ce(logits, targets, grad_out, vocab, ignore_index)
    return loss, grad, ref_loss, ref_grad[..., rank * local_vocab:(rank + 1) * local_vocab], targets


def _check_ce(loss, grad, ref_loss, ref_grad, targets, ignore_index):
    ignored = targets == ignore_index
    assert loss.shape == targets.shape  # per token, not reduced
    assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored]))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))  # the whole row, not just the target
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ignore_index", [IGNORE_INDEX, 7])  # 7: a real id, inside TP rank 0's columns
def test_cross_entropy_ignores_targets_tp1(ignore_index):
    vocab, local_vocab = 101, 104  # tp=1 with padding columns, as a padded head would give
    logits, targets, grad_out = _ce_case(vocab, local_vocab, 1, ignore_index)
    loss, grad = _ce_on_rank(logits, targets, grad_out, ParallelLayout.serial().tp, vocab, local_vocab, ignore_index)
    _check_ce(loss, grad, *_reference_ce(logits, targets, grad_out, vocab, ignore_index), targets, ignore_index)


@pytest.mark.parametrize("ignore_index", [IGNORE_INDEX, 7])
def test_cross_entropy_ignores_targets_tp2_padded_vocab(ignore_index):
    vocab, local_vocab = 257, 129  # 257 over TP=2: rank 1 holds one padding column
    for result in run_on_ranks(_ce_worker, 2, vocab, local_vocab, ignore_index, timeout_s=60):
        _check_ce(*result, ignore_index)


# ----------------------------------------------------------------------------- whole train steps


def _serial_model():
    return build_model_chunks(CFG, ParallelLayout.serial(), SEED)[0]


def _serial_logits(tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _serial_model()(tokens)[..., :CFG.vocab_size].float()


@functools.lru_cache(maxsize=None)
def batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ragged: rows 0-1 (DP rank 0's first microbatch at dp=2) keep one valid target, the one with the
    largest serial loss, so a per-microbatch mean weights it as much as ~30 others; the other rows
    are ignored at random rates from 0 to ~90%.
    empty_share: rows 4-7 (DP rank 1's whole share; the serial run's second microbatch) and rows 0-1
    (rank 0's first microbatch at dp=2) have no valid target; rows 2-3 some.
    all_ignored: no valid target anywhere."""
    generator = torch.Generator().manual_seed(11)
    sample = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=generator)
    tokens, targets = sample[:, :-1].contiguous(), sample[:, 1:].contiguous()
    rates = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.0, 0.3, 0.7, 0.1]).unsqueeze(1)
    ragged = targets.masked_fill(torch.rand(BATCH, SEQ, generator=generator) < rates, IGNORE_INDEX)
    losses = F.cross_entropy(_serial_logits(tokens).flatten(0, 1), targets.flatten(), reduction="none").view(BATCH, SEQ)
    keep = losses[:2].flatten().argmax()
    ragged[keep // SEQ, keep % SEQ] = targets[keep // SEQ, keep % SEQ]
    empty = targets.masked_fill(torch.rand(BATCH, SEQ, generator=generator) < 0.4, IGNORE_INDEX)
    empty[:2] = empty[4:] = IGNORE_INDEX
    return {"ragged": (tokens, ragged), "empty_share": (tokens, empty),
            "all_ignored": (tokens, torch.full_like(targets, IGNORE_INDEX))}


def serial_reference(tokens, targets) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain serial model: PyTorch's mean over the valid targets, and its autograd gradients."""
    model = _serial_model()
    logits = model(tokens)[..., :CFG.vocab_size].float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in named_parameters([model])}


def _step_worker(rank, world, sizes: ParallelSizes | None, batch_items):
    """Per batch, from the same initial weights: the forward-only (validation) loss, then one train step's
    loss and final gradients (DP-averaged, TP/tie-summed), gathered to full serial tensors."""
    layout = ParallelLayout.from_mesh(sizes) if sizes is not None else ParallelLayout.serial()
    plan = build_schedule("1f1b", layout.pp.size, MICROBATCHES)
    dp = layout.dp
    results = {}
    for name, (tokens, targets) in batch_items:
        chunks = build_model_chunks(CFG, layout, SEED)
        optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-3, bucket_size_mb=0.01))
        tokens, targets = tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank]
        with torch.no_grad():
            eval_loss = run_schedule(chunks, plan, tokens, targets, layout, forward_only=True)
        loss, _ = train_step(chunks, optimizer, tokens, targets, layout, plan)
        results[name] = (eval_loss, loss, _full(chunks, layout, reduced_grads(optimizer)))
    return results if rank == 0 else None


def _rel(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


LAYOUTS = {
    "serial": None,
    "dp2": ParallelSizes(dp=2),
    "pp2": ParallelSizes(pp=2),
    "tp2": ParallelSizes(tp=2),
    "tp2xpp2xdp2": ParallelSizes(tp=2, pp=2, dp=2),
}


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_train_step_loss_is_the_global_mean_over_valid_targets(layout_name):
    sizes = LAYOUTS[layout_name]
    items = list(batches().items())
    if sizes is None:
        results = _step_worker(0, 1, None, items)
    else:
        world = sizes.tp * sizes.pp * sizes.dp
        results = run_on_ranks(_step_worker, world, sizes, items, timeout_s=120)[0]
    for name, (tokens, targets) in items:
        eval_loss, loss, grads = results[name]
        ref_loss, ref_grads = serial_reference(tokens, targets)
        if name == "all_ignored":
            # PyTorch's mean is 0/0; the step defines the loss as 0 with no gradient.
            assert math.isnan(ref_loss)
            assert loss == 0.0 and eval_loss == 0.0
            assert all(torch.count_nonzero(g) == 0 for g in grads.values()), name
            continue
        assert _rel(loss, ref_loss) < TOLERANCE, (name, loss, ref_loss)
        assert _rel(eval_loss, ref_loss) < TOLERANCE, (name, eval_loss, ref_loss)
        assert _grad_error(grads, ref_grads) < TOLERANCE, name


def _naive(per_token: torch.Tensor, valid: torch.Tensor, dp: int, microbatches: int) -> float:
    """The rule the step must not use: each microbatch's own mean over its valid targets, averaged over
    the microbatches and then over the DP ranks."""
    means = [(l[v].sum() / v.sum()).item()
             for share_l, share_v in zip(per_token.chunk(dp), valid.chunk(dp))
             for l, v in zip(share_l.chunk(microbatches), share_v.chunk(microbatches))]
    return sum(means) / len(means)


def test_negative_control_per_microbatch_means_differ():
    """The check above can fail: on the same batches, per-microbatch (or per-position) means miss the
    reference by far more than the tolerance, or are undefined."""
    data = batches()
    tokens, ragged = data["ragged"]
    per_token = F.cross_entropy(_serial_logits(tokens).flatten(0, 1), ragged.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none").view(BATCH, SEQ)
    valid = ragged != IGNORE_INDEX
    reference = serial_reference(tokens, ragged)[0]
    assert _rel(per_token[valid].mean().item(), reference) < TOLERANCE  # the rule itself, from the losses
    for dp in (1, 2):
        assert _rel(_naive(per_token, valid, dp, MICROBATCHES), reference) > 100 * TOLERANCE, dp
    tokens, empty = data["empty_share"]
    per_token = F.cross_entropy(_serial_logits(tokens).flatten(0, 1), empty.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none").view(BATCH, SEQ)
    valid = empty != IGNORE_INDEX
    reference = serial_reference(tokens, empty)[0]
    assert math.isnan(_naive(per_token, valid, 2, MICROBATCHES))  # an empty microbatch's mean is 0/0
    assert _rel(per_token.mean().item(), reference) > 0.5  # the old `.mean()`: ignored positions count as 0


# ----------------------------------------------------------------------------- the DeepSpeed backend


def _deepspeed_worker(rank, world, batch_items):
    """DP=2, ZeRO-1 (which reports the global gradient norm): per batch, from the same initial weights,
    one step's loss and gradient norm."""
    from megatron_lite.optim.deepspeed_backend import build_deepspeed_engine, deepspeed_step_stats, deepspeed_train_step

    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world))
    dp = layout.dp
    results = {}
    for name, (tokens, targets) in batch_items:
        engine = build_deepspeed_engine(build_model_chunks(CFG, layout, SEED), layout, OptimizerConfig(lr=1e-3),
                                        zero_stage=1, microbatches=MICROBATCHES)
        loss = deepspeed_train_step(engine, tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank], layout,
                                    MICROBATCHES)
        results[name] = (loss, deepspeed_step_stats(engine)["grad_norm"])
    return results if rank == 0 else None


def test_deepspeed_step_uses_the_same_rule():
    pytest.importorskip("deepspeed")
    items = list(batches().items())
    results = run_on_ranks(_deepspeed_worker, 2, items, timeout_s=120)[0]
    for name, (tokens, targets) in items:
        loss, grad_norm = results[name]
        ref_loss, ref_grads = serial_reference(tokens, targets)
        if name == "all_ignored":
            assert loss == 0.0 and grad_norm == 0.0
            continue
        ref_norm = torch.stack([g.double().norm() for g in ref_grads.values()]).norm().item()
        assert _rel(loss, ref_loss) < TOLERANCE, (name, loss, ref_loss)
        assert _rel(grad_norm, ref_norm) < TOLERANCE, (name, grad_norm, ref_norm)
