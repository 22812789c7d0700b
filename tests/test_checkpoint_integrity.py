"""Checkpoint integrity: checksums verified before a load, the fallback to the newest good step, garbage
`latest` markers, crafted pickles refused unrun, a disk full during a save, nothing recoverable deleted.

Tiny model, serial layout (one process) except the disk-full save (two ranks). Checkpoints of step 10
and step 20 hold different values, so that a load of the wrong one shows.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import pathlib
import pickle
import re
import shutil

import pytest
import torch

import checkpoint_faults
from equivalence import ADAM_EPS, LR, SEED, SEQ, global_batches
from megatron_lite.checkpoint import (
    CheckpointError,
    latest_step,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
    verify_checkpoint,
)
from megatron_lite.checkpoint import checkpoint as ckpt_module
from megatron_lite.checkpoint import dcp_io, store
from megatron_lite.models.config import BuildOptions, llama_config
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.training.step import train_step

MODEL = llama_config(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=64, max_seq_len=SEQ, tie_embeddings=True)
pytestmark = pytest.mark.filterwarnings("ignore:checkpoint .* re-seeded")


def _model(layout=None, seed=SEED, dtype=torch.float32, zero1=False):
    layout = layout or ParallelLayout.serial()
    chunks = build_model_chunks(MODEL, layout, seed, options=BuildOptions(dtype=dtype))
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=LR, eps=ADAM_EPS, zero1=zero1))
    return chunks, optimizer, layout


def _step(chunks, optimizer, layout, i: int) -> None:
    tokens, targets = list(global_batches(MODEL.vocab_size, i + 1))[i]
    if layout.dp.size > 1:
        tokens, targets = tokens.chunk(layout.dp.size)[layout.dp.rank], targets.chunk(layout.dp.size)[layout.dp.rank]
    train_step(chunks, optimizer, tokens, targets, layout, build_schedule("1f1b", 1, 1))


def _snapshot(chunks, optimizer) -> dict:
    out = {f"param.{n}": p.detach().clone() for c in chunks for n, p in c.named_parameters()}
    for name, entry in optimizer.state_dict()["params"].items():
        for field in ("master", "exp_avg", "exp_avg_sq"):
            out[f"{field}.{name}"] = entry[field].clone()
    out["steps"] = optimizer.steps
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _two_steps(root: str) -> tuple[dict, dict]:
    """Checkpoints of step 10 and step 20 (after one more training step); their states."""
    chunks, optimizer, layout = _model()
    _step(chunks, optimizer, layout, 0)
    save_checkpoint(root, 10, chunks, optimizer, layout, {"step": 10})
    first = _snapshot(chunks, optimizer)
    _step(chunks, optimizer, layout, 1)
    save_checkpoint(root, 20, chunks, optimizer, layout, {"step": 20})
    second = _snapshot(chunks, optimizer)
    assert any(not torch.equal(first[k], second[k]) for k in first if k.startswith("param."))
    return first, second


def _load(root: str, step=None, verify=True) -> tuple[dict, dict]:
    chunks, optimizer, layout = _model(seed=SEED + 7)  # other initial values: the load must replace all
    extra = load_checkpoint(root, chunks, optimizer, layout, step=step, verify=verify)
    return extra, _snapshot(chunks, optimizer)


def _flip_byte(path: str, where: float = 0.6) -> None:
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * where))  # tensor data: DCP writes the few small objects first
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _warnings(err: str, about: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:") and about in line]


def _step_path(root, step: int) -> str:
    return store.step_dir(str(root), step)


# ----------------------------------------------------------------------------- verify, select, fall back


def test_flipped_byte_falls_back_to_previous_step(tmp_path, capsys):
    root = str(tmp_path)
    first, second = _two_steps(root)
    assert verify_checkpoint(_step_path(root, 10)) is None and verify_checkpoint(_step_path(root, 20)) is None
    _flip_byte(os.path.join(_step_path(root, 20), "__0_0.distcp"))
    why = verify_checkpoint(_step_path(root, 20))
    assert why == "__0_0.distcp: checksum mismatch (modified or corrupted after the save)", why
    assert latest_step(root) == 20  # the marker's step: complete, not verified
    capsys.readouterr()
    assert select_checkpoint(root) == 10
    warned = _warnings(capsys.readouterr().err, "step_00000020")
    assert len(warned) == 1 and "checksum mismatch" in warned[0] and "falling back to step_00000010" in warned[0]
    extra, loaded = _load(root)  # step=None: rank 0 selects
    assert extra == {"step": 10}
    _same(first, loaded)
    assert len(_warnings(capsys.readouterr().err, "step_00000020")) == 1  # once per load, not twice
    # unverified, the flipped byte loads silently: what the checksums are for
    _, unverified = _load(root, step=20, verify=False)
    assert any(not torch.equal(unverified[k], second[k]) for k in second if isinstance(second[k], torch.Tensor))


def _truncate(path):
    data = os.path.join(path, "__0_0.distcp")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 100)


def _bad_meta(path):
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write('{"step": 20, "layout": ')


def _no_index(path):
    os.remove(os.path.join(path, ".metadata"))


def _bad_manifest(path):
    with open(os.path.join(path, "checksums.json"), "wb") as f:
        f.write(b"\x00\xff garbage")


def _missing_data(path):
    os.remove(os.path.join(path, "__0_0.distcp"))


@pytest.mark.parametrize("damage, reason", [
    (_truncate, r"^__0_0\.distcp: \d+ bytes, \d+ when saved \(truncated or overwritten\)$"),
    (_bad_meta, r"^meta\.json is unreadable \(JSONDecodeError: "),
    (_no_index, r"^incomplete: no \.metadata$"),
    (_bad_manifest, r"^checksums\.json is unreadable \(UnicodeDecodeError: "),
    (_missing_data, r"^__0_0\.distcp: missing \(listed in checksums\.json\)$"),
], ids=["truncated", "bad_meta_json", "no_metadata", "bad_manifest", "missing_data_file"])
def test_damaged_newest_step(tmp_path, capsys, damage, reason):
    root = str(tmp_path)
    first, _ = _two_steps(root)
    damage(_step_path(root, 20))
    why = verify_checkpoint(_step_path(root, 20))
    assert why is not None and re.search(reason, why), why
    capsys.readouterr()
    extra, loaded = _load(root)
    assert extra == {"step": 10}
    _same(first, loaded)
    assert len(_warnings(capsys.readouterr().err, "step_00000020 under")) == 1
    with pytest.raises(CheckpointError, match=r"step_00000020 is unusable: .*; steps there that pass the quick "
                                              r"checks \(data files not read\): \[10\]$"):
        _load(root, step=20)


@pytest.mark.parametrize("marker", ["random64", "empty", "directory", "fifo", "binary", "missing_step", "other_text"])
def test_garbage_latest_marker(tmp_path, capsys, marker):
    root = str(tmp_path)
    first, second = _two_steps(root)
    path = os.path.join(root, "latest")
    os.remove(path)
    if marker == "directory":
        os.mkdir(path)
    elif marker == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
    else:
        content = {"random64": os.urandom(64), "empty": b"", "binary": b"\xff\xfe\x00step_00000020\x00",
                   "missing_step": b"step_00000099\n", "other_text": b"step_20\n"}[marker]
        with open(path, "wb") as f:
            f.write(content)
    assert store.read_marker(root) == (99 if marker == "missing_step" else None)
    assert latest_step(root) == 20  # never raises: the newest complete step
    about = os.path.join(root, "latest") + " "
    capsys.readouterr()
    assert select_checkpoint(root) == 20
    assert len(_warnings(capsys.readouterr().err, about)) == 1
    extra, loaded = _load(root)
    assert extra == {"step": 20}
    _same(second, loaded)
    _flip_byte(os.path.join(_step_path(root, 20), "__0_0.distcp"))  # and a corrupt newest step: step 10
    capsys.readouterr()
    extra, loaded = _load(root)
    assert extra == {"step": 10}
    _same(first, loaded)
    err = capsys.readouterr().err
    assert len(_warnings(err, about)) == 1 and len(_warnings(err, "step_00000020 under")) == 1


def test_marker_step_first_then_newest(tmp_path):
    """`latest` names the step a run committed last: it wins over a newer step_* directory."""
    root = str(tmp_path)
    _two_steps(root)
    store._write_marker(root, 10)
    assert select_checkpoint(root) == 10
    _flip_byte(os.path.join(_step_path(root, 10), "__0_0.distcp"))
    assert select_checkpoint(root) == 20


def test_explicit_or_no_usable_step(tmp_path, capsys):
    root = str(tmp_path)
    assert select_checkpoint(root) is None  # no step_* directory at all
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        _load(root)
    _two_steps(root)
    _flip_byte(os.path.join(_step_path(root, 20), "__0_0.distcp"))
    with pytest.raises(CheckpointError, match=r"step_00000020 is unusable: __0_0\.distcp: checksum mismatch.*"
                                              r"pass the quick checks \(data files not read\): \[10\]$"):
        select_checkpoint(root, 20)
    with pytest.raises(CheckpointError, match=r"step_00000020 is unusable: __0_0\.distcp: checksum mismatch"):
        _load(root, step=20)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 30 .*quick checks .*: \[10, 20\]\)$"):
        select_checkpoint(root, 30)
    with pytest.raises(FileNotFoundError, match="step_00000030"):
        _load(root, step=30)
    assert select_checkpoint(root, 10) == 10
    _truncate(_step_path(root, 10))
    capsys.readouterr()
    with pytest.raises(CheckpointError) as raised:
        select_checkpoint(root)
    message = str(raised.value)
    assert "no usable checkpoint under" in message and "\n" not in message
    assert re.search(r"step_00000020: __0_0\.distcp: checksum mismatch.*step_00000010: __0_0\.distcp: \d+ bytes",
                     message), message
    assert _warnings(capsys.readouterr().err, "falling back") == []
    with pytest.raises(CheckpointError, match="no usable checkpoint under"):
        _load(root)


def test_checkpoint_without_manifest_loads_unverified(tmp_path, capsys):
    """A checkpoint saved before checksums were recorded: complete is enough, with one warning."""
    root = str(tmp_path)
    chunks, optimizer, layout = _model()
    _step(chunks, optimizer, layout, 0)
    saved = _snapshot(chunks, optimizer)
    ckpt_module.CHECKSUMS_ENABLED = False
    try:
        save_checkpoint(root, 5, chunks, optimizer, layout, {"step": 5})
    finally:
        ckpt_module.CHECKSUMS_ENABLED = True
    assert sorted(os.listdir(_step_path(root, 5))) == [".metadata", "__0_0.distcp", "meta.json"]
    assert verify_checkpoint(_step_path(root, 5)) is None
    capsys.readouterr()
    extra, loaded = _load(root)
    assert extra == {"step": 5}
    _same(saved, loaded)
    assert len(_warnings(capsys.readouterr().err, "no checksums.json")) == 1


# ----------------------------------------------------------------------------- crafted pickles


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_is_refused_unrun(tmp_path):
    root, marker = str(tmp_path / "ckpt"), str(tmp_path / "MARKER")
    _two_steps(root)
    path = _step_path(root, 20)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump({"state_dict_metadata": _Payload(marker)}, f)
    os.remove(os.path.join(path, "checksums.json"))  # as if an old checkpoint: nothing to verify against
    assert verify_checkpoint(path) is None
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=r"step_00000020: \.metadata asks to load posix\.system, which a "
                                                  r"checkpoint index never contains: refusing to load it"):
            _load(root, step=20, verify=verify)
    with pytest.raises(dcp_io.UnsafeCheckpoint, match="posix.system"):
        dcp_io.read_metadata(path)
    assert not os.path.exists(marker)
    with open(marker + ".check", "wb") as f:  # the payload does run when unpickled by plain pickle
        pickle.dump(_Payload(marker + ".ran"), f)
    with open(marker + ".check", "rb") as f:
        pickle.load(f)  # noqa: S301 - the control: proves the test's payload is live
    assert os.path.exists(marker + ".ran")


def test_crafted_object_in_data_file_is_refused_unrun(tmp_path, monkeypatch):
    root, marker = str(tmp_path / "ckpt"), str(tmp_path / "MARKER")
    chunks, optimizer, layout = _model()
    monkeypatch.setattr(ckpt_module, "_plain", lambda value, where: value)  # let the crafted object be saved
    save_checkpoint(root, 1, chunks, optimizer, layout, {"evil": _Payload(marker)})
    monkeypatch.undo()
    assert verify_checkpoint(_step_path(root, 1)) is None  # saved like this: checksums match
    with pytest.raises(CheckpointError, match=r"step_00000001: object 'extra' asks to load posix\.system, which a "
                                              r"checkpoint never contains: refusing to load it"):
        _load(root)
    assert not os.path.exists(marker)


class _Color(enum.Enum):
    RED = "red"


def test_saved_objects_load_as_plain_data(tmp_path):
    """What a trainer saves (nested config, paths, enums, tuples, the fp16 loss scaler, RNG states)
    loads back under weights_only; an object that is not plain data is refused before any write."""
    root = str(tmp_path)
    chunks, optimizer, layout = _model(dtype=torch.float16)
    assert optimizer.scaler is not None
    _step(chunks, optimizer, layout, 0)
    optimizer.scaler.scale = 1024.0
    extra = {"config": {"a": [1, 2.5, None, "x", True], "b": {"c": (1, 2)}}, "path": pathlib.Path("/data/x"),
             "color": _Color.RED, "set": {3}, "tensor": torch.arange(3)}
    save_checkpoint(root, 3, chunks, optimizer, layout, extra)
    fresh, fresh_optimizer, _ = _model(seed=SEED + 1, dtype=torch.float16)
    loaded = load_checkpoint(root, fresh, fresh_optimizer, layout)
    assert torch.equal(loaded.pop("tensor"), torch.arange(3))
    assert loaded == {"config": {"a": [1, 2.5, None, "x", True], "b": {"c": (1, 2)}}, "path": "/data/x",
                      "color": "red", "set": {3}}
    assert fresh_optimizer.scaler.scale == 1024.0 and fresh_optimizer.steps == 1
    with pytest.raises(TypeError, match=r"extra\['bad'\]\[0\] is a builtins.object"):
        save_checkpoint(root, 4, chunks, optimizer, layout, {"bad": [object()]})
    assert sorted(os.listdir(root)) == ["latest", "step_00000003"]


# ----------------------------------------------------------------------------- disk full, nothing deleted


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def enospc_worker(rank: int, world: int, root: str):
    """DP2, ZeRO-1: step 10 saved; the save of step 20 fails on rank 1 (disk full), then succeeds."""
    chunks, optimizer, layout = _model(ParallelLayout.from_mesh(ParallelSizes(dp=2)), zero1=True)
    _step(chunks, optimizer, layout, 0)
    save_checkpoint(root, 10, chunks, optimizer, layout, {"step": 10})
    saved = _snapshot(chunks, optimizer)
    _step(chunks, optimizer, layout, 1)
    try:
        with checkpoint_faults.after_write(_enospc) if rank == 1 else contextlib.nullcontext():
            save_checkpoint(root, 20, chunks, optimizer, layout, {"step": 20})
        message = None
    except CheckpointError as err:
        message = str(err)
    names = sorted(os.listdir(root))  # before the retry: what the failed save left
    return {"message": message, "names": names, "saved": saved}


def test_disk_full_on_one_rank(tmp_path):
    root = str(tmp_path)
    results = run_on_ranks(enospc_worker, 2, root, timeout_s=120)
    for result in results:
        message = result["message"]
        assert message is not None and "\n" not in message, message
        assert re.search(r"^saving checkpoint step 20 to .* failed: rank 1: OSError: \[Errno 28\] No space left on "
                         r"device \(\d+\.\d (MiB|GiB) free on .*\);.* the previous checkpoint \(step 10\) is intact$",
                         message), message
        assert result["names"] == ["latest", "step_00000010"]  # no step_00000020.tmp-*
    assert store.read_marker(root) == 10 and verify_checkpoint(_step_path(root, 10)) is None
    extra, loaded = _load(root)  # the DP2 ZeRO-1 checkpoint, into one process
    assert extra == {"step": 10}
    ranges = [r["saved"] for r in results]
    for key, value in loaded.items():  # ZeRO-1: each rank held its range of the optimizer state
        if key.startswith("param."):
            assert torch.equal(value, ranges[0][key]), key
    assert loaded["steps"] == 1


def test_failed_write_in_one_process_leaves_nothing(tmp_path):
    root = str(tmp_path)
    chunks, optimizer, layout = _model()
    save_checkpoint(root, 10, chunks, optimizer, layout, {"step": 10})
    with checkpoint_faults.after_write(_enospc), pytest.raises(
            CheckpointError, match=r"No space left on device \(.* free on .*the previous checkpoint \(step 10\) "
                                   r"is intact"):
        save_checkpoint(root, 20, chunks, optimizer, layout, {"step": 20})
    assert sorted(os.listdir(root)) == ["latest", "step_00000010"]
    assert save_checkpoint(root, 20, chunks, optimizer, layout, {"step": 20}) == _step_path(root, 20)


def test_resaving_a_corrupt_step_keeps_it_aside(tmp_path, capsys):
    root = str(tmp_path)
    _two_steps(root)
    data = os.path.join(_step_path(root, 20), "__0_0.distcp")
    _flip_byte(data)
    with open(data, "rb") as f:
        corrupt_bytes = f.read()
    chunks, optimizer, layout = _model(seed=SEED + 3)
    save_checkpoint(root, 20, chunks, optimizer, layout, {"step": "again"}, keep_last=5)
    names = sorted(os.listdir(root))
    kept = [n for n in names if n.startswith("step_00000020.corrupt-")]
    assert len(kept) == 1 and names == ["latest", "step_00000010", "step_00000020", kept[0]], names
    with open(os.path.join(root, kept[0], "__0_0.distcp"), "rb") as f:
        assert f.read() == corrupt_bytes  # the very files, untouched
    assert "unusable" in capsys.readouterr().err
    assert verify_checkpoint(_step_path(root, 20)) is None and _load(root)[0] == {"step": "again"}
    # leftovers of killed saves go, the set-aside copy stays, whatever keep_last says
    os.mkdir(os.path.join(root, "step_00000030.tmp-abc123"))
    save_checkpoint(root, 30, chunks, optimizer, layout, {}, keep_last=1)
    assert sorted(os.listdir(root)) == sorted(["latest", "step_00000030", kept[0]])
    assert select_checkpoint(root) == 30


def test_fallback_of_own_run_sets_the_corrupt_step_aside(tmp_path, capsys):
    root = str(tmp_path)
    _two_steps(root)
    _flip_byte(os.path.join(_step_path(root, 20), "__0_0.distcp"))
    assert select_checkpoint(root, set_aside=True) == 10
    names = sorted(os.listdir(root))
    assert names[:2] == ["latest", "step_00000010"] and re.match(r"step_00000020\.corrupt-[0-9a-f]+$", names[2]), names
    assert len(names) == 3
    warned = _warnings(capsys.readouterr().err, "step_00000020 under")
    assert len(warned) == 1 and "kept as step_00000020.corrupt-" in warned[0]


def test_keep_last_counts_only_usable_steps(tmp_path):
    root = str(tmp_path)
    chunks, optimizer, layout = _model()
    for step in (10, 20):
        save_checkpoint(root, step, chunks, optimizer, layout, {"step": step}, keep_last=2)
    # the newest step is corrupt; the run went back to step 10 and saves step 15: step 10 stays
    _flip_byte(os.path.join(_step_path(root, 20), "__0_0.distcp"))
    save_checkpoint(root, 15, chunks, optimizer, layout, {"step": 15}, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000010", "step_00000015", "step_00000020"]
    # an unusable step between (truncated) neither counts nor goes: the last good one before it stays
    shutil.rmtree(_step_path(root, 20))
    _truncate(_step_path(root, 15))
    save_checkpoint(root, 30, chunks, optimizer, layout, {"step": 30}, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000010", "step_00000015", "step_00000030"]
    save_checkpoint(root, 40, chunks, optimizer, layout, {"step": 40}, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000015", "step_00000030", "step_00000040"]


def test_manifest_lists_every_file(tmp_path):
    root = str(tmp_path)
    chunks, optimizer, layout = _model()
    path = save_checkpoint(root, 1, chunks, optimizer, layout, {})
    with open(os.path.join(path, "checksums.json")) as f:
        manifest = json.load(f)
    assert manifest["algorithm"] == "crc32"
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "meta.json"]
    for name, entry in manifest["files"].items():
        assert entry == store.file_checksum(os.path.join(path, name))
        assert entry["size"] == os.path.getsize(os.path.join(path, name))
