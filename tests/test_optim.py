"""The optimizer: bucketed DP gradient sync overlapped with backward, ZeRO-1, clipping by the global norm,
mixed precision (bf16 master weights, fp16 loss scaling) and the DP traffic of a step."""

import pytest
import torch

from megatron_lite.parallel.sharding import spec_of, tied
from torch.autograd import Variable

from equivalence import ADAM_EPS, FUNCTION_INVARIANT, LR, SEED, TINY_MODELS, Case, global_batches, rel_err
from megatron_lite.models.config import BuildOptions
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.optim.buffers import ChunkBuffer
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.models.partition import build_model_chunks, named_parameters
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.training.step import run_schedule, train_step
from test_equivalence import cached_serial, check_case

SMALL_BUCKETS_MB = 0.01  # ~2.6k elements: several buckets even for the tiny models

# ZeRO-1 off without clipping on the 3D layouts is covered by tests/test_pipeline.py.
CASES = [
    Case("gpt2", dp=2, microbatches=1),
    Case("gpt2", dp=2, microbatches=3, zero1=True),
    Case("llama", dp=2, microbatches=1, zero1=True),
    Case("llama", dp=2, microbatches=3),
    Case("gpt2", dp=3, microbatches=2, zero1=True),  # buckets padded to a multiple of 3
    Case("gpt2_deep", tp=2, pp=2, dp=2, microbatches=2, zero1=True),
    Case("llama_deep", tp=2, pp=2, dp=2, microbatches=2, zero1=True),
    Case("gpt2_deep", tp=2, pp=2, dp=2, microbatches=2, grad_clip=0.05),
    Case("llama_deep", tp=2, pp=2, dp=2, microbatches=2, zero1=True, grad_clip=0.05),
    # KV heads replicated over TP=4: their partial gradients are summed over TP on the ZeRO-1 shard only
    Case("llama", tp=4, dp=2, microbatches=2, zero1=True, grad_clip=0.05),
    # two chunks per rank (a buffer each, the tied halves on different chunks), SP norms summed over TP
    Case("gpt2_deep", tp=2, pp=2, dp=2, microbatches=2, schedule="interleaved_1f1b", virtual_stages=2,
         sequence_parallel=True, zero1=True, grad_clip=0.05),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_optimizer_matches_serial(case, equivalence_report):
    """Losses, gradients, weights and the global grad norm equal one process's (1e-5)."""
    check_case(case, equivalence_report)
    if case.grad_clip is not None:  # the threshold really clips, on every step
        assert min(cached_serial(case.model, case.grad_clip)["grad_norm"]) > 5 * case.grad_clip


def test_serial_optimizer_matches_torch_adamw_and_clip_grad_norm():
    """Every equivalence test compares against a serial run of our own optimizer; this pins that run to
    PyTorch: torch.optim.AdamW with decay for matrices only (biases and norm weights: none) and
    torch.nn.utils.clip_grad_norm_, on the same model and batches."""
    cfg, clip, steps = TINY_MODELS["gpt2"], 0.58, 4  # grad norms ~0.55-0.62: some steps clip, some not
    plan, layout = build_schedule("1f1b", 1, 2), ParallelLayout.serial()
    ours = build_model_chunks(cfg, layout, SEED)
    optimizer = build_optimizer(ours, layout, OptimizerConfig(
        lr=LR, eps=ADAM_EPS, weight_decay=0.1, grad_clip=clip, bucket_size_mb=SMALL_BUCKETS_MB))
    theirs = build_model_chunks(cfg, ParallelLayout.serial(), SEED)
    params = [p for _, p in named_parameters(theirs)]
    reference = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}],
                                  lr=LR, eps=ADAM_EPS, foreach=False)
    clipped = []
    for tokens, targets in global_batches(cfg.vocab_size, steps):
        loss, stats = train_step(ours, optimizer, tokens, targets, layout, plan)
        reference.zero_grad()
        expected_loss = run_schedule(theirs, plan, tokens, targets, ParallelLayout.serial())
        expected_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        reference.step()
        clipped.append(expected_norm > clip)
        assert abs(loss - expected_loss) <= 1e-6 * abs(expected_loss)
        assert abs(stats["grad_norm"] - expected_norm) <= 1e-6 * expected_norm
        assert not stats["skipped"] and stats["loss_scale"] == 1.0
    assert any(clipped) and not all(clipped)
    for (name, mine), (_, expected) in zip(named_parameters(ours), named_parameters(theirs)):
        if not name.endswith(FUNCTION_INVARIANT):  # gradient is rounding noise, see equivalence.py
            assert rel_err(mine.detach(), expected.detach()) < 1e-6, name


