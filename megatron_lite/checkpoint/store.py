"""The checkpoint directory: complete checkpoints, the `latest` marker, leftovers of killed saves.

    root/
      step_00000200/            complete: renamed from its temporary name only after every rank wrote
        .metadata               DCP's index of every tensor chunk and object
        __<rank>_0.distcp       DCP data files, one per rank that wrote something
        meta.json               for humans: step, layout, extra state
        checksums.json          size and CRC-32 of every file above (written last, by rank 0):
                                checked before a load (store.verify_checkpoint)
      step_00000300.tmp-1a2b3c  a save in progress, or killed: never loaded, removed by the next save
      step_00000300.corrupt-4d5e  a step that failed its checks, set aside when a run fell back from it
                                or saved that step again: never loaded, pruned or deleted
      latest                    "step_00000200": the newest complete checkpoint (replaced atomically)

Only rank 0 touches these names; the other ranks write their data files inside the temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zlib

STEP_DIR = re.compile(r"^step_(\d{8,})$")
LEFTOVER = re.compile(r"^step_\d{8,}\.(tmp|old)-[0-9a-f]+$")
MARKER = "latest"
META = "meta.json"
DCP_INDEX = ".metadata"
CHECKSUMS = "checksums.json"
_BLOCK = 16 << 20


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
    return [step for step in step_dirs(root) if is_complete(step_dir(root, step))]


def step_dirs(root: str) -> list[int]:
    """Steps of every step_* directory under `root` (complete or not), oldest first; never raises."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, names) if m)


def read_marker(root: str) -> int | None:
    """The step `latest` names; None when it is missing or holds anything else (never raises)."""
    path = os.path.join(root, MARKER)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a directory, a FIFO (opening it would block) ...
            return None
        with open(path, "rb") as f:
            text = f.read(256).decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return None
    match = STEP_DIR.match(text)
    return int(match.group(1)) if match else None


def latest_step(root: str) -> int | None:
    """The newest complete checkpoint: the one `latest` names, else the newest complete step_*
    directory; None when there is none. Never raises (see `select_checkpoint` for a verified choice)."""
    marked = read_marker(root)
    if marked is not None and is_complete(step_dir(root, marked)):
        return marked
    steps = complete_steps(root)
    return steps[-1] if steps else None


def file_checksum(path: str) -> dict:
    """{"size": bytes, "crc32": hex} of a file, read in large blocks."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"size": size, "crc32": f"{crc:08x}"}


def checksum_files(directory: str, names: list[str]) -> dict[str, dict]:
    return {name: file_checksum(os.path.join(directory, name)) for name in names}


def verify_checkpoint(path: str, contents: bool = True) -> str | None:
    """Why the checkpoint at `path` cannot be used, in one line ("__1_0.distcp: checksum mismatch
    (...)", "meta.json is unreadable (...)", "incomplete: no .metadata"), or None when it can: it is
    complete, its meta.json readable, and every file checksums.json lists has the size and (with
    `contents`; without it only the small index and meta.json are read) the CRC-32 it had when saved.
    A checkpoint written before checksums were recorded (no checksums.json) is checked for
    completeness only. Never raises."""
    try:
        if not os.path.isdir(path):
            return "no such directory"
        for name in (DCP_INDEX, META):
            if not os.path.isfile(os.path.join(path, name)):
                return f"incomplete: no {name}"
        try:
            meta = read_json(os.path.join(path, META))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            return f"{META} is unreadable ({_brief(err)})"
        manifest_path = os.path.join(path, CHECKSUMS)
        expected = {}
        if os.path.exists(manifest_path):
            try:
                payload = read_json(manifest_path)
                if payload.get("algorithm", "crc32") != "crc32":
                    raise ValueError(f"unknown algorithm {payload.get('algorithm')!r}")
                expected = {str(name): (int(entry["size"]), str(entry["crc32"]))
                            for name, entry in payload["files"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                return f"{CHECKSUMS} is unreadable ({_brief(err)})"
        for name, (size, crc) in sorted(expected.items(), key=lambda item: (item[0] != DCP_INDEX, item[0])):
            file = os.path.join(path, name)
            try:
                actual = os.path.getsize(file)
                if actual != size:
                    return f"{name}: {actual} bytes, {size} when saved (truncated or overwritten)"
                if (contents or name in (DCP_INDEX, META)) and file_checksum(file)["crc32"] != crc:
                    return f"{name}: checksum mismatch (modified or corrupted after the save)"
            except FileNotFoundError:
                return f"{name}: missing (listed in {CHECKSUMS})"
            except OSError as err:
                return f"{name}: {_brief(err)}"
        return None
    except Exception as err:  # noqa: BLE001 - a check that raises would stop the fallback to a good step
        return f"cannot be checked ({_brief(err)})"


def has_checksums(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CHECKSUMS))


def _brief(err: BaseException) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


def set_aside(root: str, step: int, token: str) -> str:
    """Rename an unusable step directory out of the way (never loaded, pruned or overwritten)."""
    kept = f"{step_dir(root, step)}.corrupt-{token}"
    os.rename(step_dir(root, step), kept)
    _fsync_dir(root)
    return kept


def commit(root: str, tmp: str, step: int, token: str, keep_last: int | None) -> str:
    """Rank 0, after every rank finished writing `tmp`: make it the checkpoint of `step` and the
    `latest` one, then remove leftovers of killed saves (the run holds the directory's lock: they are
    its own) and the oldest checkpoints beyond `keep_last`. Nothing recoverable is deleted: an earlier
    copy of `step` stays (as step_N.old-TOKEN) until the new one is in place, and if it fails its checks
    (the step a run fell back from) it is kept as step_N.corrupt-TOKEN, never deleted. Pruning counts
    only usable checkpoints older than `step` (complete, sizes as saved: a structural check, the
    data is not re-read); unusable ones and newer ones are left alone."""
    final = step_dir(root, step)
    _fsync_dir(tmp)  # the names of the files in it, before it becomes the checkpoint
    if os.path.lexists(final):  # saving a step again: the old copy stays until the new one is in place
        unusable = verify_checkpoint(final)
        if unusable:
            kept = set_aside(root, step, token)
            warn(f"the earlier copy of {os.path.basename(final)} is unusable ({unusable}): kept as {kept}")
        else:
            os.rename(final, f"{final}.old-{token}")
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_marker(root, step)
    for name in os.listdir(root):
        if LEFTOVER.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last is not None:
        kept_older = 0
        for older in reversed([s for s in step_dirs(root) if s < step]):  # newest first
            if verify_checkpoint(step_dir(root, older), contents=False) is not None:
                continue  # not counted, not deleted: select_checkpoint skips it, a human may want it
            if kept_older < keep_last - 1:
                kept_older += 1
            else:
                shutil.rmtree(step_dir(root, older), ignore_errors=True)
    return final
