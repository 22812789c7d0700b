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
from megatron_lite.parallel.device import DEVICES

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_h2", "zbv")  # pipeline/schedules.py SCHEDULE_NAMES
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_BACKENDS = ("native", "deepspeed")
WANDB_MODES = ("online", "offline", "disabled")
DATASETS = ("shakespeare", "indexed")
TOKENIZERS = ("byte", "hf")


def _schema(cls, name: str, extra=()):
    """A mutable dataclass with `cls`'s fields (derived, so the two cannot drift) for OmegaConf, which
    treats frozen dataclasses as read-only; nested frozen dataclasses get their own schema."""
    hints = typing.get_type_hints(cls)
    spec = list(extra)
    for f in dataclasses.fields(cls):
        default = MISSING if f.default is dataclasses.MISSING else f.default
        hint = hints[f.name]
        nested = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        tuples = [a for a in typing.get_args(hint) if typing.get_origin(a) is tuple]
        if tuples:  # OmegaConf has lists, not tuples
            hint = typing.Optional[list[typing.get_args(tuples[0])[0]]]
        elif nested:
            nested_schema = _schema(nested[0], f"{nested[0].__name__}Schema")
            hint = typing.Optional[nested_schema]
        spec.append((f.name, hint, field(default=default)))
    schema = dataclasses.make_dataclass(name, spec)
    schema.__module__ = __name__  # so configs holding it pickle to spawned ranks
    globals()[name] = schema
    return schema


def _model_schema():
    """conf/model/*.yaml: the fields of `ModelConfig` plus a name and, for `model=hf`, the Hugging Face
    directory the other fields come from; fields without a default in ModelConfig must be given by the YAML."""
    return _schema(ModelConfig, "ModelSchema", [("name", str, field(default=MISSING)),
                                                ("path", typing.Optional[str], field(default=None))])


ModelSchema = _model_schema()


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int | None = 1  # null: the launcher's world size / (tp * pp)
    ep: int = 1  # expert parallelism, carved from dp (must divide it): each EP rank holds experts / ep
    schedule: str = "1f1b"
    virtual_stages: int = 1
    layers_per_stage: list[int] | None = None  # uneven split: layers per virtual stage, in order; null: even
    device: str = "auto"  # auto (CUDA with NCCL when every local rank has a GPU) | cpu | cuda
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
    global_batch_size: int = 16  # sequences per step, whatever the layout: microbatches = this / (micro_batch_size * dp)
    micro_batch_size: int = 4
    seq_length: int = 128
    eval_interval: int = 50
    eval_batches: int = 4
    log_interval: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16
    recompute: str = "none"  # none | full | selective
    peak_tflops: float | None = None  # per device, for MFU; null: MFU not reported
    sample_tokens: int = 64  # text generated at the end of the run with the KV-cached inference engine (0: none)
    max_skipped_steps: int = 10  # consecutive steps skipped for non-finite gradients before the run stops


@dataclass
class CheckpointConfig:
    dir: str | None = "checkpoints"  # relative: inside the run's output directory; null: never save
    interval: int = 100  # save every N steps (and at the end, and on a stop signal; 0: only then)
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
        return self.trainer.global_batch_size

    @property
    def microbatches(self) -> int:
        """Microbatches per step and data-parallel rank, derived from the global batch (Megatron's
        contract: the experiment is the global batch, the layout only splits it)."""
        t, dp = self.trainer, self.parallel.dp
        per_microbatch = t.micro_batch_size * dp
        if t.global_batch_size % per_microbatch:
            multiples = ", ".join(str(per_microbatch * k) for k in range(1, 4))
            raise ValueError(f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                             f"trainer.micro_batch_size x parallel.dp = {t.micro_batch_size} x {dp} = "
                             f"{per_microbatch}: choose a multiple of {per_microbatch} ({multiples}, ...) or "
                             "another micro_batch_size")
        return t.global_batch_size // per_microbatch

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp * self.parallel.dp

    def model_config(self) -> ModelConfig:
        values = asdict(self.model)
        values.pop("name"), values.pop("path")
        return ModelConfig(**values)

    def build_options(self) -> BuildOptions:
        return BuildOptions(sequence_parallel=self.parallel.sequence_parallel, recompute=self.trainer.recompute,
                            dtype=PRECISIONS[self.trainer.precision])

    def to_dict(self) -> dict:
        return asdict(self)


# With model.path (model=hf), these stay the run's choice; every other field comes from config.json.
HF_RUN_CHOICES = ("name", "path", "vocab_pad_multiple", "dropout")


def _from_hf_directory(composed: DictConfig | dict) -> DictConfig | dict:
    """model.path set: the architecture from that Hugging Face directory's config.json, and its
    tokenizer.json as the data tokenizer unless data.tokenizer_path names another."""
    model = composed.get("model") or {}
    if isinstance(model, DictConfig) and OmegaConf.is_missing(model, "path"):
        return composed  # the schema merge names the missing model.path
    path = model.get("path") if hasattr(model, "get") else None
    if not path:
        return composed
    from megatron_lite.interop.families import model_config_from_hf
    from megatron_lite.interop.hf_dir import HFDirectory

    directory = HFDirectory(path)
    fields = asdict(model_config_from_hf(directory.config))
    composed = OmegaConf.create(OmegaConf.to_container(composed) if isinstance(composed, DictConfig) else composed)
    for key, value in fields.items():
        if key not in HF_RUN_CHOICES:
            composed.model[key] = value
    composed.model.path = directory.path
    tokenizer = directory.tokenizer_file()
    data = composed.get("data")
    if tokenizer and data is not None and not data.get("tokenizer_path"):
        data.tokenizer, data.tokenizer_path = "hf", tokenizer
    return composed