def test_buffer_layout_reverse_order_padding_and_views():
    """Parameters sit in reverse registration order, buckets close at the size limit and are padded to
    the DP multiple, a tied embedding half gets a bucket of its own, params and main_grad are views."""
    layout = ParallelLayout.serial()
    cfg = TINY_MODELS["gpt2_deep"]
    chunk = build_model_chunks(cfg, layout, SEED)[0]
    named = list(chunk.named_parameters())
    before = {name: p.detach().clone() for name, p in named}
    embedding = chunk.embedding.word.weight
    embedding.shard_spec = tied(spec_of(embedding), "embedding.word.weight", primary=True)  # as with pp > 1
    buffer = ChunkBuffer(chunk, 0, {spec_of(embedding).data_parallel: 3}, max_bucket_numel=1000)
    assert [slot.name for slot in buffer.slots] == [name for name, _ in reversed(named)]
    for bucket in buffer.buckets:
        size = sum(slot.param.numel() for slot in bucket.slots)
        assert bucket.numel % 3 == 0 and 0 <= bucket.numel - size < 3
        # closes at the first parameter that reaches the limit, not before
        assert size - bucket.slots[-1].param.numel() < 1000 or len(bucket.slots) == 1
    alone = [bucket for bucket in buffer.buckets if any(s.param is embedding for s in bucket.slots)]
    assert [s.name for s in alone[0].slots] == ["embedding.word.weight"]
    for slot in buffer.slots:
        assert slot.param.data_ptr() == buffer.param_data[slot.start:].data_ptr()
        assert slot.param.main_grad.data_ptr() == buffer.grad_data[slot.start:].data_ptr()
        assert torch.equal(slot.param.detach(), before[slot.name])


def test_fp32_gradients_accumulate_in_the_buffer_itself():
    """Over 3 microbatches autograd adds every fp32 gradient straight into the buffer (no .grad tensor
    of its own, no hook adding it in): afterwards each .grad is still its main_grad view, holding the
    same sum that plain torch accumulates in .grad."""
    layout = ParallelLayout.serial()
    chunks, optimizer, reference, tokens, targets = _model_with_optimizer_and_twin(layout)
    run_schedule(chunks, build_schedule("1f1b", 1, 3), tokens, targets, layout)
    for micro_tokens, micro_targets in zip(tokens.chunk(3), targets.chunk(3)):
        (reference.loss(reference(micro_tokens), micro_targets).mean() / 3).backward()
    expected = dict(reference.named_parameters())
    for name, param in chunks[0].named_parameters():
        assert param.grad is param.main_grad, name
        assert rel_err(param.main_grad, expected[name].grad) < 1e-6, name


@pytest.mark.parametrize("dp", [1, 2])
def test_gradients_summed_out_of_place_still_reach_the_buffer(dp):
    """A backward with create_graph=True makes autograd replace .grad with a new tensor (old sum + new
    gradient) instead of adding in place; the buffer must still end with the full sum, hooked (DP > 1)
    or not."""
    results = run_on_ranks(_out_of_place_grads, dp)
    for got, expected in results:
        for name in expected:
            assert rel_err(got[name], expected[name]) < 1e-6, name


def _model_with_optimizer_and_twin(layout):
    """The tiny GPT-2 under our optimizer (gradients zeroed), a plain twin with the same weights, a batch."""
    cfg = TINY_MODELS["gpt2"]
    chunks = build_model_chunks(cfg, layout, SEED)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig())
    optimizer.zero_grad()
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    return chunks, optimizer, build_model_chunks(cfg, layout, SEED)[0], tokens, targets


def _out_of_place_grads(rank, world):
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world))
    chunks, optimizer, reference, tokens, targets = _model_with_optimizer_and_twin(layout)
    for model in (chunks[0], reference):
        for create_graph in (False, True, False):
            model.loss(model(tokens), targets).mean().backward(create_graph=create_graph)
    optimizer.grad_sync.finish()
    return ({name: param.main_grad.clone() for name, param in chunks[0].named_parameters()},
            {name: param.grad.detach().clone() for name, param in reference.named_parameters()})


