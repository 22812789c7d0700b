"""What the benchmarks share: building systems on real ranks, timing their steps, reporting the results.

A system is built by a module-level function `build(rank, world, *args) -> {"step": fn() -> loss,
"params": int, optionally "timer": StepTimer, "close": fn(), "check": any picklable value (e.g. an
equivalence check made at build time), returned per rank as the run's "checks"}`. `run_group` starts one set of processes
for one or more systems; with several (a paired run) their timed steps alternate A B B A ..., so that
both see the same machine load, which on a shared machine drifts by more than the differences measured.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import time
from typing import Callable

import torch
import torch.distributed as dist

from megatron_lite.parallel.spawn import run_on_ranks

SystemSpec = tuple[str, Callable[..., dict], tuple]  # (name, build function, its extra arguments)


class StepTimer:
    """Wraps a callable (an optimizer's or engine's step) and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run_systems(rank: int, world: int, systems: list[SystemSpec], warmup: int, steps: int) -> dict:
    """On one rank: build each system, warm each up, then time their steps, alternating A B B A ...
    A timed step runs between two barriers."""
    built, results = {}, {}
    for name, build, args in systems:
        start = time.perf_counter()
        built[name] = build(rank, world, *args)
        results[name] = {"times": [], "cpu_times": [], "step_call_times": [], "loss": float("nan"),
                         "threads": torch.get_num_threads(), "params": built[name]["params"],
                         "setup_s": time.perf_counter() - start, "check": built[name].get("check")}
    for name, b in built.items():
        start = time.perf_counter()
        for _ in range(warmup):
            results[name]["loss"] = b["step"]()
        results[name]["warmup_s"] = time.perf_counter() - start
    names = list(built)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            b, r = built[name], results[name]
            timer = b.get("timer")
            if timer is not None:
                timer.seconds = 0.0
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            r["loss"] = b["step"]()
            dist.barrier()
            r["times"].append(time.perf_counter() - start)
            r["cpu_times"].append(time.process_time() - cpu_start)
            r["step_call_times"].append(timer.seconds if timer is not None else None)
    for b in built.values():
        if "close" in b:
            b["close"]()
    return results


def run_group(systems: list[SystemSpec], world: int, warmup: int, steps: int, threads: int,
              timeout_s: float) -> dict[str, dict]:
    """One fresh set of `world` processes running `systems`; per timed step the slowest rank's time."""
    start = time.perf_counter()
    per_rank = run_on_ranks(run_systems, world, systems, warmup, steps, timeout_s=timeout_s, threads_per_rank=threads)
    wall = time.perf_counter() - start
    out = {}
    for name, _, _ in systems:
        ranks = [r[name] for r in per_rank]
        out[name] = {
            "step_times_s": [max(r["times"][i] for r in ranks) for i in range(steps)],
            # CPU seconds per step summed over the ranks (all threads, gloo's included): the work a
            # system does, much less sensitive than wall time to other jobs sharing the machine.
            "cpu_s": [sum(r["cpu_times"][i] for r in ranks) for i in range(steps)],
            "step_call_s": [max(r["step_call_times"][i] for r in ranks) for i in range(steps)]
            if ranks[0]["step_call_times"][0] is not None else None,  # None: the system has no separate step()
            "threads_per_rank": sorted({r["threads"] for r in ranks}),
            "params_per_rank": ranks[0]["params"], "params": sum(r["params"] for r in ranks),
            "loss": ranks[-1]["loss"],  # the last rank: the pipeline's last stage computes it
            "setup_s": max(r["setup_s"] for r in ranks), "warmup_s": max(r["warmup_s"] for r in ranks),
            "wall_s": wall, "paired_with": [other for other, _, _ in systems if other != name],
            "checks": [r["check"] for r in ranks],
        }
    return out


def pair_groups(systems: list[str], pairs, paired: bool) -> list[list[str]]:
    """The process sets of one round: each compared pair together when `paired` (a system joins the
    first listed pair it belongs to), every other system alone."""
    groups: list[list[str]] = []
    if paired:
        for ours, peer in pairs:
            taken = {s for g in groups for s in g}
            if ours in systems and peer in systems and not {ours, peer} & taken:
                groups.append([ours, peer])
    taken = {s for g in groups for s in g}
    return groups + [[s] for s in systems if s not in taken]


def summarize(system: str, label: str, runs: list[dict], **extra) -> dict:
    """One table row: the timed steps of all rounds pooled."""
    pooled = lambda key: [t for run in runs for t in run[key]]  # noqa: E731
    steps = pooled("step_times_s")
    return {"system": system, "label": label, **extra, "median_s": statistics.median(steps), "min_s": min(steps),
            "max_s": max(steps), "cpu_median_s": statistics.median(pooled("cpu_s")),
            "step_call_median_s": statistics.median(pooled("step_call_s")) if runs[0]["step_call_s"] else None,
            "threads_per_rank": sorted({t for run in runs for t in run["threads_per_rank"]}),
            "params_per_rank": runs[0]["params_per_rank"], "params": runs[0]["params"], "loss": runs[-1]["loss"],
            "runs": runs}


def ratio_interval(ours: list[dict], peer: list[dict], samples: int = 2000) -> tuple[float, float] | None:
    """95% interval of median(ours) / median(peer) step time, resampling whole rounds (the two runs of
    a round share their machine conditions, steps within a run do not vary independently); None with
    fewer than 3 rounds."""
    rounds = list(zip(ours, peer))
    if len(rounds) < 3:
        return None
    rng = random.Random(0)
    ratios = []
    for _ in range(samples):
        drawn = [rng.choice(rounds) for _ in rounds]
        ratios.append(statistics.median(t for a, _ in drawn for t in a["step_times_s"])
                      / statistics.median(t for _, b in drawn for t in b["step_times_s"]))
    ratios.sort()
    return ratios[int(0.025 * samples)], ratios[int(0.975 * samples) - 1]


def library_version() -> str:
    """Where megatron_lite comes from and, in a git checkout, its commit (+dirty: uncommitted edits)."""
    import megatron_lite

    where = os.path.dirname(os.path.abspath(megatron_lite.__file__))
    try:
        git = ["git", "-C", where]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{where} @ {commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return where


def emit_result(result: dict, json_path: str | None) -> dict:
    """Write the results to `json_path`, or print them as the last line of stdout."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nresults written to {json_path}")
    else:
        print(json.dumps(result))
    return result
