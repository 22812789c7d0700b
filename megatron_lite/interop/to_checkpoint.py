"""A Hugging Face directory as a megatron-lite checkpoint (step 0, fresh optimizer state), for runs that
start with `checkpoint.resume_from=` instead of importing online with `model=hf model.path=`."""

from __future__ import annotations

from dataclasses import asdict

import torch

from megatron_lite.interop.load import check_hf_directory, load_hf_weights
from megatron_lite.models.config import BuildOptions
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.layout import ParallelLayout


def hf_to_checkpoint(hf_path: str, out: str, dtype: torch.dtype = torch.float32) -> str:
    """One process: the whole model in memory once (online import never needs that)."""
    from megatron_lite.checkpoint.checkpoint import save_checkpoint
    from megatron_lite.optim import OptimizerConfig, build_optimizer

    directory, mapping = check_hf_directory(hf_path)
    cfg, layout = mapping.cfg, ParallelLayout.serial()
    model = build_model(cfg, layout, seed=0, options=BuildOptions(dtype=dtype), initialize=False)
    load_hf_weights([model], directory.path, cfg)
    optimizer = build_optimizer([model], layout, OptimizerConfig())
    model_section = {"name": "hf", "path": directory.path, **asdict(cfg)}
    extra = {"step": 0, "scheduler": {"step": 0}, "data": {"consumed_samples": 0}, "config": {"model": model_section}}
    return save_checkpoint(out, 0, [model], optimizer, layout, extra)