def test_state_dict_is_addressed_by_name_and_reloads_exactly():
    """State per parameter name with its ShardSpec and element range; loading a snapshot taken after
    step 2 and replaying steps 3-4 gives the same losses bit for bit (bf16: separate fp32 master)."""
    cfg, layout = TINY_MODELS["llama"], ParallelLayout.serial()
    chunks = build_model_chunks(cfg, layout, SEED, options=BuildOptions(dtype=torch.bfloat16))
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-2, zero1=True, bucket_size_mb=SMALL_BUCKETS_MB))
    plan = build_schedule("1f1b", 1, 2)
    batches = list(global_batches(cfg.vocab_size, steps=4))
    for tokens, targets in batches[:2]:
        train_step(chunks, optimizer, tokens, targets, layout, plan)
    state = optimizer.state_dict()
    assert state["step"] == 2 and set(state["params"]) == {name for name, _ in named_parameters(chunks)}
    for name, param in named_parameters(chunks):
        entry = state["params"][name]
        assert entry["shard_spec"] == param.shard_spec and entry["local_shape"] == tuple(param.shape)
        assert entry["range"] == (0, param.numel()) and entry["master"].dtype == torch.float32
        assert torch.equal(entry["master"].to(torch.bfloat16), param.detach().view(-1))
    snapshot = {**state, "params": {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
                                    for name, entry in state["params"].items()}}
    replay = lambda: [train_step(chunks, optimizer, t, y, layout, plan)[0] for t, y in batches[2:]]  # noqa: E731
    first = replay()
    optimizer.load_state_dict(snapshot)
    assert replay() == first


# ----------------------------------------------------------------------------- ZeRO-1 memory


def _state_sizes(rank, world):
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world))
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        for zero1 in (False, True):
            chunks = build_model_chunks(TINY_MODELS["llama"], layout, SEED, options=BuildOptions(dtype=dtype))
            optimizer = build_optimizer(chunks, layout, OptimizerConfig(zero1=zero1, bucket_size_mb=SMALL_BUCKETS_MB))
            result[(dtype, zero1)] = {
                "state": optimizer.state_numel(),
                "buffer": sum(b.numel for b in optimizer.buffers),
                "buckets": sum(len(b.buckets) for b in optimizer.buffers),
                "params": {name: p.numel() for name, p in named_parameters(chunks)},
                "ranges": {name: entry["range"] for name, entry in optimizer.state_dict()["params"].items()},
            }
    return result


def test_zero1_state_is_one_over_dp_per_rank():
    dp = 3  # parameter sizes are multiples of 16: every bucket needs padding
    ranks = run_on_ranks(_state_sizes, dp)
    for dtype, copies in ((torch.float32, 2), (torch.bfloat16, 3)):  # Adam moments (+ fp32 master for bf16)
        full, sharded = ranks[0][(dtype, False)], [r[(dtype, True)] for r in ranks]
        total_params = sum(full["params"].values())
        padding = full["buffer"] - total_params
        assert 0 < padding < dp * full["buckets"]  # each bucket padded to a multiple of dp
        assert full["state"] == copies * full["buffer"]
        for mine in sharded:
            assert mine["state"] * dp == full["state"]  # exactly 1/DP, padding included
        # every element of every parameter is owned by exactly one DP rank
        for name, numel in full["params"].items():
            owned = sorted(r["ranges"][name] for r in sharded if name in r["ranges"])
            assert owned[0][0] == 0 and owned[-1][1] == numel, name
            assert all(a[1] == b[0] for a, b in zip(owned, owned[1:])), name


# ----------------------------------------------------------------------------- overlap


def _overlap_events(rank, world, microbatches):
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world))
    cfg = TINY_MODELS["gpt2"]
    chunks = build_model_chunks(cfg, layout, SEED)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(bucket_size_mb=SMALL_BUCKETS_MB))
    events = []

    def note(what):
        events.append((what, layout.stats.calls.get(("dp", "all_reduce"), 0), len(optimizer.grad_sync.launch_order)))

    def signal(chunk):
        note("last backward starts")
        optimizer.before_last_backward(chunk)

    # Layer 0's MLP output weight gets its gradient half-way through backward (layer 0's attention and
    # the embeddings come after it); this hook runs after the optimizer's own hook on that parameter.
    def probe(param):
        note("mid backward")
        Variable._execution_engine.queue_callback(lambda: note("backward ends"))

    chunks[0].layers["0"].mlp.down_proj.weight.register_post_accumulate_grad_hook(probe)
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    tokens, targets = tokens.chunk(world)[rank], targets.chunk(world)[rank]
    layout.stats.reset()
    optimizer.zero_grad()
    run_schedule(chunks, build_schedule("1f1b", 1, microbatches), tokens, targets, layout,
                 before_last_backward=signal)
    note("schedule done")
    optimizer.step()
    return events, list(optimizer.grad_sync.launch_order), sum(len(b.buckets) for b in optimizer.buffers)


