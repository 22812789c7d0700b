"""The planner's activation memory per stage against what autograd really keeps.

On spawned gloo ranks (TP x PP), each pipeline stage runs the forward of one micro batch (a received
activation that requires grad on later stages, the loss on the last) under
torch.autograd.graph.saved_tensors_hooks; the unique storages saved, parameters excepted, plus the
inputs a checkpointed region keeps (recomputation), are one micro batch's activations. Times the
schedule's peak in-flight micro batches, they must be within 10% of the prediction, for the first and
the last stage, with and without SP and recomputation. Where a rank holds several chunks (ZBV's V puts
the first and the last stage on rank 0) each chunk is measured on its own and the peak is the plan's
largest live set of (micro batch, chunk) activations, weighted by what each chunk saved."""

from unittest import mock

import pytest
import torch

from equivalence import SEED, TINY_MODELS
import megatron_lite.models.transformer as transformer
from megatron_lite.models.config import BuildOptions
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.pipeline.schedules import ActionKind, build_schedule, schedule_mapping
from megatron_lite.pipeline.simulate import simulate
from megatron_lite.planner.activations import stage_activations
from megatron_lite.planner.spec import Layout
from planner_helpers import sizes_of

SEQ, MICROBATCHES = 32, 4


def _saved_bytes(rank, world, model, layout: Layout):
    """(pipeline rank, TP rank, bytes one micro batch's forward saves in each of the rank's chunks)."""
    fw = ParallelLayout.from_mesh(sizes_of(layout))
    cfg = MODELS[model]
    options = BuildOptions(sequence_parallel=layout.sequence_parallel, recompute=layout.recompute)
    chunks = build_model_chunks(cfg, fw, SEED, virtual_stages=layout.virtual_stages, options=options,
                                mapping=schedule_mapping(layout.schedule))
    # every chunk's parameters: ZBV's head on rank 0 uses the embedding chunk's (tied) weight
    params = {p.untyped_storage().data_ptr() for chunk in chunks for p in chunk.parameters()}
    return fw.pp.rank, fw.tp.rank, [_chunk_saved_bytes(chunk, cfg, layout, params) for chunk in chunks]


def _chunk_saved_bytes(chunk, cfg, layout: Layout, params: set) -> int:
    chunk.train()
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
    return sum(saved.values())


def _peak_bytes(plan, rank: int, per_chunk: list[float]) -> float:
    """The most bytes rank `rank` keeps as its actions run: a forward keeps its chunk's saved tensors
    until that micro batch's B, or under a zero-bubble plan its W (which still reads the inputs)."""
    live = peak = 0.0
    for action in plan.actions[rank]:
        if action.kind is ActionKind.FORWARD:
            live += per_chunk[action.chunk]
        elif action.kind in (ActionKind.BACKWARD, ActionKind.BACKWARD_WEIGHT):
            live -= per_chunk[action.chunk]
        peak = max(peak, live)
    return peak


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
    # zero-bubble: W keeps a micro batch's activations; ZBV's rank 0 holds the first and the last stage
    ("llama", Layout(pp=2, micro_batch=2, schedule="zb_h1")),
    ("llama", Layout(pp=2, micro_batch=2, schedule="zbv", virtual_stages=2)),
    ("gpt2", Layout(tp=2, pp=2, micro_batch=2, sequence_parallel=True, schedule="zbv", virtual_stages=2)),
]


@pytest.mark.parametrize("model,layout", CASES, ids=lambda v: v.describe() if isinstance(v, Layout) else v)
def test_activation_bytes_per_stage_within_10_percent(model, layout):
    cfg = MODELS[model]
    plan = build_schedule(layout.schedule, layout.pp, MICROBATCHES, layout.virtual_stages)
    for stage, tp_rank, measured in run_on_ranks(_saved_bytes, layout.world_size, model, layout):
        predicted = stage_activations(cfg, layout, stage, SEQ, 4, MICROBATCHES)
        assert predicted.in_flight == simulate(plan).peak_in_flight[stage]  # 1F1B on 2 stages: 2, 1
        for chunk, (count, planned) in enumerate(zip(measured, predicted.per_chunk)):
            assert abs(planned / count - 1) <= 0.10, f"stage {stage} chunk {chunk}: {planned:.0f} for {count}"
        kept, planned = _peak_bytes(plan, stage, measured), predicted.at_peak
        print(f"{model} {layout.describe()} stage {stage} tp {tp_rank}: {kept:.0f} bytes kept at the peak, "
              f"predicted {planned:.0f} ({planned / kept:.3f})")
        assert abs(planned / kept - 1) <= 0.10
