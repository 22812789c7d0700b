"""Import: a Hugging Face directory into this rank's model chunks, under any layout, reading only the
slices this rank holds (no full tensor, no gather, no collective: each rank works alone)."""

from __future__ import annotations

import torch

from megatron_lite.interop.families import model_config_from_hf
from megatron_lite.interop.hf_dir import HFDirectory, SliceReader
from megatron_lite.interop.mapping import Mapping
from megatron_lite.models.config import ModelConfig
from megatron_lite.parallel.sharding import ShardSpec, spec_of


def local_region(spec: ShardSpec) -> tuple[list[tuple[int, int]], list[int]]:
    """The rectangle of the full (unpadded) tensor this rank's piece covers, per dim [start, stop), and
    the zero padding after it per dim (the vocabulary padded to a multiple of TP)."""
    region, padding = [(0, n) for n in spec.full_shape], [0] * len(spec.full_shape)
    local = spec.local_shape
    for shard in spec.shards:
        start = shard.chunk_index * local[shard.dim]
        stop = start + local[shard.dim]
        full = spec.full_shape[shard.dim]
        region[shard.dim] = (min(start, full), min(stop, full))
        padding[shard.dim] = local[shard.dim] - (region[shard.dim][1] - region[shard.dim][0])
    return region, padding


def _unpadded(param: torch.Tensor, padding: list[int]) -> torch.Tensor:
    """The view of `param` that excludes its zero padding (which is set to zero)."""
    if any(padding):
        param.zero_()
    for dim, extra in enumerate(padding):
        param = param.narrow(dim, 0, param.shape[dim] - extra)
    return param


def check_hf_directory(path: str, cfg: ModelConfig | None = None) -> tuple[HFDirectory, Mapping]:
    """Headers only: the directory is complete and its tensors are the ones (and the shapes) `cfg` (default:
    its own config.json) needs. Raises HFCheckpointError / UnsupportedModel naming what is wrong."""
    directory = HFDirectory(path)
    mapping = Mapping(cfg or model_config_from_hf(directory.config))
    mapping.check_directory(directory)
    return directory, mapping


@torch.no_grad()
def load_hf_weights(chunks, path: str, cfg: ModelConfig) -> dict:
    """Fill every parameter of `chunks` from the Hugging Face directory `path`; returns
    {"bytes_read": ..., "file_bytes": ...} (what this rank read, and the size of the weight files)."""
    directory, mapping = check_hf_directory(path, cfg)
    reader = SliceReader(directory)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            spec = spec_of(param)
            ours = spec.tie.key if spec.tie is not None else name
            region, padding = local_region(spec)
            target = _unpadded(param, padding)
            for piece in mapping.pieces(ours, region):
                if param.device.type != "cpu":  # through host memory: safetensors maps the file on the CPU
                    piece.target(target).copy_(reader.read(piece.hf, piece.hf_region))
                else:
                    reader.read(piece.hf, piece.hf_region, into=piece.target(target))
    return {"bytes_read": reader.bytes_read, "file_bytes": directory.file_bytes()}