def test_bucket_reductions_start_during_the_last_backward():
    """With 3 microbatches: no DP communication during the first two backwards; during the last one
    buckets start (in buffer order) while backward is still running, and all have started by its end."""
    m = 3
    for events, launched, buckets in run_on_ranks(_overlap_events, 2, m):
        assert buckets >= 4
        kinds = [what for what, _, _ in events]
        assert kinds == ["mid backward", "backward ends"] * (m - 1) + [
            "last backward starts", "mid backward", "backward ends", "schedule done"]
        earlier, last = events[:2 * (m - 1) + 1], dict((what, (calls, n)) for what, calls, n in events[2 * (m - 1):])
        assert all(calls == 1 and n == 0 for _, calls, n in earlier)  # only the valid-target count
        calls, started = last["mid backward"]
        assert 0 < started < buckets and calls == started + 1  # some buckets in flight, backward not done
        assert last["backward ends"] == (buckets + 1, buckets)
        assert last["schedule done"][0] == buckets + 2  # + the valid-target count and the loss average
        # each bucket once; the head end of the model (first in the buffer) finishes its gradients first
        assert sorted(launched) == [(0, i) for i in range(buckets)] and launched[0] == (0, 0)


# ----------------------------------------------------------------------------- DP traffic per step


def _dp_traffic(rank, world, zero1):
    layout = ParallelLayout.from_mesh(ParallelSizes(pp=2, dp=3))
    cfg = TINY_MODELS["gpt2_deep"]
    chunks = build_model_chunks(cfg, layout, SEED)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(zero1=zero1, bucket_size_mb=SMALL_BUCKETS_MB))
    plan = build_schedule("1f1b", 2, 2)
    reports = []
    for tokens, targets in global_batches(cfg.vocab_size, steps=2):
        dp = layout.dp
        _, stats = train_step(chunks, optimizer, tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank],
                              layout, plan)
        reports.append({k: v for k, v in stats["comm_bytes"].items() if k.startswith("dp/")})
    calls = {op: n for (group, op), n in layout.stats.calls.items() if group == "dp"}
    return (reports, sum(b.numel for b in optimizer.buffers), sum(len(b.buckets) for b in optimizer.buffers),
            sum(p.numel() for _, p in named_parameters(chunks)), calls)


@pytest.mark.parametrize("zero1", [False, True], ids=["allreduce", "zero1"])
def test_dp_bytes_per_step(zero1):
    """PP=2 x DP=3 (tied embedding halves in buckets of their own). Per rank and step, the buffer is the
    stage's fp32 gradients plus zero padding (< DP elements per bucket, to split it into DP shards):
      non-ZeRO  one all-reduce of the whole buffer                     4 * buffer bytes
      ZeRO-1    one reduce-scatter of the buffer, one all-gather of the (fp32) parameters, 4 * buffer each
    plus the scalars: the step's valid-target count (int64, 8 bytes, before the schedule), the DP-averaged
    loss (4 bytes) and, with ZeRO-1, the (norm^2, inf count) pair in fp64 summed over DP (16 bytes), since
    each rank holds only its shard of the gradient."""
    dp = 3
    for reports, buffer, buckets, params, calls in run_on_ranks(_dp_traffic, 2 * dp, zero1):
        assert 0 < buffer - params < dp * buckets
        if zero1:
            expected = {"dp/reduce_scatter": 4 * buffer, "dp/all_gather": 4 * buffer, "dp/all_reduce": 8 + 4 + 16}
            assert calls == {"reduce_scatter": buckets, "all_gather": buckets, "all_reduce": 3}
        else:
            expected = {"dp/all_reduce": 4 * buffer + 8 + 4}
            assert calls == {"all_reduce": buckets + 2}
        assert reports == [expected, expected]  # counters reset at the start of each step


# ----------------------------------------------------------------------------- mixed precision

# The same batch every step, so the loss falls far (4.6 -> 2.15) and a broken update would show.
CURVE_STEPS, CURVE_LR = 20, 1e-2


