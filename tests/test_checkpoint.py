"""Checkpoints: exact resume, loading under other TP/PP/DP layouts with the optimizer state (ZeRO-1 on
and off), killed saves, keep-last-K and the errors for missing or damaged checkpoints.

One 8-rank run (TP2 x PP2 x DP2, ZeRO-1) trains 4 steps and saves after step 2; every other run loads
that checkpoint. The model is a tiny LLaMA with tied embeddings (the last stage's copy is not a key of
its own), GQA with 2 KV heads (replicated under TP=4) and a prime vocabulary (padded under TP > 1).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from dataclasses import dataclass

import pytest
import torch

import checkpoint_faults
from equivalence import ADAM_EPS, BUCKET_MB, LR, SEED, SEQ, global_batches
from megatron_lite.checkpoint import CheckpointError, latest_step, load_checkpoint, save_checkpoint
from megatron_lite.checkpoint import checkpoint as ckpt_module
from megatron_lite.checkpoint.boxes import contiguous_boxes
from megatron_lite.models.config import llama_config
from megatron_lite.models.transformer import WORD_EMBEDDING
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.spawn import RankFailure, run_on_ranks
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.pipeline.schedules import build_schedule, schedule_mapping
from megatron_lite.training.step import train_step

MODEL = llama_config(vocab_size=101, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=64, max_seq_len=SEQ, tie_embeddings=True)
STEPS, SAVE_AT = 4, 2
FIELDS = ("param", "master", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Run:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero1: bool = False
    microbatches: int = 1
    schedule: str = "1f1b"  # zbv: two chunks per rank in a V, the tied embedding shared on rank 0

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return (f"tp{self.tp}_pp{self.pp}_dp{self.dp}" + ("_zero1" if self.zero1 else "")
                + (f"_{self.schedule}" if self.schedule != "1f1b" else ""))


SAVED = Run(tp=2, pp=2, dp=2, zero1=True, microbatches=2)


def _setup(run: Run, layout: ParallelLayout):
    v = 2 if run.schedule == "zbv" else 1
    chunks = build_model_chunks(MODEL, layout, SEED, v, mapping=schedule_mapping(run.schedule))
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=LR, eps=ADAM_EPS, weight_decay=0.1,
                                                                zero1=run.zero1, bucket_size_mb=BUCKET_MB))
    return chunks, optimizer, build_schedule(run.schedule, layout.pp.size, run.microbatches, v)


def _local_state(chunks, optimizer) -> dict:
    """This rank's pieces of every parameter and its optimizer state, for assembling full tensors."""
    params = optimizer.state_dict()["params"]
    out = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            tie = param.shard_spec.tie
            key = WORD_EMBEDDING + "@last_stage" if tie is not None and not tie.primary else name
            entry = params.get(name)
            out[key] = {"spec": param.shard_spec, "param": param.detach().clone(),
                        "range": entry["range"] if entry else None,
                        **({f: entry[f].clone() for f in FIELDS[1:]} if entry else {})}
    return {"pieces": out, "step": optimizer.steps}


def _assemble(records: list[dict]) -> dict:
    """Full serial tensors (key, field) from every rank's pieces; checks every element was provided."""
    full, seen, specs = {}, {}, {}
    for record in records:
        for key, entry in record["pieces"].items():
            spec = specs[key] = entry["spec"]
            padded = list(spec.full_shape)
            if spec.dim is not None:
                padded[spec.dim] = spec.padded_dim_size
            for field in FIELDS:
                if field == "param":
                    values, (first, end) = entry["param"].reshape(-1), (0, entry["param"].numel())
                elif entry["range"] is not None:
                    values, (first, end) = entry[field], entry["range"]
                else:
                    continue
                target = full.setdefault((key, field), torch.zeros(padded))
                mask = seen.setdefault((key, field), torch.zeros(padded, dtype=torch.bool))
                size = entry["param"].shape[spec.dim] if spec.dim is not None else 0
                for tensor, new in ((target, values), (mask, torch.ones_like(values, dtype=torch.bool))):
                    local = tensor if spec.dim is None else tensor.narrow(spec.dim, spec.chunk_index * size, size)
                    flat = local.clone().reshape(-1)
                    flat[first:end] = new
                    local.copy_(flat.view(local.shape))
    out = {}
    for (key, field), tensor in full.items():
        spec = specs[key]
        trim = (lambda t: t) if spec.dim is None else (lambda t: t.narrow(spec.dim, 0, spec.full_shape[spec.dim]))
        assert trim(seen[(key, field)]).all(), f"{key}.{field}: some elements held by no rank"
        out[(key, field)] = trim(tensor).clone()
    return out


