"""Save and load training state under any parallel layout.

A checkpoint holds logical tensors, the same for every layout:
    model.<name>                 the full, unpadded serial parameter, in the model dtype
    optim.exp_avg.<name>         Adam's moments, fp32, same shape as the parameter
    optim.exp_avg_sq.<name>
    optim.master.<name>          fp32 master weights; only for bf16/fp16 models (for fp32 ones the
                                 parameter is its own master)
and objects:
    meta                         step, layout, optimizer step count and loss scaler, format version
    extra                        the trainer's small state (scheduler, data position, config)
    rng.tp<T>_pp<P>_dp<D>.rank<R>  torch's global RNG and the model stages' random streams of one rank
`<name>` is the parameter's name in the serial model; the copies of a tied tensor (the output embedding
kept by the last pipeline stage) use the tie's key, `embedding.word.weight` (written by the primary
copy, read by both). Which rank writes a box follows from the placement alone
(`sharding.holds_canonical_copy`).

Saving: each rank writes the boxes of the logical tensors it holds (checkpoint/boxes.py); a box held
by several ranks (TP-replicated tensors, KV heads replicated when TP exceeds their number, DP
replicas) is written by one of them. Under ZeRO-1 every DP rank writes the part of the state it owns,
cut into contiguous boxes: no gather, no extra memory, DP ranks write in parallel. Loading: each rank
asks DCP for the boxes it holds under its own layout (its ZeRO-1 range of the optimizer state, or the
whole local shard), read straight into the live tensors, and lets the optimizer rebuild the parameters
from the master weights (all-gathered over DP under ZeRO-1).

Integrity: each rank records the size and CRC-32 of the data files it wrote (computed while it fsyncs
them), rank 0 adds the index and meta.json and writes them all to checksums.json before the commit
rename. A load checks them first (`select_checkpoint`: the newest good step, warning for each one
skipped). Objects are read with torch.load(weights_only=True) and DCP's index with an unpickler that
knows only DCP's own classes: a crafted file is refused, nothing of it is run. A save that fails on
any rank (a full disk) removes its temporary directory and says what failed and the space left.

RNG: resuming on the same layout restores every rank's generators, so dropout continues exactly. The
dropout streams are per (pipeline stage, DP rank, TP rank), so on another layout they cannot be mapped:
each generator is then re-seeded from its own seed and the step (deterministic, layout-consistent,
no mask repeated from step 0), and torch's global generator is left as it is (the model draws no random
numbers from it).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import os
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_lite.checkpoint import dcp_io, store
from megatron_lite.checkpoint.boxes import Box, boxes_of
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.sharding import ShardSpec, holds_canonical_copy, spec_of

FORMAT_VERSION = 1
CHECKSUMS_ENABLED = True  # benchmarks/checkpoint_save.py turns it off to measure what checksums cost
STATE_FIELDS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (incomplete, corrupt, or for another model)."""


@dataclass
class _Param:
    name: str  # in this rank's chunks (and the optimizer)
    key: str  # in the checkpoint
    param: torch.nn.Parameter
    spec: ShardSpec


def _params(chunks) -> list[_Param]:
    out = []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            spec = spec_of(param)
            if tuple(param.shape) != spec.local_shape:
                raise ValueError(f"{name}: local shape {tuple(param.shape)} does not match its ShardSpec "
                                 f"{spec.local_shape}")
            out.append(_Param(name, spec.tie.key if spec.tie is not None else name, param, spec))
    return out


def _flat(param: torch.Tensor) -> torch.Tensor:
    if not param.is_contiguous():
        raise ValueError("checkpointing needs contiguous parameters")
    return param.detach().view(-1)


def _world(layout: ParallelLayout) -> CommGroup:
    return layout.group("world")


def _rng_key(layout: ParallelLayout) -> str:
    s = layout.sizes
    return f"rng.tp{s.tp}_pp{s.pp}_dp{s.dp}.rank{layout.rank}"


