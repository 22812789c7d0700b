"""Hugging Face interop: safetensors import (per-rank slices, any layout) and export (any layout, or a
DCP checkpoint), driven by one mapping table per model family (families.py)."""

from megatron_lite.interop.export import export_checkpoint, export_chunks, write_hf
from megatron_lite.interop.families import UnsupportedModel, model_config_from_hf
from megatron_lite.interop.hf_dir import HFCheckpointError, HFDirectory
from megatron_lite.interop.load import check_hf_directory, load_hf_weights

__all__ = ["export_checkpoint", "export_chunks", "write_hf", "UnsupportedModel", "model_config_from_hf",
           "HFCheckpointError", "HFDirectory", "check_hf_directory", "load_hf_weights"]
