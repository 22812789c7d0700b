"""Dynamic loss scaling for fp16: fp16's small exponent range would flush small gradients to zero, so
the loss is multiplied by a large scale before backward and the gradients divided by it after.

When a step's gradients overflow (inf or nan anywhere on any rank) the step is skipped and the scale
lowered; after `growth_interval` good steps in a row it is raised again. bf16 has fp32's exponent
range and needs none of this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DynamicLossScaler:
    scale: float = 2.0**16
    growth_interval: int = 1000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0
    good_steps: int = 0  # since the last overflow or growth

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
