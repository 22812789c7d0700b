"""Print (and optionally draw) a pipeline schedule.

    python scripts/schedule.py schedule=1f1b pp=4 microbatches=8 png=1f1b.png
    python scripts/schedule.py schedule=interleaved_1f1b pp=4 microbatches=8 virtual_stages=2
    python scripts/schedule.py schedule=zb_h1 pp=4 microbatches=8
    python scripts/schedule.py schedule=zb_h2 pp=4 microbatches=8
    python scripts/schedule.py schedule=zbv pp=4 microbatches=8 virtual_stages=2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

try:
    import megatron_lite  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.pipeline.simulate import (
    analytic_bubble_fraction,
    peak_activation_memory,
    render_png,
    render_text,
    simulate,
)
from megatron_lite.pipeline.validate import validate_plan


@dataclass
class ScheduleCliConfig:
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zb_h1 | zb_h2 | zbv
    pp: int = 4
    microbatches: int = 8
    virtual_stages: int = 1
    forward_cost: float = 1.0  # per action, i.e. per model chunk
    backward_cost: float = 2.0
    input_cost: Optional[float] = None  # zero-bubble I (default: half the backward)
    weight_cost: Optional[float] = None  # zero-bubble W (default: half the backward)
    comm_cost: float = 0.0
    width: Optional[int] = None  # squeeze the text timeline into this many columns
    png: Optional[str] = None


def parse_config(argv: list[str]) -> ScheduleCliConfig:
    schema = OmegaConf.structured(ScheduleCliConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(argv))
    return OmegaConf.to_object(merged)


def main(argv: list[str]) -> int:
    try:
        cfg = parse_config(argv)
        plan = build_schedule(cfg.schedule, cfg.pp, cfg.microbatches, cfg.virtual_stages)
    except (OmegaConfBaseException, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    validate_plan(plan)
    result = simulate(plan, cfg.forward_cost, cfg.backward_cost, cfg.comm_cost, cfg.input_cost, cfg.weight_cost)
    print(render_text(result, width=cfg.width))
    print()
    if plan.split_backward:
        print(f"bubble fraction: simulated {result.bubble_fraction:.4f}; inside each rank's span (the zero-bubble "
              f"paper's count, start-up ramp left out) {result.inner_bubble_fraction:.4f}")
    else:
        formula = analytic_bubble_fraction(cfg.pp, cfg.microbatches, cfg.virtual_stages)
        print(
            f"bubble fraction: simulated {result.bubble_fraction:.4f}, "
            f"analytic (p-1)/(v*m+p-1) = {formula:.4f}"
        )
    peaks = ", ".join(f"rank {r}: {n}" for r, n in enumerate(result.peak_in_flight))
    print(f"peak in-flight microbatches (activations held): {peaks}")
    print(f"peak activation memory: {peak_activation_memory(plan):g} microbatches of a rank's layers")
    if cfg.png:
        render_png(result, cfg.png)
        print(f"wrote {cfg.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
