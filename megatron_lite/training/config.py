"""The run configuration: typed dataclasses that the composed Hydra config (conf/) must fit.

`to_run_config` turns a composed config into a `RunConfig` (unknown keys and wrong types are an
error naming the key), and `check_run_config` checks everything else that can be known before a
process group exists (allowed values, divisibility, layouts), raising one ValueError per problem
with the key, the bad value and what would work.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_lite.models.config import RECOMPUTE, BuildOptions, ModelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_BACKENDS = ("native", "deepspeed")
WANDB_MODES = ("online", "offline", "disabled")
DATASETS = ("shakespeare", "indexed")
TOKENIZERS = ("byte", "hf")


def _model_schema():
    """conf/model/*.yaml: the fields of `ModelConfig` (derived, so the two cannot drift) plus a name;
    fields without a default in ModelConfig must be given by the YAML."""
    hints = typing.get_type_hints(ModelConfig)
    spec = [("name", str, field(default=MISSING))]
    for f in dataclasses.fields(ModelConfig):
        default = MISSING if f.default is dataclasses.MISSING else f.default
        spec.append((f.name, hints[f.name], field(default=default)))
    schema = dataclasses.make_dataclass("ModelSchema", spec)
    schema.__module__ = __name__  # so configs holding it pickle to spawned ranks
    return schema


ModelSchema = _model_schema()


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int | None = 1  # null: the launcher's world size / (tp * pp)
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    timeout_s: float = 600.0  # a collective that waits longer than this ends the job, naming the silent rank


@dataclass
class DataConfig:
    name: str = "shakespeare"  # shakespeare (embedded) | indexed (files from scripts/preprocess_data.py)
    tokenizer: str = "byte"  # byte | hf (tokenizer_path: a `tokenizers` JSON file)
    tokenizer_path: str | None = None
    cache_dir: str = "data_cache"
    train_prefixes: list[str] = field(default_factory=list)  # indexed: .bin/.idx prefixes, blended by weight
    train_weights: list[float] = field(default_factory=list)  # empty: equal weights
    validation_prefix: str | None = None


@dataclass
class OptimConfig:
    backend: str = "native"  # native | deepspeed
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; null: no clipping
    zero1: bool = False  # native: shard master weights and Adam states over data-parallel ranks
    deepspeed_zero_stage: int = 1  # deepspeed backend: ZeRO stage 1 or 2
    bucket_size_mb: float = 25.0  # fp32 gradient MiB per data-parallel reduction


@dataclass
class TrainerConfig:
    max_steps: int = 300
    micro_batch_size: int = 4
    seq_length: int = 128
    eval_interval: int = 50
    eval_batches: int = 4
    log_interval: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16
    recompute: str = "none"  # none | full | selective
    peak_tflops: float | None = None  # per device, for MFU; null: MFU not reported
    sample_tokens: int = 200  # text generated at the end of the run (0: none)
    max_skipped_steps: int = 10  # consecutive steps skipped for non-finite gradients before the run stops
    # The failure path, on purpose: this global rank raises after step `crash_after_step` (null: never).
    crash_rank: int | None = None
    crash_after_step: int = 1


@dataclass
class CheckpointConfig:
    dir: str | None = "checkpoints"  # relative: inside the run's output directory; null: never save
    interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3
    resume: bool = True  # continue this run (a requeue) from its own latest checkpoint in `dir`
    resume_from: str | None = None  # start from another run's checkpoint directory (its latest good step)
    step: int | None = None  # with resume_from (or resuming): load this step instead of the latest


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "megatron-lite"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    entity: str | None = None
    dir: str | None = None  # null: the run's output directory


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    seed: int = 1234
    model: ModelSchema = field(default_factory=ModelSchema)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def global_batch_size(self) -> int:
        return self.trainer.micro_batch_size * self.parallel.microbatches * self.parallel.dp

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp * self.parallel.dp

    def model_config(self) -> ModelConfig:
        values = asdict(self.model)
        values.pop("name")
        return ModelConfig(**values)

    def build_options(self) -> BuildOptions:
        return BuildOptions(sequence_parallel=self.parallel.sequence_parallel, recompute=self.trainer.recompute,
                            dtype=PRECISIONS[self.trainer.precision])

    def to_dict(self) -> dict:
        return asdict(self)


def to_run_config(composed: DictConfig | dict) -> RunConfig:
    """Typed config from a composed one; unknown keys and wrong types raise ValueError naming the key."""
    try:
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, composed)
    except OmegaConfBaseException as err:
        raise ValueError(f"bad config: {err}".strip()) from None
    return OmegaConf.to_object(merged)


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str] = ()) -> RunConfig:
    """The typed config `scripts/train.py` would run with these overrides (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = hydra_compose(config_name="config", overrides=list(overrides))
    except HydraException as err:
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        raise ValueError(f"bad config override: {err}{cause}") from None
    return to_run_config(composed)


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value) -> None:
    if value is None or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer")


def check_values(cfg: RunConfig) -> None:
    """Allowed values and ranges of single keys."""
    _one_of("parallel.schedule", cfg.parallel.schedule, SCHEDULES)
    _one_of("trainer.precision", cfg.trainer.precision, PRECISIONS)
    _one_of("trainer.recompute", cfg.trainer.recompute, RECOMPUTE)
    _one_of("optim.backend", cfg.optim.backend, OPTIMIZER_BACKENDS)
    _one_of("optim.deepspeed_zero_stage", cfg.optim.deepspeed_zero_stage, (1, 2))
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    _one_of("data.name", cfg.data.name, DATASETS)
    _one_of("data.tokenizer", cfg.data.tokenizer, TOKENIZERS)
    for key in ("parallel.tp", "parallel.pp", "parallel.microbatches", "parallel.virtual_stages",
                "trainer.max_steps", "trainer.micro_batch_size", "trainer.seq_length", "trainer.eval_interval",
                "trainer.eval_batches", "trainer.log_interval", "checkpoint.keep_last"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(cfg, section), name))
    if cfg.checkpoint.interval < 0:
        raise ValueError(f"checkpoint.interval={cfg.checkpoint.interval} must be >= 0 (0: save only at the end)")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ValueError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if cfg.optim.lr <= 0 or cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise ValueError(f"optim.lr={cfg.optim.lr} and optim.min_lr={cfg.optim.min_lr} need 0 <= min_lr <= lr, lr > 0")
    data = cfg.data
    if data.name == "indexed" and (not data.train_prefixes or not data.validation_prefix):
        raise ValueError("data.name=indexed needs data.train_prefixes=[...] and data.validation_prefix=...")
    if data.train_weights and len(data.train_weights) != len(data.train_prefixes):
        raise ValueError(f"data.train_weights has {len(data.train_weights)} entries for "
                         f"{len(data.train_prefixes)} data.train_prefixes")
    if data.tokenizer == "hf" and not data.tokenizer_path:
        raise ValueError("data.tokenizer=hf needs data.tokenizer_path (a tokenizers JSON file)")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ValueError(f"optim.grad_clip={cfg.optim.grad_clip} must be > 0, or null for no clipping")


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of conf/model/NAME.yaml, with field overrides."""
    cfg = compose([f"model={name}"]).model_config()
    return cfg.with_(**overrides) if overrides else cfg