def _batches(layout: ParallelLayout):
    dp = layout.dp
    return [(t.chunk(dp.size)[dp.rank], y.chunk(dp.size)[dp.rank]) for t, y in global_batches(MODEL.vocab_size, STEPS)]


def train(run: Run, layout: ParallelLayout, root: str, *, load: bool = False, save_at: int | None = None) -> dict:
    """Train to STEPS (from the checkpoint under `root` when `load`); record losses and the full state."""
    chunks, optimizer, plan = _setup(run, layout)
    start, record = 0, {"loss": {}}
    if load:
        extra = load_checkpoint(root, chunks, optimizer, layout)
        start = extra["data"]["consumed_batches"]
        record["after_load"] = _local_state(chunks, optimizer)
    for step, (tokens, targets) in enumerate(_batches(layout)):
        if step < start:
            continue
        record["loss"][step] = train_step(chunks, optimizer, tokens, targets, layout, plan)[0]
        if save_at is not None and step + 1 == save_at:
            save_checkpoint(root, step + 1, chunks, optimizer, layout,
                            {"data": {"consumed_batches": step + 1}, "scheduler": {"lr": LR}}, keep_last=2)
            record["at_save"] = _local_state(chunks, optimizer)
    record["final"] = _local_state(chunks, optimizer)
    return record


def train_worker(rank: int, world: int, run: Run, root: str, load: bool, save_at: int | None):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=run.tp, pp=run.pp, dp=run.dp))
    return train(run, layout, root, load=load, save_at=save_at)


def _run(run: Run, root: str, *, load: bool = False, save_at: int | None = None) -> dict:
    """Per-rank records merged: losses of rank 0 (every rank has the same), full states assembled."""
    records = run_on_ranks(train_worker, run.world, run, root, load, save_at, timeout_s=120)
    merged = {"loss": records[0]["loss"]}
    for name in ("after_load", "at_save", "final"):
        if name in records[0]:
            merged[name] = _assemble([r[name] for r in records])
            merged[name + "_step"] = {r[name]["step"] for r in records}
    return merged


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The 8-rank run that saves after step 2 and goes on to step 4 (saving has no side effects)."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    return root, _run(SAVED, root, save_at=SAVE_AT)


@pytest.fixture(scope="module")
def serial():
    """The uninterrupted one-process run."""
    layout = ParallelLayout.serial()
    record = train(Run(), layout, root="", save_at=None)
    record["final"] = _assemble([record["final"]])
    return record


def _same_state(a: dict, b: dict) -> None:
    assert {k for k in a if not k[0].endswith("@last_stage")} == {k for k in b if not k[0].endswith("@last_stage")}
    for state in (a, b):  # the tied copy on the last stage equals the embedding it was loaded from
        for (key, field), tensor in state.items():
            if key.endswith("@last_stage"):
                assert torch.equal(tensor, state[(WORD_EMBEDDING, field)]), (key, field)
    for key in a:
        if not key[0].endswith("@last_stage"):
            assert torch.equal(a[key], b[key]), f"{key} differs after loading"


def test_exact_resume_same_layout(saved):
    """TP2 x PP2 x DP2 with ZeRO-1: stop after 2 steps, load in fresh processes, train 2 more: the same
    losses and the same final state, bit for bit."""
    root, uninterrupted = saved
    assert latest_step(root) == SAVE_AT
    resumed = _run(SAVED, root, load=True)
    assert resumed["after_load_step"] == {SAVE_AT}
    _same_state(uninterrupted["at_save"], resumed["after_load"])
    assert resumed["loss"] == {s: uninterrupted["loss"][s] for s in range(SAVE_AT, STEPS)}
    _same_state(uninterrupted["final"], resumed["final"])


