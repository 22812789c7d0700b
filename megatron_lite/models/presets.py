"""Named model configurations: the YAML files of conf/model/ are the single source of truth."""

from __future__ import annotations

from megatron_lite.models.config import ModelConfig


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of conf/model/NAME.yaml, with field overrides."""
    from megatron_lite.training.config import compose

    cfg = compose([f"model={name}"]).model_config()
    return cfg.with_(**overrides) if overrides else cfg
