"""Which checkpoints belong to a run, and what it starts from.

A run owns one checkpoint directory: by default `checkpoints/` inside its own output directory (one
per run and per sweep point), or `checkpoint.dir` when that is absolute. The directory records its
owner (`run.json`: the run's identity) and is locked (`.lock`, an flock held by the launching process
for the whole job), so that:

- a run continues from its own checkpoints only (a requeue, or a rerun in the same output directory);
- continuing another run is explicit: `checkpoint.resume_from=DIR` (its newest good step, or
  `checkpoint.step=N`), and the new run still writes into its own directory;
- a directory that holds another run's checkpoints, or one a live job is writing, is refused with a
  message that says how to proceed; nothing in it is overwritten or pruned;
- the model config saved with the checkpoint must equal this run's; a difference is named.

One process decides (the local launcher, or rank 0 under torchrun/srun) before the ranks load; the
decision is plain data that rank 0 broadcasts.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass

from megatron_lite.checkpoint import select_checkpoint
from megatron_lite.checkpoint import store

OWNER = "run.json"
LOCK = ".lock"


@dataclass(frozen=True)
class ResumePlan:
    """save_dir: where this run writes its checkpoints (None: it saves none). load_dir/load_step: the
    checkpoint to start from (None: step 0). source: "fresh", "own" (this run's, e.g. a requeue) or
    "resume_from" (another run's, asked for explicitly)."""

    run_id: str
    save_dir: str | None = None
    load_dir: str | None = None
    load_step: int | None = None
    source: str = "fresh"


def run_identity(run_dir: str | None, environ=os.environ) -> str:
    """What makes two launches the same run: the SLURM job (a requeued job keeps its id), otherwise the
    run's output directory (a rerun with the same hydra.run.dir continues it)."""
    if environ.get("SLURM_JOB_ID"):
        return f"slurm-job:{environ['SLURM_JOB_ID']}"
    return f"run-dir:{os.path.abspath(run_dir or os.getcwd())}"


def checkpoint_dir(configured: str | None, run_dir: str | None) -> str | None:
    """checkpoint.dir made absolute: a relative one lives inside the run's output directory."""
    if not configured:
        return None
    path = os.path.expanduser(configured)
    if not os.path.isabs(path):
        path = os.path.join(run_dir or os.getcwd(), path)
    return os.path.abspath(path)


class DirectoryLock:
    """An exclusive flock on DIR/.lock, held until `release` or the process ends (a killed job frees
    it by itself). Refuses with the holder's pid and host when a live job holds it."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_text(self.path) or "unknown"
            os.close(fd)
            raise ValueError(f"checkpoint.dir={os.path.dirname(self.path)} is in use by a live job ({holder}); "
                             "give this run its own checkpoint.dir (or the default, inside its output directory)"
                             ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return None


def read_owner(directory: str) -> dict | None:
    """The owner record of a checkpoint directory; None when missing or unreadable (never raises)."""
    text = _read_text(os.path.join(directory, OWNER))
    try:
        owner = json.loads(text) if text else None
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


def _write_owner(directory: str, run_id: str) -> None:
    store.write_json(os.path.join(directory, OWNER) + ".tmp", {
        "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    os.replace(os.path.join(directory, OWNER) + ".tmp", os.path.join(directory, OWNER))


def saved_model_config(directory: str, step: int) -> dict | None:
    """The `model` section of the run config saved with a checkpoint (None if it has none)."""
    try:
        meta = store.read_json(os.path.join(store.step_dir(directory, step), store.META))
        model = meta["extra"]["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model if isinstance(model, dict) else None


def model_differences(saved: dict, current: dict) -> list[str]:
    """'model.num_layers: checkpoint 4, this run 2' for every architecture field that differs (the
    preset's name and the Hugging Face directory it came from are only labels; a field absent from an
    older checkpoint equals null)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ("name", "path"):
            continue
        old, new = saved.get(key), current.get(key)
        if old != new and not (isinstance(old, (int, float)) and isinstance(new, (int, float)) and float(old) == float(new)):
            out.append(f"model.{key}: checkpoint {old!r}, this run {new!r}")
    return out


def _check_same_model(directory: str, step: int, model: dict, how_to_proceed: str) -> None:
    saved = saved_model_config(directory, step)
    if saved is None:
        return  # saved outside the trainer (no run config): shapes are still checked at load
    diffs = model_differences(saved, model)
    if diffs:
        raise ValueError(f"the checkpoint {store.step_dir(directory, step)} is of another model ("
                         + "; ".join(diffs) + f"); {how_to_proceed}")


def plan_resume(cfg, run_dir: str | None, environ=os.environ) -> tuple[ResumePlan, DirectoryLock | None]:
    """Decide, from the filesystem only, where this run saves and what it loads; takes the directory's
    lock (returned: keep it for the job's lifetime). Raises ValueError (bad request, another run's or
    a live job's directory, another model) or CheckpointError (nothing usable) with what to do."""
    save_dir = checkpoint_dir(cfg.checkpoint.dir, run_dir)
    held = None
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        held = DirectoryLock(save_dir).acquire()
    try:
        return _plan(cfg, run_identity(run_dir, environ), save_dir), held
    except BaseException:
        if held is not None:
            held.release()
        raise


def _plan(cfg, run_id: str, save_dir: str | None) -> ResumePlan:
    ckpt, model = cfg.checkpoint, dataclasses.asdict(cfg.model)
    if save_dir is not None:
        own_step = _own_checkpoint(save_dir, run_id, ckpt)
        if (read_owner(save_dir) or {}).get("run_id") != run_id:
            _write_owner(save_dir, run_id)
        if own_step is not None:
            _check_same_model(save_dir, own_step, model,
                              "set the model back to the checkpoint's values, or start a new run (another output "
                              "directory or checkpoint.dir)")
            return ResumePlan(run_id, save_dir, save_dir, own_step, "own")
    if ckpt.resume_from:
        source = os.path.abspath(os.path.expanduser(ckpt.resume_from))
        if source == save_dir:
            raise ValueError(f"checkpoint.resume_from={ckpt.resume_from} is this run's own checkpoint.dir; "
                             "drop checkpoint.resume_from (a run resumes from its own checkpoints by itself)")
        step = select_checkpoint(source, ckpt.step)
        if step is None:
            raise ValueError(f"checkpoint.resume_from={ckpt.resume_from} holds no checkpoint (no step_* "
                             "directory); point it at the checkpoint.dir of the run to continue")
        _check_same_model(source, step, model,
                          "set this run's model to the checkpoint's values, or drop checkpoint.resume_from")
        return ResumePlan(run_id, save_dir, source, step, "resume_from")
    if ckpt.step is not None:
        raise ValueError(f"checkpoint.step={ckpt.step} but there is nothing to load: this run has no "
                         "checkpoints of its own; add checkpoint.resume_from=DIR to start from another run's")
    return ResumePlan(run_id, save_dir)


def _own_checkpoint(save_dir: str, run_id: str, ckpt) -> int | None:
    """The step of this run's own checkpoint to continue from (None: none); refuses another run's."""
    steps = store.step_dirs(save_dir)
    if not steps:
        return None  # nothing to lose: an empty directory, or only leftovers of killed saves
    owner = read_owner(save_dir)
    if owner is None or owner.get("run_id") != run_id:
        who = (f"run {owner.get('run_id')} (started {owner.get('created')} on {owner.get('host')})" if owner
               else "another run (no owner record)")
        raise ValueError(f"checkpoint.dir={save_dir} holds the checkpoints of {who}: this run will not write over "
                         f"them. To continue that run, start with checkpoint.resume_from={save_dir} (and a "
                         "checkpoint.dir of its own, e.g. the default); to start fresh, choose another checkpoint.dir")
    if not ckpt.resume:
        raise ValueError(f"checkpoint.dir={save_dir} already holds checkpoints of this run (steps {steps}); "
                         "checkpoint.resume=false would write over them: resume (checkpoint.resume=true), or start "
                         "a new run in another directory")
    # checkpoint.step picks among the run's own steps, unless it was meant for resume_from (its first launch)
    return select_checkpoint(save_dir, None if ckpt.resume_from else ckpt.step, set_aside=True)
