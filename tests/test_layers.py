"""Each sharded layer against the plain torch.nn layer it replaces, on real gloo ranks."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.layers.embedding import VocabParallelEmbedding, padded_vocab_size
from megatron_lite.layers.linear import ColumnParallelLinear, RowParallelLinear
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.sharding import ShardSpec, gather_full, initialize_parameters, shard_of, spec_of, tp_shard
from megatron_lite.parallel.spawn import run_on_ranks

SEED = 7


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _reference_inputs(shape, seed, requires_grad=True):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


def _linear_case(rank, world, kind):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=world))
    tp = layout.tp
    if kind == "column":
        layer = ColumnParallelLinear(12, 8, tp, gather_output=True)
    else:
        layer = RowParallelLinear(12, 8, tp, input_is_parallel=False)
    initialize_parameters(layer, SEED)
    x = _reference_inputs((3, 5, 12), seed=1)
    y = layer(x)
    y.backward(_reference_inputs(y.shape, seed=2, requires_grad=False))
    full_grads = {n: gather_full(p.grad, spec_of(p), tp) for n, p in layer.named_parameters()}
    full_weights = {n: gather_full(p.data, spec_of(p), tp) for n, p in layer.named_parameters()}
    return y.detach(), x.grad, full_weights, full_grads


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_linear_matches_nn_linear(kind, tp):
    results = run_on_ranks(_linear_case, tp, kind)
    y, x_grad, weights, grads = results[0]
    reference = torch.nn.Linear(12, 8)
    with torch.no_grad():
        reference.weight.copy_(weights["weight"])
        reference.bias.copy_(weights["bias"])
    x = _reference_inputs((3, 5, 12), seed=1)
    y_ref = reference(x)
    y_ref.backward(_reference_inputs(y_ref.shape, seed=2, requires_grad=False))
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(x_grad, x.grad) < 1e-6
    assert rel_err(grads["weight"], reference.weight.grad) < 1e-6
    assert rel_err(grads["bias"], reference.bias.grad) < 1e-6
    for other in results[1:]:  # every rank ends with the same output and input gradient
        assert torch.equal(other[0], y) and torch.equal(other[1], x_grad)


def _embedding_and_loss_case(rank, world, vocab):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=world))
    tp = layout.tp
    embedding = VocabParallelEmbedding(vocab, 6, tp)
    initialize_parameters(embedding, SEED)
    ids = torch.randint(0, vocab, (4, 9), generator=torch.Generator().manual_seed(3))
    out = embedding(ids)
    out.backward(_reference_inputs(out.shape, seed=4, requires_grad=False))
    logits_spec = ShardSpec(full_shape=(4, 9, vocab), shards=(tp_shard(2, tp, padded_size=padded_vocab_size(vocab, world)),))
    full_logits = _reference_inputs((4, 9, vocab), seed=5, requires_grad=False)
    local_logits = shard_of(full_logits, logits_spec).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local_logits, ids, tp, embedding.vocab_start, vocab)
    loss.mean().backward()
    logits_grad = gather_full(local_logits.grad, logits_spec, tp)
    weight_spec = spec_of(embedding.weight)
    return (out.detach(), gather_full(embedding.weight.data, weight_spec, tp),
            gather_full(embedding.weight.grad, weight_spec, tp), loss.detach(), logits_grad,
            embedding.weight.data[-1].clone())


@pytest.mark.parametrize("tp,vocab", [(2, 11), (4, 13), (4, 16)])
def test_vocab_parallel_embedding_and_cross_entropy_match_serial(tp, vocab):
    """Vocabularies not divisible by TP are padded; the padding never changes the result."""
    results = run_on_ranks(_embedding_and_loss_case, tp, vocab)
    out, weight, weight_grad, loss, logits_grad, _ = results[0]
    reference = torch.nn.Embedding(vocab, 6)
    with torch.no_grad():
        reference.weight.copy_(weight)
    ids = torch.randint(0, vocab, (4, 9), generator=torch.Generator().manual_seed(3))
    out_ref = reference(ids)
    out_ref.backward(_reference_inputs(out_ref.shape, seed=4, requires_grad=False))
    assert rel_err(out, out_ref) < 1e-6
    assert rel_err(weight_grad, reference.weight.grad) < 1e-6

    logits = _reference_inputs((4, 9, vocab), seed=5)
    loss_ref = F.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1), reduction="none").reshape(4, 9)
    loss_ref.mean().backward()
    assert rel_err(loss, loss_ref) < 1e-6
    assert rel_err(logits_grad, logits.grad) < 1e-6
    if padded_vocab_size(vocab, tp) > vocab:  # the last rank holds the zero padding rows
        assert torch.count_nonzero(results[-1][5]) == 0
