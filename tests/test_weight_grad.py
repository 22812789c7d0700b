"""The backward split into B (input gradient) and W (weight gradients) equals the fused backward bitwise,
for every layer type, with TP2 and sequence parallelism, and with recomputation."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.layers.embedding import VocabParallelEmbedding
from megatron_lite.layers.linear import ColumnParallelLinear, RowParallelLinear
from megatron_lite.layers.weight_grad import WeightGradStore, backward_input, backward_weight, deferring_to
from megatron_lite.models.config import BuildOptions, gpt2_config, llama_config
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.sharding import initialize_parameters
from megatron_lite.parallel.spawn import run_on_ranks
from torch.autograd import Variable

SEQ = 8
MODELS = {
    "gpt2": gpt2_config(vocab_size=37, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=SEQ, init_std=0.1),
    "llama": llama_config(vocab_size=37, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                          ffn_hidden_size=32, max_seq_len=SEQ, init_std=0.1),
}


def _random(shape, seed, **kwargs):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), **kwargs)


def _fused(module, make_input, grad_seed):
    module.zero_grad(set_to_none=True)
    x = make_input()
    y = module(x)
    grad = _random(y.shape, grad_seed)
    Variable._execution_engine.run_backward(tensors=(y,), grad_tensors=(grad,), keep_graph=False, create_graph=False,
                                            inputs=(), allow_unreachable=True, accumulate_grad=True)
    return x.grad if x.is_floating_point() else None, {n: p.grad.clone() for n, p in module.named_parameters()}


def _split(module, make_input, grad_seed):
    module.zero_grad(set_to_none=True)
    store = WeightGradStore("test")
    x = make_input()
    with deferring_to(store):
        y = module(x)
    grad = _random(y.shape, grad_seed)
    with deferring_to(store):  # recomputation replays the forward inside B
        grad_x = backward_input((y,), (grad,), x if x.is_floating_point() else None, module.parameters(), store)
    assert all(p.grad is None for p in module.parameters()), "B must not touch weight gradients"
    assert len(store) > 0
    backward_weight(store)
    assert len(store) == 0
    return grad_x, {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_bitwise(module, make_input, label):
    fused_x, fused_params = _fused(module, make_input, grad_seed=5)
    split_x, split_params = _split(module, make_input, grad_seed=5)
    if fused_x is not None:
        assert torch.equal(fused_x, split_x), f"{label}: input gradient differs"
    assert fused_params.keys() == split_params.keys()
    for name in fused_params:
        assert torch.equal(fused_params[name], split_params[name]), f"{label}: gradient of {name} differs"


def _hidden(shape):
    return lambda: _random(shape, 1, requires_grad=True)


def _cases(layout, sequence_parallel):
    tp = layout.tp
    seq = SEQ // tp.size if sequence_parallel else SEQ
    yield "column", ColumnParallelLinear(16, 8, tp, sequence_parallel=sequence_parallel), _hidden((3, seq, 16))
    yield "column (no bias, gathered)", ColumnParallelLinear(16, 8, tp, bias=False, gather_output=True,
                                                             sequence_parallel=sequence_parallel), _hidden((3, seq, 16))
    yield "row", RowParallelLinear(16, 8, tp, sequence_parallel=sequence_parallel), _hidden((3, SEQ, 16 // tp.size))
    yield "vocab embedding", VocabParallelEmbedding(37, 16, tp, sequence_parallel=sequence_parallel), \
        lambda: torch.randint(0, 37, (3, SEQ), generator=torch.Generator().manual_seed(2))
    for model, cfg in MODELS.items():
        for recompute in ("none", "selective", "full"):
            options = BuildOptions(sequence_parallel=sequence_parallel, recompute=recompute)
            # A middle stage (hidden in, hidden out) and a whole model (embedding, norms, tied head).
            yield f"{model} layers recompute={recompute}", build_model(cfg, layout, 3, [0, 1], first=False, last=False,
                                                                       options=options), _hidden((3, seq, 16))
            yield f"{model} whole recompute={recompute}", build_model(cfg, layout, 3, options=options), \
                lambda: torch.randint(0, 37, (3, SEQ), generator=torch.Generator().manual_seed(2))


def _check_all(layout):
    checked = []
    for sequence_parallel in ((False, True) if layout.tp.size > 1 else (False,)):
        for label, module, make_input in _cases(layout, sequence_parallel):
            initialize_parameters(module, 11)
            _assert_bitwise(module, make_input, f"{label} sp={sequence_parallel}")
            checked.append(f"{label} sp={sequence_parallel}")
    return checked


def _worker(rank, world):
    return _check_all(ParallelLayout.from_mesh(ParallelSizes(tp=world)))


def test_split_backward_is_bitwise_fused_serial():
    assert len(_check_all(ParallelLayout.serial())) == 16


def test_split_backward_is_bitwise_fused_tp2_and_sp():
    checked = run_on_ranks(_worker, 2)
    assert len(checked[0]) == 32 and checked[0] == checked[1]


def test_the_fused_path_equals_plain_torch():
    """What the split is compared with, against an independent reference: autograd of F.linear /
    F.embedding on copies of the same weights (serial layers)."""
    tp = ParallelLayout.serial().tp
    ids = lambda: torch.randint(0, 37, (3, SEQ), generator=torch.Generator().manual_seed(2))  # noqa: E731
    cases = [(ColumnParallelLinear(16, 8, tp), _hidden((3, SEQ, 16)), lambda w, x: F.linear(x, w["weight"], w["bias"])),
             (RowParallelLinear(16, 8, tp), _hidden((3, SEQ, 16)), lambda w, x: F.linear(x, w["weight"], w["bias"])),
             (VocabParallelEmbedding(37, 16, tp), ids, lambda w, x: F.embedding(x, w["weight"]))]
    for module, make_input, plain in cases:
        initialize_parameters(module, 11)
        fused_x, fused = _fused(module, make_input, grad_seed=5)
        weights = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
        x = make_input()
        y = plain(weights, x)
        y.backward(_random(y.shape, 5))
        if fused_x is not None:
            torch.testing.assert_close(fused_x, x.grad, rtol=1e-6, atol=1e-6)
        for name, weight in weights.items():
            torch.testing.assert_close(fused[name], weight.grad, rtol=1e-6, atol=1e-6)


def test_store_must_be_drained():
    layer = ColumnParallelLinear(4, 4, ParallelLayout.serial().tp)
    store = WeightGradStore("chunk 0 mb 0")
    with deferring_to(store):
        y = layer(torch.ones(2, 4, requires_grad=True))
    backward_input((y,), (torch.ones_like(y),), None, layer.parameters(), store)
    with pytest.raises(RuntimeError, match="chunk 0 mb 0 still holds 1 pieces of work"):
        store.check_empty()
    backward_weight(store)
    store.check_empty()
    assert torch.equal(layer.bias.grad, torch.full((4,), 2.0))