@pytest.mark.parametrize("run", [
    Run(tp=4, pp=1, dp=1, microbatches=1),  # TP 2->4 (KV heads replicated), PP 2->1, DP 2->1, ZeRO off
    Run(tp=1, pp=4, dp=2, zero1=True, microbatches=4),  # TP 2->1, PP 2->4, ZeRO-1 ranges all different
    Run(tp=1, pp=2, dp=2, zero1=True, microbatches=2, schedule="zbv"),  # the V: both ends of the model on rank 0
], ids=str)
def test_load_under_another_layout(saved, serial, run, equivalence_report):
    """Weights and optimizer state after loading equal the saved ones exactly; the next two steps give
    the uninterrupted serial run's losses and weights (1e-5)."""
    root, uninterrupted = saved
    resumed = _run(run, root, load=True)
    _same_state(uninterrupted["at_save"], resumed["after_load"])
    assert resumed["after_load_step"] == {SAVE_AT}
    _check_continuation(f"checkpoint {SAVED} -> {run}", resumed["loss"], resumed["final"], uninterrupted, serial,
                        equivalence_report)


@pytest.mark.filterwarnings("ignore:checkpoint .* re-seeded")
def test_load_into_one_process(saved, serial, equivalence_report):
    """The 8-rank ZeRO-1 checkpoint loads into the serial layout (no torch.distributed at all)."""
    root, uninterrupted = saved
    record = train(Run(), ParallelLayout.serial(), root, load=True)
    _same_state(uninterrupted["at_save"], _assemble([record["after_load"]]))
    _check_continuation(f"checkpoint {SAVED} -> serial", record["loss"], _assemble([record["final"]]), uninterrupted,
                        serial, equivalence_report)


def _check_continuation(label, losses, final, uninterrupted, serial, report) -> None:
    """Losses of the steps after loading and the final weights against the uninterrupted serial run."""
    rel = {s: abs(losses[s] - serial["loss"][s]) / abs(serial["loss"][s]) for s in range(SAVE_AT, STEPS)}
    saved_rel = max(abs(uninterrupted["loss"][s] - serial["loss"][s]) / abs(serial["loss"][s]) for s in range(STEPS))
    keys = [k for k in serial["final"] if k[1] == "param"]
    diff = torch.stack([(final[k].double() - serial["final"][k].double()).norm() for k in keys]).norm()
    weights = (diff / torch.stack([serial["final"][k].double().norm() for k in keys]).norm()).item()
    report.append((label, {"loss": max(rel.values()), "weights": weights, "saved_loss": saved_rel}))
    assert set(losses) == set(range(SAVE_AT, STEPS))
    assert max(rel.values()) <= 1e-5 and saved_rel <= 1e-5 and weights <= 1e-5, (rel, saved_rel, weights)


# ----------------------------------------------------------------------------- killed saves

KILL_RUN = Run(dp=2, zero1=True)


def kill_worker(rank: int, world: int, root: str, hook: str, victim: int):
    """DP2 with ZeRO-1: save at step 1 (completes), then die on rank `victim` at `hook` (a function of
    tests/checkpoint_faults.py) while saving step 2."""
    layout = ParallelLayout.from_mesh(ParallelSizes(dp=2))
    chunks, optimizer, plan = _setup(KILL_RUN, layout)
    batches = _batches(layout)
    train_step(chunks, optimizer, *batches[0], layout, plan)
    save_checkpoint(root, 1, chunks, optimizer, layout, {"data": {"consumed_batches": 1}})
    train_step(chunks, optimizer, *batches[1], layout, plan)
    fault = getattr(checkpoint_faults, hook)(lambda: os._exit(3)) if rank == victim else contextlib.nullcontext()
    with fault:
        save_checkpoint(root, 2, chunks, optimizer, layout, {"data": {"consumed_batches": 2}})
    return "saved"


def _crash():
    raise KeyboardInterrupt("simulated crash")