def _curve(rank, world, dtype, zero1):
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world)) if world > 1 else ParallelLayout.serial()
    cfg = TINY_MODELS["gpt2"]
    chunks = build_model_chunks(cfg, layout, SEED, options=BuildOptions(dtype=dtype))
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=CURVE_LR, weight_decay=0.1, eps=ADAM_EPS,
                                                                grad_clip=1.0, zero1=zero1))
    plan = build_schedule("1f1b", 1, 2)
    tokens, targets = next(global_batches(cfg.vocab_size, steps=1))
    dp = layout.dp
    tokens, targets = tokens.chunk(dp.size)[dp.rank], targets.chunk(dp.size)[dp.rank]
    return [train_step(chunks, optimizer, tokens, targets, layout, plan)[0] for _ in range(CURVE_STEPS)]


def test_bf16_loss_curve_tracks_fp32():
    """bf16 parameters and activations with fp32 master weights, Adam states and gradient accumulation
    (DP=2, ZeRO-1) against the fp32 serial run. bf16 keeps 8 significant bits (relative rounding
    2^-9 ~ 0.2% per operation), so the loss differs in its third digit (measured: at most 0.31%).
    The band, 2% of the loss per step, leaves room for rounding to compound over 20 steps and is still
    ~30x smaller than the distance the curve travels (2.5), so a run that drops or mis-scales updates
    would leave it."""
    fp32 = _curve(0, 1, torch.float32, False)
    bf16 = run_on_ranks(_curve, 2, torch.bfloat16, True)[0]
    assert fp32[0] - fp32[-1] > 2.0
    for step, (a, b) in enumerate(zip(bf16, fp32)):
        assert abs(a - b) <= 0.02 * b, (step, a, b)


def _fp16_scaling(rank, world):
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=world))
    cfg = TINY_MODELS["gpt2"]
    plan = build_schedule("1f1b", 1, 1)
    batches = [(t.chunk(world)[rank], y.chunk(world)[rank]) for t, y in global_batches(cfg.vocab_size, steps=12)]

    def setup(**knobs):
        chunks = build_model_chunks(cfg, layout, SEED, options=BuildOptions(dtype=torch.float16))
        config = OptimizerConfig(lr=LR, eps=ADAM_EPS, weight_decay=0.1, bucket_size_mb=SMALL_BUCKETS_MB, **knobs)
        return chunks, build_optimizer(chunks, layout, config)

    def params_of(optimizer):
        return torch.cat([b.param_data.clone() for b in optimizer.buffers])

    # Natural overflow: 2^24 times the loss gradient does not fit in fp16 (max 65504).
    chunks, optimizer = setup(initial_loss_scale=2.0**24)
    natural = []
    for tokens, targets in batches:
        before = params_of(optimizer)
        _, stats = train_step(chunks, optimizer, tokens, targets, layout, plan)
        natural.append((stats["loss_scale"], stats["skipped"], torch.equal(before, params_of(optimizer))))
        if not stats["skipped"]:
            break

    # Injected overflow on one rank only: both ranks skip, the scale halves, then grows back after
    # `growth_interval` good steps.
    chunks, optimizer = setup(initial_loss_scale=2.0**8, loss_scale_growth_interval=2)
    injected = []
    for step, (tokens, targets) in enumerate(batches[:4]):
        handle = None
        if step == 1 and rank == 0:
            weight = chunks[0].layers["1"].mlp.up_proj.weight
            handle = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        before = params_of(optimizer)
        _, stats = train_step(chunks, optimizer, tokens, targets, layout, plan)
        if handle is not None:
            handle.remove()
        injected.append((stats["loss_scale"], stats["skipped"], torch.equal(before, params_of(optimizer))))
    finite = bool(torch.isfinite(params_of(optimizer)).all())
    return natural, injected, optimizer.loss_scale, optimizer.steps, finite


def test_fp16_dynamic_loss_scaling_skips_overflowing_steps():
    results = run_on_ranks(_fp16_scaling, 2)
    assert results[0] == results[1]  # every rank takes the same decisions
    natural, injected, final_scale, steps, finite = results[0]
    assert natural[0][1] and len(natural) >= 2 and not natural[-1][1]
    for i, (scale, skipped, unchanged) in enumerate(natural):
        assert scale == 2.0**24 / 2**i
        assert unchanged == skipped  # a skipped step leaves the parameters alone; a taken one moves them
    assert [(scale, skipped, unchanged) for scale, skipped, unchanged in injected] == [
        (256.0, False, False), (256.0, True, True), (128.0, False, False), (128.0, False, False)]
    assert final_scale == 256.0 and steps == 3 and finite
