"""Distributed checkpoints through torch.distributed.checkpoint with layout-independent keys: saved
under one TP x PP x DP layout (ZeRO-1 or not), loaded under any other."""

from megatron_lite.checkpoint.checkpoint import (
    CheckpointError,
    latest_step,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
)
from megatron_lite.checkpoint.store import verify_checkpoint

__all__ = ["CheckpointError", "latest_step", "load_checkpoint", "save_checkpoint", "select_checkpoint",
           "verify_checkpoint"]