@pytest.mark.filterwarnings("ignore:checkpoint .* re-seeded")
def test_killed_save_keeps_previous_checkpoint(tmp_path):
    """Rank 1 dies (os._exit) with its data files written, before DCP's index exists; then, in one
    process, a crash after everything is written but before the rename. Both times the previous
    checkpoint and `latest` stay as they were; the next save succeeds and removes the leftovers."""
    root = str(tmp_path)
    with pytest.raises(RankFailure, match="exit code 3"):
        run_on_ranks(kill_worker, 2, root, "after_write", 1, timeout_s=60)
    leftovers = [n for n in os.listdir(root) if n.startswith("step_00000002.tmp-")]
    assert len(leftovers) == 1 and not os.path.exists(os.path.join(root, leftovers[0], ".metadata"))
    layout = ParallelLayout.serial()
    chunks, optimizer, plan = _setup(Run(), layout)
    with checkpoint_faults.before_commit(_crash), pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 2, chunks, optimizer, layout, {"data": {"consumed_batches": 0}})
    names = sorted(os.listdir(root))
    assert "step_00000002" not in names and len([n for n in names if ".tmp-" in n]) == 2, names
    assert latest_step(root) == 1
    assert open(os.path.join(root, "latest")).read().strip() == "step_00000001"
    # the DP2 ZeRO-1 checkpoint of step 1 loads (here into one process) and training goes on
    assert load_checkpoint(root, chunks, optimizer, layout)["data"]["consumed_batches"] == 1
    assert optimizer.steps == 1
    tokens, targets = global_batches_list()[1]
    train_step(chunks, optimizer, tokens, targets, layout, plan)
    save_checkpoint(root, 2, chunks, optimizer, layout, {"data": {"consumed_batches": 2}})
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]
    assert latest_step(root) == 2


def global_batches_list():
    return list(global_batches(MODEL.vocab_size, STEPS))


# ----------------------------------------------------------------------------- directory rules, errors


def _serial_model():
    layout = ParallelLayout.serial()
    chunks, optimizer, _ = _setup(Run(), layout)
    return chunks, optimizer, layout


def test_keep_last_and_resave(tmp_path):
    chunks, optimizer, layout = _serial_model()
    root = str(tmp_path / "run")
    for step in (1, 2, 3, 4):
        path = save_checkpoint(root, step, chunks, optimizer, layout, {"step": step}, keep_last=2)
        assert path == os.path.join(root, f"step_{step:08d}")
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]
    save_checkpoint(root, 4, chunks, optimizer, layout, {"step": "again"}, keep_last=2)  # same step again
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]
    assert load_checkpoint(root, chunks, optimizer, layout) == {"step": "again"}
    assert load_checkpoint(root, chunks, optimizer, layout, step=3) == {"step": 3}
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(root, 5, chunks, optimizer, layout, {}, keep_last=0)


def test_missing_and_corrupt_checkpoints(tmp_path):
    chunks, optimizer, layout = _serial_model()
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        load_checkpoint(root, chunks, optimizer, layout)
    save_checkpoint(root, 1, chunks, optimizer, layout, {})
    with pytest.raises(FileNotFoundError, match="step_00000007"):
        load_checkpoint(root, chunks, optimizer, layout, step=7)
    # truncated data file
    bad = shutil.copytree(os.path.join(root, "step_00000001"), os.path.join(root, "step_00000002"))
    data = os.path.join(bad, "__0_0.distcp")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(CheckpointError, match=r"step_00000002 is unusable: __0_0.distcp: \d+ bytes, \d+ when saved"):
        load_checkpoint(root, chunks, optimizer, layout, step=2)
    with pytest.raises(CheckpointError, match="step_00000002 could not be read"):  # the reader's own check
        load_checkpoint(root, chunks, optimizer, layout, step=2, verify=False)
    # damaged index
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"step_00000002 is unusable: \.metadata: \d+ bytes"):
        load_checkpoint(root, chunks, optimizer, layout, step=2)
    with pytest.raises(CheckpointError, match=r"step_00000002: its index \.metadata is unreadable"):
        load_checkpoint(root, chunks, optimizer, layout, step=2, verify=False)
    # model-only checkpoint loaded with an optimizer, and a checkpoint of another model
    save_checkpoint(root, 3, chunks, None, layout, {})
    with pytest.raises(CheckpointError, match="saved without optimizer state"):
        load_checkpoint(root, chunks, optimizer, layout, step=3)
    other = build_model_chunks(MODEL.with_(hidden_size=16, num_heads=2, num_kv_heads=1), layout, SEED)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(root, other, None, layout, step=3)


