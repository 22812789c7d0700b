"""The run configuration as typed dataclasses; OmegaConf checks keys and types against them."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    virtual_stages: int = 1


@dataclass
class TrainerConfig:
    max_steps: int = 300
    micro_batch_size: int = 4
    seq_length: int = 128
    eval_interval: int = 50
    eval_batches: int = 4
    log_interval: int = 10


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; null: no clipping
    zero1: bool = False  # shard master weights and Adam states over data-parallel ranks
    bucket_size_mb: float = 25.0  # fp32 gradient MiB per data-parallel reduction


@dataclass
class DataConfig:
    cache_dir: str = "data_cache"


@dataclass
class RunConfig:
    model: str = "llama_tiny"
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def global_batch_size(self) -> int:
        return self.trainer.micro_batch_size * self.parallel.microbatches * self.parallel.dp


def parse_overrides(overrides: list[str]) -> RunConfig:
    """`key=value` overrides onto the defaults; an unknown key or a wrong type is one clear ValueError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ValueError(f"bad config override: {err}") from None
    return OmegaConf.to_object(merged)
