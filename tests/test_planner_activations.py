"""The planner's activation memory per stage against what autograd really keeps.

On spawned gloo ranks (TP x PP), each pipeline stage runs the forward of one micro batch (a received
activation that requires grad on later stages, the loss on the last) under
torch.autograd.graph.saved_tensors_hooks; the unique storages saved, parameters excepted, plus the
inputs a checkpointed region keeps (recomputation), are one micro batch's activations. Times the
schedule's peak in-flight micro batches, they must be within 10% of the prediction, for the first and
the last stage, with and without SP and recomputation."""

from unittest import mock

import pytest
import torch

from equivalence import SEED, TINY_MODELS
import megatron_lite.models.transformer as transformer
from megatron_lite.models.config import BuildOptions
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.planner.activations import stage_activations
from megatron_lite.planner.spec import Layout
from planner_helpers import sizes_of

SEQ, MICROBATCHES = 32, 4


def _saved_bytes(rank, world, model, layout: Layout):
    fw = ParallelLayout.from_mesh(sizes_of(layout))
    cfg = MODELS[model]
    options = BuildOptions(sequence_parallel=layout.sequence_parallel, recompute=layout.recompute)
    [chunk] = build_model_chunks(cfg, fw, SEED, options=options)
    chunk.train()
    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    original = transformer.checkpoint

    def checkpoint(fn, *args, **kwargs):  # a checkpointed region keeps its inputs (not through the hooks)
        for arg in args:
            if isinstance(arg, torch.Tensor):
                pack(arg)
        return original(fn, *args, **kwargs)

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (layout.micro_batch, SEQ), generator=generator)
    if chunk.embedding is not None:
        inputs = tokens
    else:
        inputs = torch.randn(chunk.activation_shape(layout.micro_batch, SEQ), generator=generator, requires_grad=True)
    with mock.patch.object(transformer, "checkpoint", checkpoint), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunk(inputs)
        if chunk.head is not None:
            chunk.loss(out, tokens).sum()
    if chunk.embedding is None:
        pack(inputs)  # the received activation stays alive with its graph
    return fw.pp.rank, fw.tp.rank, sum(saved.values())


MODELS = {
    "llama": TINY_MODELS["llama_deep"].with_(hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                                             max_seq_len=SEQ),
    "gpt2": TINY_MODELS["gpt2_deep"].with_(hidden_size=64, num_heads=4, max_seq_len=SEQ),
    "gpt2_dropout": TINY_MODELS["gpt2_deep"].with_(hidden_size=64, num_heads=4, max_seq_len=SEQ, dropout=0.1),
    "moe": TINY_MODELS["moe"].with_(num_layers=4, hidden_size=64, num_heads=4, max_seq_len=SEQ),
}
CASES = [
    ("llama", Layout(pp=2, micro_batch=2)),
    ("llama", Layout(tp=2, pp=2, micro_batch=2, sequence_parallel=True)),
    ("llama", Layout(tp=2, pp=2, micro_batch=2, recompute="full")),
    ("llama", Layout(tp=2, pp=2, micro_batch=2, sequence_parallel=True, recompute="selective")),
    ("gpt2", Layout(tp=2, pp=2, micro_batch=2)),
    ("gpt2_dropout", Layout(tp=2, pp=2, micro_batch=2, sequence_parallel=True)),
    ("gpt2_dropout", Layout(pp=2, micro_batch=2, recompute="selective")),
    ("moe", Layout(pp=2, micro_batch=2)),
    ("moe", Layout(tp=2, pp=2, micro_batch=2, sequence_parallel=True)),
    ("moe", Layout(pp=2, dp=2, ep=2, micro_batch=2)),
]


@pytest.mark.parametrize("model,layout", CASES, ids=lambda v: v.describe() if isinstance(v, Layout) else v)
def test_activation_bytes_per_stage_within_10_percent(model, layout):
    cfg = MODELS[model]
    for stage, tp_rank, measured in run_on_ranks(_saved_bytes, layout.world_size, model, layout):
        predicted = stage_activations(cfg, layout, stage, SEQ, 4, MICROBATCHES)
        assert predicted.in_flight == (2 if stage == 0 else 1)  # 1F1B on 2 stages
        kept, planned = predicted.in_flight * measured, predicted.in_flight * predicted.per_microbatch
        print(f"{model} {layout.describe()} stage {stage} tp {tp_rank}: {kept} bytes kept at the peak, "
              f"predicted {planned:.0f} ({planned / kept:.3f})")
        assert abs(planned / kept - 1) <= 0.10
