"""Injected failures, to test the failure path of a real job (a rank that raises on purpose).

Not part of the run configuration: set in the environment of the job, e.g.

    MEGATRON_LITE_CRASH_RANK=5 MEGATRON_LITE_CRASH_AFTER_STEP=2 sbatch slurm/train_cpu.sbatch
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CRASH_RANK = "MEGATRON_LITE_CRASH_RANK"
CRASH_AFTER_STEP = "MEGATRON_LITE_CRASH_AFTER_STEP"


@dataclass(frozen=True)
class InjectedCrash:
    rank: int  # the global rank that raises
    after_step: int  # once this many steps are done


def _integer(environ, name: str, default: int | None, low: int) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be an integer >= {low}") from None
    if value < low:
        raise ValueError(f"{name}={value} must be an integer >= {low}")
    return value


def injected_crash(environ=os.environ) -> InjectedCrash | None:
    """The crash the environment asks for, None when MEGATRON_LITE_CRASH_RANK is unset."""
    rank = _integer(environ, CRASH_RANK, None, 0)
    if rank is None:
        return None
    return InjectedCrash(rank, _integer(environ, CRASH_AFTER_STEP, 1, 1))
