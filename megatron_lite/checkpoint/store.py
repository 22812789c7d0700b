"""The checkpoint directory: complete checkpoints, the `latest` marker, leftovers of killed saves.

    root/
      step_00000200/            complete: renamed from its temporary name only after every rank wrote
        .metadata               DCP's index of every tensor chunk and object
        __<rank>_0.distcp       DCP data files, one per rank that wrote something
        meta.json               for humans: step, layout, extra state
      step_00000300.tmp-1a2b3c  a save in progress, or killed: never loaded, removed by the next save
      latest                    "step_00000200": the newest complete checkpoint (replaced atomically)

Only rank 0 touches these names; the other ranks write their data files inside the temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings

STEP_DIR = re.compile(r"^step_(\d{8,})$")
LEFTOVER = re.compile(r"^step_\d{8,}\.(tmp|old)-[0-9a-f]+$")
MARKER = "latest"
META = "meta.json"
DCP_INDEX = ".metadata"


def step_dir(root: str, step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return os.path.join(root, f"step_{step:08d}")


def temp_dir(root: str, step: int, token: str) -> str:
    return f"{step_dir(root, step)}.tmp-{token}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DCP_INDEX)) and os.path.isfile(os.path.join(path, META))


def complete_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        if match and is_complete(os.path.join(root, name)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(root: str) -> int | None:
    """The step the `latest` marker names; if the marker is missing or names no complete checkpoint
    (deleted by hand), the newest complete checkpoint; None when there is none."""
    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            match = STEP_DIR.match(f.read().strip())
        if match and is_complete(step_dir(root, int(match.group(1)))):
            return int(match.group(1))
        warnings.warn(f"{marker} does not name a complete checkpoint; using the newest complete one", stacklevel=2)
    steps = complete_steps(root)
    return steps[-1] if steps else None


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=repr)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync directories
    finally:
        os.close(fd)


def _write_marker(root: str, step: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(os.path.basename(step_dir(root, step)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MARKER))
    _fsync_dir(root)


def commit(root: str, tmp: str, step: int, token: str, keep_last: int | None) -> str:
    """Rank 0, after every rank finished writing `tmp`: make it the checkpoint of `step` and the
    `latest` one, then remove leftovers of killed saves and all but the newest `keep_last` checkpoints."""
    final = step_dir(root, step)
    old = None
    if os.path.exists(final):  # saving a step again: the old copy stays until the new one is in place
        old = f"{final}.old-{token}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_marker(root, step)
    for name in os.listdir(root):
        if LEFTOVER.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last is not None:
        others = [s for s in complete_steps(root) if s != step]  # oldest first
        for older in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(step_dir(root, older), ignore_errors=True)
    return final