def _rng_streams(chunks) -> dict:
    streams = {}
    for chunk in chunks:
        streams.update(chunk.rng_streams())
    return streams


def _rng_state(chunks, layout: ParallelLayout) -> dict:
    state = {"torch": torch.get_rng_state(),
             "streams": {name: rng.get_state() for name, rng in _rng_streams(chunks).items()}}
    if layout.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(layout.device)
    return state


def _restore_rng(chunks, layout: ParallelLayout, saved: dict | None, step: int) -> bool:
    streams = _rng_streams(chunks)
    if saved is not None and set(saved.get("streams", {})) == set(streams):
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and layout.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda"], layout.device)
        for name, rng in streams.items():
            rng.set_state(saved["streams"][name])
        return True
    for rng in streams.values():
        rng.reseed(f"resume/{step}")
    return False


@contextmanager
def _quiet_single_process():
    """DCP warns that it runs without torch.distributed: that is what the serial layout means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _zero_sharded(optimizer, layout: ParallelLayout) -> bool:
    return optimizer is not None and optimizer.config.zero1


# ----------------------------------------------------------------------------- save


def _boxes_to_save(chunks, optimizer, layout: ParallelLayout) -> dict[str, tuple[tuple[int, ...], list[Box]]]:
    out: dict[str, tuple[tuple[int, ...], list[Box]]] = {}

    def add(fqn, shape, boxes):
        out.setdefault(fqn, (shape, []))[1].extend(boxes)

    opt = optimizer.state_dict()["params"] if optimizer is not None else {}
    zero = _zero_sharded(optimizer, layout)
    coordinates = layout.coordinates
    for p in _params(chunks):
        partitioned = zero and p.param.requires_grad
        if not holds_canonical_copy(p.spec, coordinates, layout.sizes, partitioned):
            continue  # another rank holds the same values and writes them
        entry = opt.get(p.name)
        if partitioned and entry is None:  # outside this rank's ZeRO-1 shard: another rank writes it
            continue
        first, end = entry["range"] if entry is not None else (0, p.param.numel())
        shape, local = p.spec.full_shape, tuple(p.param.shape)
        add(f"model.{p.key}", shape, boxes_of(_flat(p.param)[first:end], first, end, p.spec, local))
        if entry is not None:
            for field in STATE_FIELDS:
                add(f"optim.{field}.{p.key}", shape, boxes_of(entry[field], first, end, p.spec, local))
            if p.param.dtype != torch.float32:
                add(f"optim.master.{p.key}", shape, boxes_of(entry["master"], first, end, p.spec, local))
    return out


def save_checkpoint(root: str, step: int, chunks, optimizer, layout: ParallelLayout, extra: dict | None = None,
                    keep_last: int | None = None) -> str:
    """Collective: write the model, the optimizer state (None: model only), RNG states and `extra` (small
    picklable state: scheduler, data position, config) as checkpoint `step` under `root`; returns its
    directory. A save killed on any rank leaves the previous checkpoint and `latest` untouched;
    `keep_last` keeps only that many newest complete checkpoints (None: all)."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    world, rank0 = _world(layout), layout.rank == 0
    if rank0:
        os.makedirs(root, exist_ok=True)
    objects: dict[str, object] = {_rng_key(layout): _rng_state(chunks, layout)}
    sizes = {"tp": layout.sizes.tp, "pp": layout.sizes.pp, "dp": layout.sizes.dp}
    optimizer_meta = None if optimizer is None else {
        "step": optimizer.steps, "loss_scaler": optimizer.scaler.state_dict() if optimizer.scaler else None,
        "zero1": optimizer.config.zero1}
    meta = {"format": FORMAT_VERSION, "step": step, "layout": sizes, "optimizer": optimizer_meta}
    unsaveable = None
    if rank0:  # plain data only: it is loaded with torch.load(weights_only=True), see dcp_io
        try:
            objects["meta"], objects["extra"] = _plain(meta, "meta"), _plain(dict(extra or {}), "extra")
        except TypeError as err:
            unsaveable = str(err)
    token, unsaveable = comm.all_gather_object((uuid.uuid4().hex[:12], unsaveable) if rank0 else None, world)[0]
    if unsaveable is not None:  # every rank raises, before anything is written
        raise TypeError(f"checkpoint step {step}: {unsaveable}")
    tmp = store.temp_dir(root, step, token)
    # Each rank checksums the data files it wrote (while it fsyncs them); rank 0 adds the index and meta.json.
    sums, error = {}, None
    try:
        with _quiet_single_process():
            sums = dcp_io.write_boxes(tmp, _boxes_to_save(chunks, optimizer, layout), objects,
                                      checksums=CHECKSUMS_ENABLED)
    except (Exception, dcp_io.CheckpointException) as err:  # noqa: BLE001 - DCP gathers every rank's errors
        error = _failure(err, root)
    gathered = comm.all_gather_object((error, sums), world)
    error = next((e for e, _ in gathered if e), None)
    if rank0 and error is None:
        try:
            store.write_json(os.path.join(tmp, store.META), {
                **meta, "world_size": layout.world_size, "extra": extra or {}, "torch": torch.__version__,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "model_dtype": str(next((p.param.dtype for p in _params(chunks)), None))})
            if CHECKSUMS_ENABLED:
                files = {name: entry for _, part in gathered for name, entry in part.items()}
                files.update(store.checksum_files(tmp, [store.DCP_INDEX, store.META]))
                store.write_json(os.path.join(tmp, store.CHECKSUMS), {"algorithm": "crc32", "files": files})
        except Exception as err:  # noqa: BLE001 - the other ranks wait for rank 0's outcome below
            error = f"rank 0: {_failure(err, root)}"
    comm.barrier()  # every rank's files, DCP's index, meta.json and the checksums are on disk
    committed = False
    if rank0 and error is None:
        try:
            store.commit(root, tmp, step, token, keep_last)
            committed = True
        except Exception as err:  # noqa: BLE001 - the other ranks wait for rank 0's outcome below
            error = f"rank 0: {_failure(err, root)}"
    if rank0 and not committed:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing behind to fail the next one
    error = comm.all_gather_object(error, world)[0]  # rank 0's outcome, so that every rank raises or none
    if error is not None:
        raise CheckpointError(_save_failure(root, step, error))
    return store.step_dir(root, step)