def to_run_config(composed: DictConfig | dict) -> RunConfig:
    """Typed config from a composed one; unknown keys and wrong types raise ValueError naming the key."""
    composed = _from_hf_directory(composed)
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
    _one_of("parallel.device", cfg.parallel.device, DEVICES)
    _one_of("data.name", cfg.data.name, DATASETS)
    _one_of("data.tokenizer", cfg.data.tokenizer, TOKENIZERS)
    for key in ("parallel.tp", "parallel.pp", "parallel.virtual_stages",
                "trainer.max_steps", "trainer.global_batch_size", "trainer.micro_batch_size", "trainer.seq_length", "trainer.eval_interval",
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
    _check_ranges(cfg)


def _in_range(key: str, value, low=None, high=None, low_open=False, high_open=False, allowed: str = "") -> None:
    ok = value == value and value not in (float("inf"), float("-inf"))  # not NaN, not infinite
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{key}={value} is out of range: {allowed}")


def _check_ranges(cfg: RunConfig) -> None:
    """Numeric keys with a range (allowed sets and layouts are checked above)."""
    o, t, p, c, d = cfg.optim, cfg.trainer, cfg.parallel, cfg.checkpoint, cfg.data
    _in_range("optim.beta1", o.beta1, 0.0, 1.0, high_open=True, allowed="needs 0 <= beta1 < 1 (e.g. 0.9)")
    _in_range("optim.beta2", o.beta2, 0.0, 1.0, high_open=True, allowed="needs 0 <= beta2 < 1 (e.g. 0.95)")
    _in_range("optim.eps", o.eps, 0.0, low_open=True, allowed="needs eps > 0 (e.g. 1e-8)")
    _in_range("optim.weight_decay", o.weight_decay, 0.0, allowed="needs weight_decay >= 0 (0: none)")
    _in_range("optim.warmup_steps", o.warmup_steps, 0, allowed="needs warmup_steps >= 0 (0: no warmup)")
    _in_range("optim.lr", o.lr, 0.0, low_open=True, allowed="needs a finite lr > 0")
    _in_range("optim.min_lr", o.min_lr, 0.0, o.lr, allowed=f"needs 0 <= min_lr <= optim.lr={o.lr}")
    if o.grad_clip is not None:
        _in_range("optim.grad_clip", o.grad_clip, 0.0, low_open=True,
                  allowed="needs a finite grad_clip > 0, or null for no clipping")
    _in_range("optim.bucket_size_mb", o.bucket_size_mb, 0.0, low_open=True,
              allowed="needs bucket_size_mb > 0 (MiB of gradients per reduction, e.g. 25)")
    if t.peak_tflops is not None:
        _in_range("trainer.peak_tflops", t.peak_tflops, 0.0, low_open=True,
                  allowed="needs peak_tflops > 0 (the device's peak, e.g. 989 for an H100 in bf16), or null")
    _in_range("trainer.sample_tokens", t.sample_tokens, 0, allowed="needs sample_tokens >= 0 (0: no sample)")
    _in_range("trainer.max_skipped_steps", t.max_skipped_steps, 1,
              allowed="needs max_skipped_steps >= 1 (consecutive skipped steps before the run stops)")
    _in_range("parallel.timeout_s", p.timeout_s, 0.0, low_open=True,
              allowed="needs timeout_s > 0 (seconds a collective may wait, e.g. 600)")
    _in_range("seed", cfg.seed, 0, 2**32 - 1, allowed=f"needs 0 <= seed <= {2**32 - 1}")
    if c.step is not None:
        _in_range("checkpoint.step", c.step, 0, allowed="needs step >= 0, or null for the newest good one")
    for i, weight in enumerate(d.train_weights):
        _in_range(f"data.train_weights[{i}]", weight, 0.0, allowed="needs weights >= 0")
    if d.train_weights and sum(d.train_weights) <= 0:
        raise ValueError(f"data.train_weights={list(d.train_weights)} sum to {sum(d.train_weights)}: at least one "
                         "weight must be > 0")
    ignored = [f"data.{k}={getattr(d, k)}" for k in ("train_prefixes", "train_weights", "validation_prefix")
               if getattr(d, k)]
    if d.name == "shakespeare" and ignored:
        raise ValueError(f"{', '.join(ignored)}: read only with data=indexed (data.name=shakespeare trains on the "
                         "embedded corpus and would ignore it); add data=indexed, or drop it")
    if d.tokenizer_path and d.tokenizer != "hf":
        raise ValueError(f"data.tokenizer_path={d.tokenizer_path} is read only with data.tokenizer=hf (the "
                         f"{d.tokenizer} tokenizer needs no file): add data.tokenizer=hf, or drop it")


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of conf/model/NAME.yaml, with field overrides."""
    cfg = compose([f"model={name}"]).model_config()
    return cfg.with_(**overrides) if overrides else cfg
