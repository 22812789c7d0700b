"""Start N real processes on this machine, run a function on each, and never hang.

Used by the tests (gloo on CPU) and by the local launcher. Children come from a forkserver that has
imported torch once, so a spawn costs a fork rather than a fresh interpreter. The first rank to
fail ends the run: its traceback is raised in the parent and the other ranks (often blocked in a
collective waiting for the dead one) are terminated.

Supervision, so that no rank outlives or outwaits the job:
- every rank dies with the launcher: a kernel parent-death signal (the forkserver, its parent, exits
  when the launcher does) and a watchdog thread that checks the launcher's pid;
- a collective that waits longer than `collective_timeout_s` raises on the waiting ranks; a rank
  that then never reported (stopped, deadlocked) is named as the one that stopped responding;
- with `forward_signals`, SIGTERM/SIGUSR1 (and SIGHUP, as SIGTERM) to the launcher reach every rank,
  which then stop like under srun, and the launcher waits for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import io
import multiprocessing
import os
import queue as queue_lib
import shutil
import signal
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

import torch


class RankFailure(RuntimeError):
    """A rank raised, crashed or timed out; the message holds its traceback."""


_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 0.5


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _die_with(launcher_pid: int) -> None:
    """Kill this process as soon as the launcher is gone: no orphan rank trains on alone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch():
        while _alive(launcher_pid):
            time.sleep(_WATCH_INTERVAL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _thread_lock_for_progress_bars() -> None:
    """tqdm's default lock is a named multiprocessing semaphore that it never releases: in a rank (whose
    start method is forkserver) that ends every run with a "leaked semaphore" warning. A rank draws its
    own bars, so a thread lock is enough."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _worker(fn, rank, world_size, store_path, args, results, collective_timeout_s, backend, threads, launcher_pid):
    _die_with(launcher_pid)
    _thread_lock_for_progress_bars()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        if backend == "nccl":  # one GPU per local rank, current before NCCL's communicators exist
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put(("ok", rank, buffer.getvalue()))
    except BaseException as err:  # noqa: BLE001 - everything must reach the parent, KeyboardInterrupt included
        if getattr(err, "report_without_traceback", False):  # a message for the user, not a bug
            results.put(("error", rank, f"{type(err).__name__}: {err}"))
        else:
            results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


# Forwarded to every rank by a launcher run with forward_signals; SIGHUP (the terminal went away)
# asks for the same orderly stop as SIGTERM.
FORWARDED_SIGNALS = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGHUP: signal.SIGTERM}


@contextlib.contextmanager
def _forwarding(procs, enabled: bool):
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, FORWARDED_SIGNALS[signum])

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, timeout_s: float | None = 180.0,
                 backend: str = "gloo", threads_per_rank: int = 1, collective_timeout_s: float | None = None,
                 forward_signals: bool = False) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return their results by rank.

    `fn` must be importable (a module-level function). `timeout_s` bounds the whole run (None: no
    bound, for a training job); `collective_timeout_s` (default: `timeout_s`, or 600 s) bounds one
    collective. Raises RankFailure with the first failing rank's traceback, naming the rank that
    stopped responding, or the ranks still running when `timeout_s` expires. With `forward_signals`
    (the launcher's main thread), SIGTERM, SIGUSR1 and SIGHUP are passed on to the ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if collective_timeout_s is None:
        collective_timeout_s = timeout_s if timeout_s is not None else 600.0
    ctx = _context()
    workdir = tempfile.mkdtemp(prefix="megatron_lite_spawn_")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, daemon=True,
                    args=(fn, rank, world_size, os.path.join(workdir, "store"), args, results, collective_timeout_s,
                          backend, threads_per_rank, os.getpid()))
        for rank in range(world_size)
    ]
    try:
        with _forwarding(procs, forward_signals):
            for proc in procs:
                proc.start()
            return _collect(procs, results, world_size, timeout_s, collective_timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                with contextlib.suppress(OSError, TypeError):
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped rank acts on SIGTERM only once continued
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
        results.join_thread()
        shutil.rmtree(workdir, ignore_errors=True)


# Errors a healthy rank raises only because a peer died or stopped: reported after the peer's own failure.
_SECONDARY_ERRORS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket Timeout",
                     "Timed out waiting", "timed out", "Timeout", "caused pair closure")
_GRACE_S = 2.0


def _secondary(message: str) -> bool:
    return any(marker in message for marker in _SECONDARY_ERRORS)


def _process_state(pid: int | None) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError, TypeError):
        return "unknown"
    return {"T": "stopped (SIGSTOP?)", "t": "stopped by a debugger", "D": "blocked in I/O", "S": "waiting",
            "R": "running", "Z": "exited"}.get(state, state)


def _collect(procs, results, world_size, timeout_s, collective_timeout_s):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    failed_at = last_done_at = None
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
            now = time.monotonic()
            if failed_at is None and deadline is not None and now > deadline:
                waiting = [r for r in range(world_size) if r not in values]
                raise RankFailure(f"timed out after {timeout_s:.0f}s; ranks {waiting} did not finish")
            if failed_at is None and last_done_at is not None and now - last_done_at > collective_timeout_s:
                break  # the others finished long ago: the silent ones are reported below
            continue
        if status == "error":
            failures[rank] = f"rank {rank} failed:\n{payload}"
            failed_at = failed_at or time.monotonic()
        else:
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)  # from our own child: trusted
            last_done_at = time.monotonic()
    silent = [r for r in range(world_size) if r not in values and r not in failures]
    stopped = any(_process_state(procs[r].pid).startswith("stopped") for r in silent)
    if silent and (not failures or stopped or all(_secondary(m) for m in failures.values())):
        for rank in silent:
            failures[rank] = (f"rank {rank} stopped responding: no result and no error while "
                              + (f"ranks {sorted(failures)} timed out waiting for it" if failures else
                                 f"the other ranks finished {collective_timeout_s:.0f} s ago")
                              + f" (collective timeout {collective_timeout_s:.0f} s; its process is "
                              f"{_process_state(procs[rank].pid)})")
    if failures:
        raise RankFailure(_root_cause_first(failures))
    return [values[r] for r in range(world_size)]


def _root_cause_first(failures: dict[int, str]) -> str:
    def rank_of_blame(item):  # a silent rank first, then real errors, then errors caused by a dead peer
        return (0 if "stopped responding" in item[1] else 2 if _secondary(item[1]) else 1), item[0]

    ordered = sorted(failures.items(), key=rank_of_blame)
    first_rank, first = ordered[0]
    same = [rank for rank, message in ordered[1:] if message.split("\n", 1)[-1] == first.split("\n", 1)[-1]]
    others = [rank for rank, _ in ordered[1:] if rank not in same]
    return (first + (f"\n(ranks {same} reported the same)" if same else "")
            + (f"\n(ranks {others} failed too, most likely as a consequence)" if others else ""))
