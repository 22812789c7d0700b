"""Start N real processes on this machine, run a function on each, and never hang.

Used by the tests (gloo on CPU) and by the local launcher. Children come from a forkserver that has
imported torch once, so a spawn costs a fork rather than a fresh interpreter. The first rank to
fail ends the run: its traceback is raised in the parent and the other ranks (often blocked in a
collective waiting for the dead one) are terminated.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue as queue_lib
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable

import torch


class RankFailure(RuntimeError):
    """A rank raised, crashed or timed out; the message holds its traceback."""


def _worker(fn, rank, world_size, store_path, args, results, timeout_s, backend, threads):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put(("ok", rank, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, KeyboardInterrupt included
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 180.0, backend: str = "gloo",
                 threads_per_rank: int = 1) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return their results by rank.

    `fn` must be importable (a module-level function). Raises RankFailure with the first failing
    rank's traceback, or naming the ranks still running when `timeout_s` expires.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = _context()
    workdir = tempfile.mkdtemp(prefix="megatron_lite_spawn_")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, daemon=True,
                    args=(fn, rank, world_size, os.path.join(workdir, "store"), args, results, timeout_s, backend,
                          threads_per_rank))
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
        return _collect(procs, results, world_size, timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


# Errors a healthy rank raises only because a peer died: reported after the peer's own failure.
_SECONDARY_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket Timeout")
_GRACE_S = 2.0


def _collect(procs, results, world_size, timeout_s):
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    failed_at = None
    while len(values) + len(failures) < world_size:
        if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
            break
        try:
            status, rank, payload = results.get(timeout=0.2)
        except queue_lib.Empty:
            for rank, proc in enumerate(procs):
                if proc.exitcode not in (None, 0) and rank not in values and rank not in failures:
                    failures[rank] = (f"rank {rank} died with exit code {proc.exitcode} without a traceback "
                                      "(killed, out of memory or a crash in native code)")
            if failures and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is None and time.monotonic() > deadline:
                waiting = [r for r in range(world_size) if r not in values]
                raise RankFailure(f"timed out after {timeout_s:.0f}s; ranks {waiting} did not finish")
            continue
        if status == "error":
            failures[rank] = f"rank {rank} failed:\n{payload}"
            failed_at = failed_at or time.monotonic()
        else:
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    if failures:
        raise RankFailure(_root_cause_first(failures))
    return [values[r] for r in range(world_size)]


def _root_cause_first(failures: dict[int, str]) -> str:
    def secondary(message: str) -> bool:
        return any(marker in message for marker in _SECONDARY_ERRORS)

    ordered = sorted(failures.items(), key=lambda item: (secondary(item[1]), item[0]))
    first_rank, first = ordered[0]
    others = [rank for rank, _ in ordered[1:]]
    return first + (f"\n(ranks {others} failed too, most likely as a consequence)" if others else "")
