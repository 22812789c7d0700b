"""Stop cleanly when the scheduler asks: save at the next step boundary, requeue, exit 0.

SLURM sends SIGUSR1 (with `--signal=USR1@<lead>`) or SIGTERM before it kills a job. A signal may
reach the ranks at different steps, so the ranks agree at each step boundary (a max over the whole
job) and all stop after the same step.
"""

from __future__ import annotations

import os
import signal
import subprocess

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Remembers that a stop signal arrived; installed for the duration of a training loop."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, layout: ParallelLayout) -> bool:
        """True on every rank once any rank has received a stop signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=layout.device)
        comm.all_reduce(flag, layout.group("world"), op="max")
        return bool(flag.item())


def slurm_job_id(environ=os.environ) -> str | None:
    return environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> str | None:
    """Put the SLURM job back in the queue; it restarts from the latest checkpoint. SLURM ends the
    job's running tasks when it does. Returns why it failed, or None."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit code {done.returncode}")