def test_model_only_roundtrip_bf16(tmp_path):
    """Without optimizer: weights only; a bf16 model with fp32 master weights round-trips them too."""
    from megatron_lite.models.config import BuildOptions

    layout = ParallelLayout.serial()
    chunks = build_model_chunks(MODEL, layout, SEED, options=BuildOptions(dtype=torch.bfloat16))
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=LR, eps=ADAM_EPS))
    plan = build_schedule("1f1b", 1, 1)
    tokens, targets = next(iter(global_batches(MODEL.vocab_size, 1)))
    train_step(chunks, optimizer, tokens, targets, layout, plan)
    save_checkpoint(str(tmp_path), 1, chunks, optimizer, layout, {})
    fresh = build_model_chunks(MODEL, layout, SEED + 1, options=BuildOptions(dtype=torch.bfloat16))
    fresh_optimizer = build_optimizer(fresh, layout, OptimizerConfig(lr=LR, eps=ADAM_EPS))
    load_checkpoint(str(tmp_path), fresh, fresh_optimizer, layout)
    a, b = optimizer.state_dict()["params"], fresh_optimizer.state_dict()["params"]
    for name in a:
        for field in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[name][field], b[name][field]), (name, field)
    plain = build_model_chunks(MODEL, layout, SEED + 2)  # fp32, model only: the bf16 weights, widened
    load_checkpoint(str(tmp_path), plain, None, layout)
    for (name, p), (_, q) in zip(chunks[0].named_parameters(), plain[0].named_parameters()):
        assert torch.equal(p.float(), q), name


def test_contiguous_boxes_tile_any_range():
    rng = random.Random(0)
    for shape in [(7,), (5, 3), (4, 3, 2), (2, 1, 3, 2), ()]:
        numel = max(1, torch.Size(shape).numel())
        for _ in range(50):
            first = rng.randrange(numel + 1)
            end = rng.randrange(first, numel + 1)
            index = torch.arange(numel).view(shape)
            covered = []
            for offsets, sizes, start in contiguous_boxes(first, end, shape):
                region = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1).tolist()
                assert region == list(range(start, start + len(region)))  # contiguous in memory
                covered += region
            assert covered == list(range(first, end))
            assert len(contiguous_boxes(first, end, shape)) <= max(1, 2 * len(shape) - 1)


def test_dropout_streams_resume_exactly(tmp_path):
    """With dropout, the same layout restores every generator: the resumed losses are the uninterrupted
    ones. Another layout cannot map the per-rank streams: they are re-seeded from (seed, step), so they
    neither restart from step 0 nor depend on where they were."""
    model = MODEL.with_(dropout=0.2)
    layout, plan = ParallelLayout.serial(), build_schedule("1f1b", 1, 1)
    batches = global_batches_list()

    def fresh():
        chunks = build_model_chunks(model, layout, SEED)
        return chunks, build_optimizer(chunks, layout, OptimizerConfig(lr=LR, eps=ADAM_EPS))

    chunks, optimizer = fresh()
    losses = []
    for step, (tokens, targets) in enumerate(batches):
        if step == SAVE_AT:
            save_checkpoint(str(tmp_path), step, chunks, optimizer, layout, {})
        losses.append(train_step(chunks, optimizer, tokens, targets, layout, plan)[0])
    chunks, optimizer = fresh()
    load_checkpoint(str(tmp_path), chunks, optimizer, layout)
    resumed = [train_step(chunks, optimizer, t, y, layout, plan)[0] for t, y in batches[SAVE_AT:]]
    assert resumed == losses[SAVE_AT:]
    # without a state saved by this layout (what load finds after a layout change): re-seeded from
    # (seed, step), deterministically, not from step 0
    states = []
    for _ in range(2):
        chunks, _ = fresh()
        rng = next(iter(chunks[0].rng_streams().values()))
        initial = rng.replicated.get_state()
        assert ckpt_module._restore_rng(chunks, layout, None, SAVE_AT) is False
        assert not torch.equal(rng.replicated.get_state(), initial)
        states.append(rng.get_state())
    assert all(torch.equal(a, b) for a, b in zip(*states))