def _save_failure(root: str, step: int, error: str) -> str:
    previous = store.latest_step(root)
    kept = (f"the previous checkpoint (step {previous}) is intact" if previous is not None
            else "there was no earlier checkpoint")
    return f"saving checkpoint step {step} to {root} failed: {error}; nothing of it was left behind, {kept}"


def _failure(err: BaseException, root: str) -> str:
    """One line: the root cause, and for a filesystem error the space left where it happened."""
    line = _first_line(err)
    # torch's stream writer reports a full disk as a short write ("unexpected pos N vs M"), not ENOSPC
    short_write = "unexpected pos" in line
    if isinstance(_cause(err), OSError) or short_write:
        try:
            line += f" ({_mib(shutil.disk_usage(root).free)} free on {root})"
        except OSError:
            pass
    if short_write:
        line = f"a file write came up short, most likely the disk is full: {line}"
    return line


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


_PLAIN = (str, int, float, bool, bytes, complex, type(None), torch.dtype, torch.Size)


def _plain(value, where: str):
    """`value` as what torch.load(weights_only=True) reads back: dicts, lists, tuples, sets, scalars,
    strings and tensors (other mappings become dicts, sequences lists, enums their value, paths
    strings, numpy scalars Python ones); anything else raises TypeError naming where it is (before
    anything is written)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if value.device.type != "cpu" else value.detach()
    if type(value) in _PLAIN:
        return value
    if isinstance(value, collections.abc.Mapping):  # dict, OrderedDict, a config's mapping type
        out = {}
        for key, item in value.items():
            key = _plain(key, f"{where} key {key!r}")
            out[key] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (tuple, set, frozenset, collections.abc.Sequence)) and not isinstance(value, (str, bytes)):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        kind = tuple if isinstance(value, tuple) else set if isinstance(value, (set, frozenset)) else list
        return kind(items)
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if isinstance(value, _PLAIN[:6]):  # subclasses: numpy.float64, IntEnum handled above, str subclasses
        return next(kind(value) for kind in _PLAIN[:6] if isinstance(value, kind))
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:  # numpy.int64, numpy.bool_
        return value.item()
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds only "
                    "plain data (dicts, lists, numbers, strings, tensors)")


# ----------------------------------------------------------------------------- load


def _boxes_to_load(chunks, optimizer, layout: ParallelLayout, metadata, path: str):
    """fqn -> boxes to fill on this rank (views of live tensors), the tensors to zero before (so that
    padding ends up zero), and the optimizer state dict whose tensors they view (None without optimizer)."""
    reads: dict[str, list[Box]] = {}
    targets: list[torch.Tensor] = []

    def want(fqn, p: _Param, boxes):
        shape = dcp_io.tensor_shape(metadata, fqn)
        if shape is None:
            hint = (" (saved without optimizer state: load with optimizer=None, before build_optimizer)"
                    if fqn.startswith("optim.") else " (saved from another model?)")
            raise CheckpointError(f"checkpoint {path} has no tensor {fqn!r}{hint}")
        if shape != p.spec.full_shape:
            hint = ""
            if ".mlp.router." in fqn or ".mlp.experts." in fqn:  # dim 0 is the global expert index
                hint = (f" (model.moe.num_experts: {shape[0]} in the checkpoint, {p.spec.full_shape[0]} in this "
                        "model; experts are stored by global index, so any parallel.ep loads them, but not another "
                        "expert count)")
            raise CheckpointError(f"checkpoint {path}: {fqn} has shape {shape}, this model {p.spec.full_shape}{hint}")
        reads.setdefault(fqn, []).extend(boxes)

    state = optimizer.state_dict() if optimizer is not None else None
    opt = state["params"] if state is not None else {}
    zero = _zero_sharded(optimizer, layout)
    for p in _params(chunks):
        local, entry = tuple(p.param.shape), opt.get(p.name)
        if entry is not None:
            first, end = entry["range"]
            master = f"optim.master.{p.key}"
            if p.param.dtype == torch.float32 or dcp_io.tensor_shape(metadata, master) is None:
                master = f"model.{p.key}"  # fp32 parameters are their own master weights
            for field, fqn in (("master", master), *((f, f"optim.{f}.{p.key}") for f in STATE_FIELDS)):
                targets.append(entry[field])
                want(fqn, p, boxes_of(entry[field], first, end, p.spec, local))
        elif zero and p.param.requires_grad:
            continue  # outside this rank's ZeRO-1 shard: the optimizer's parameter gather fills it
        else:
            flat = _flat(p.param)
            targets.append(flat)
            want(f"model.{p.key}", p, boxes_of(flat, 0, flat.numel(), p.spec, local))
    return reads, targets, state


def select_checkpoint(root: str, step: int | None = None, set_aside: bool = False) -> int | None:
    """The step to load from `root`, on one process, checked against its checksums (`verify_checkpoint`).

    step=None: the step `latest` names if it is usable, else the newest step_* directory that is,
    warning once (stderr) for each one skipped and why. None when `root` holds no step_* directory at
    all; CheckpointError, listing every step and what is wrong with it, when none is usable.
    step=N: N if it is usable, else CheckpointError with the reason and the other steps that pass
    the checks short of reading their data files.
    Nothing is deleted: with `set_aside` (the run that owns `root`, holding its lock) a skipped step is
    renamed step_N.corrupt-TOKEN, out of the way of pruning and of the next save of that step."""
    steps = store.step_dirs(root)
    if step is not None:
        path = store.step_dir(root, step)
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} under {root} ({_usable(root, steps)})")
        reason = store.verify_checkpoint(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {reason}; "
                                  f"{_usable(root, [s for s in steps if s != step])}")
        return step
    if not steps:
        return None
    marked = store.read_marker(root)
    marker = os.path.join(root, store.MARKER)
    if marked is None and os.path.lexists(marker):
        store.warn(f"{marker} does not name a checkpoint (unreadable or garbage): using the newest usable step")
    elif marked is not None and marked not in steps:
        store.warn(f"{marker} names step {marked}, which is not there: using the newest usable step")
        marked = None
    order = ([marked] if marked is not None else []) + [s for s in reversed(steps) if s != marked]
    skipped = []
    for candidate in order:
        reason = store.verify_checkpoint(store.step_dir(root, candidate))
        if reason is None:
            for bad, why in skipped:
                kept = ""
                if set_aside:
                    try:
                        kept = f"; kept as {os.path.basename(store.set_aside(root, bad, uuid.uuid4().hex[:12]))}"
                    except OSError as err:
                        kept = f"; could not be set aside ({type(err).__name__}: {err})"
                store.warn(f"checkpoint {os.path.basename(store.step_dir(root, bad))} under {root} is unusable "
                           f"({why}): falling back to {os.path.basename(store.step_dir(root, candidate))}{kept}")
            return candidate
        skipped.append((candidate, reason))
    raise CheckpointError(f"no usable checkpoint under {root}: " + "; ".join(
        f"{os.path.basename(store.step_dir(root, bad))}: {why}" for bad, why in sorted(skipped, reverse=True)))


def _usable(root: str, steps: list[int]) -> str:
    """For an error message: the steps that pass the checks short of reading their data files (complete,
    sizes as saved, index and meta.json checksums), so that naming them costs no full read of each."""
    good = [s for s in steps if store.verify_checkpoint(store.step_dir(root, s), contents=False) is None]
    return f"steps there that pass the quick checks (data files not read): {good or 'none'}"


def load_checkpoint(root: str, chunks, optimizer, layout: ParallelLayout, step: int | None = None,
                    verify: bool = True) -> dict:
    """Collective: load checkpoint `step` into this rank's chunks and optimizer (None: the model only),
    whatever layout saved it; returns the `extra` dict it was saved with. step=None: the newest usable
    one (`select_checkpoint`: rank 0 chooses, checking checksums, and tells every rank; always
    verified). With `verify` rank 0 checks an explicit `step` against its checksums before any rank
    reads it (False: the caller already did, e.g. the launcher's resume plan). Raises FileNotFoundError
    when there is no such checkpoint, CheckpointError on every rank together when it is unusable."""
    outcome = None
    if layout.rank == 0:
        try:
            if step is not None and not os.path.isdir(store.step_dir(root, step)):
                raise FileNotFoundError(f"checkpoint {store.step_dir(root, step)!r} does not exist (steps under "
                                        f"{root!r}: {store.step_dirs(root)})")
            if step is None:
                chosen = select_checkpoint(root)
                if chosen is None:
                    raise FileNotFoundError(f"no checkpoint under {root!r}: no step_* directory")
            else:
                chosen = select_checkpoint(root, step) if verify else step
            if verify and not store.has_checksums(store.step_dir(root, chosen)):
                store.warn(f"checkpoint {store.step_dir(root, chosen)} has no {store.CHECKSUMS} (saved before "
                           "checksums were recorded): loading it unverified")
            outcome = ("ok", chosen)
        except (CheckpointError, FileNotFoundError) as err:
            outcome = (type(err).__name__, str(err))
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, none left waiting below
            outcome = ("CheckpointError", f"choosing a checkpoint under {root} failed: {_first_line(err)}")
    status, value = comm.all_gather_object(outcome, _world(layout))[0]
    if status != "ok":
        raise (FileNotFoundError if status == "FileNotFoundError" else CheckpointError)(value)
    step, path = value, store.step_dir(root, value)  # what each rank finds there is checked together in _load
    with torch.no_grad():
        extra, restored, saved_layout = _load(path, step, chunks, optimizer, layout)
    if not restored and layout.rank == 0:
        warnings.warn(f"checkpoint {path} was saved with layout {saved_layout}: dropout generators re-seeded "
                      f"from (seed, step {step}) instead of restored", stacklevel=2)
    return extra


def _load(path: str, step: int, chunks, optimizer, layout: ParallelLayout):
    world, rng_key = _world(layout), _rng_key(layout)
    error, reads, targets, state, objects = None, {}, [], None, ["meta", "extra"]
    try:
        if not store.is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete: no {store.DCP_INDEX} or {store.META}")
        try:
            metadata = dcp_io.read_metadata(path)
        except dcp_io.UnsafeCheckpoint as err:
            raise CheckpointError(f"checkpoint {path}: {store.DCP_INDEX} {err}") from None
        except Exception as err:  # noqa: BLE001 - any unpickling error means a damaged index
            raise CheckpointError(f"checkpoint {path}: its index {store.DCP_INDEX} is unreadable "
                                  f"({type(err).__name__}: {err})") from err
        try:
            fmt = store.read_json(os.path.join(path, store.META)).get("format")
        except (OSError, ValueError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path}: {store.META} is unreadable "
                                  f"({type(err).__name__}: {err})") from err
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format {fmt!r}; this code reads formats up to "
                                  f"{FORMAT_VERSION}")
        reads, targets, state = _boxes_to_load(chunks, optimizer, layout, metadata, path)
        if rng_key in metadata.state_dict_metadata:
            objects.append(rng_key)
    except CheckpointError as err:
        error = str(err)
    errors = [e for e in comm.all_gather_object(error, world) if e is not None]
    if errors:  # every rank raises, none is left waiting in DCP's collectives
        raise CheckpointError(errors[0])
    for tensor in targets:
        tensor.zero_()
    try:
        with _quiet_single_process():
            loaded = dcp_io.read_boxes(path, reads, objects)
    except (Exception, dcp_io.CheckpointException) as err:  # noqa: BLE001 - DCP gathers every rank's read errors
        if isinstance(_cause(err), dcp_io.UnsafeCheckpoint):
            raise CheckpointError(f"checkpoint {path}: {_cause(err)}") from None
        raise CheckpointError(f"checkpoint {path} could not be read (a truncated or corrupt data file?): "
                              f"{_first_line(err)}") from err
    meta = loaded["meta"]
    if optimizer is not None:
        state["step"] = meta["optimizer"]["step"]
        state["loss_scaler"] = meta["optimizer"]["loss_scaler"]
        optimizer.load_state_dict(state)  # parameters from master weights, ZeRO-1 gather over DP
    restored = _restore_rng(chunks, layout, loaded.get(rng_key), step)
    return loaded["extra"], restored, meta["layout"]


def _cause(err: BaseException) -> BaseException:
    """For DCP's gathered exception, the first failing rank's error; else `err` itself."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = failures[min(failures)]
        cause = cause[0] if isinstance(cause, tuple) else cause
        return cause if isinstance(cause, BaseException) else err
    return err


def _first_line(err: BaseException) -> str:
    """The root cause in one line: for DCP's gathered exception, the first failing rank's error."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        cause = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        return f"rank {rank}: {type(cause).__name__}: {str(cause).splitlines()[0][:400] if str(cause) else ''}"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:400] if str(err) else ''}"


def latest_step(root: str) -> int | None:
    """The step of the newest complete checkpoint under `root` (the `latest` marker), or None; not
    verified (see `select_checkpoint`)."""
    return store.latest_step(root)
