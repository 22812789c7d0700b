"""Metadata that every parameter carries: its full (serial) shape and which piece of it this rank holds.

This is what makes initialisation, gradient comparison and checkpoints independent of the layout:
a full parameter is defined once (by name and init rule), and each rank's tensor is a pure function
of it and the rank's coordinates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter relates to its full, unpadded serial tensor.

    dim:           the sharded dimension, None when every TP rank holds the whole tensor.
    num_chunks:    how many pieces the (padded) dim is cut into; equals TP size except for KV heads
                   replicated when TP > KV heads (then several TP ranks hold the same chunk).
    chunk_index:   which piece this rank holds.
    padded_size:   size of `dim` after zero padding (vocabulary padded to a multiple of TP).
    init:          "normal" (std), "zeros" or "ones"; applied to the full tensor, padding stays zero.
    init_name:     name whose seed stream generates the values (lets a tied copy share its source).
    grad_sum_over_tp: gradients are partial per TP rank and must be summed over the ranks that hold
                   the same chunk (replicated KV heads, sequence-parallel norm weights).
    """

    full_shape: tuple[int, ...]
    dim: int | None = None
    num_chunks: int = 1
    chunk_index: int = 0
    padded_size: int | None = None
    init: str = "normal"
    std: float = 0.02
    init_name: str | None = None
    grad_sum_over_tp: bool = False

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = self.padded_dim_size // self.num_chunks
        return tuple(shape)

    @property
    def padded_dim_size(self) -> int:
        return self.padded_size if self.padded_size is not None else self.full_shape[self.dim]


def column_spec(full_shape, tp: CommGroup, num_chunks: int | None = None, **kwargs) -> ShardSpec:
    """Shard dim 0 (output features); with num_chunks < tp.size, consecutive TP ranks share a chunk."""
    num_chunks = num_chunks or tp.size
    return ShardSpec(
        full_shape=tuple(full_shape),
        dim=0,
        num_chunks=num_chunks,
        chunk_index=tp.rank * num_chunks // tp.size,
        grad_sum_over_tp=num_chunks < tp.size,
        **kwargs,
    )


def row_spec(full_shape, tp: CommGroup, **kwargs) -> ShardSpec:
    return ShardSpec(full_shape=tuple(full_shape), dim=1, num_chunks=tp.size, chunk_index=tp.rank, **kwargs)


def replicated_spec(full_shape, **kwargs) -> ShardSpec:
    return ShardSpec(full_shape=tuple(full_shape), **kwargs)


def make_param(spec: ShardSpec, dtype=torch.float32, device=None) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.empty(spec.local_shape, dtype=dtype, device=device))
    param.shard_spec = spec
    return param


def spec_of(param: torch.Tensor) -> ShardSpec:
    spec = getattr(param, "shard_spec", None)
    if spec is None:
        return replicated_spec(tuple(param.shape))
    return spec


def pad_full(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    if spec.dim is None or spec.padded_dim_size == full.shape[spec.dim]:
        return full
    pad_shape = list(full.shape)
    pad_shape[spec.dim] = spec.padded_dim_size - full.shape[spec.dim]
    return torch.cat([full, full.new_zeros(pad_shape)], dim=spec.dim)


def shard_of(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's piece of a full serial tensor (the inverse of `unshard`)."""
    if tuple(full.shape) != spec.full_shape:
        raise ValueError(f"full tensor shape {tuple(full.shape)} does not match spec {spec.full_shape}")
    if spec.dim is None:
        return full
    return pad_full(full, spec).chunk(spec.num_chunks, dim=spec.dim)[spec.chunk_index].contiguous()


def unshard(chunks: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """Full serial tensor from its chunks listed in chunk order (padding dropped)."""
    if spec.dim is None:
        return chunks[0]
    full = torch.cat(chunks, dim=spec.dim)
    return full.narrow(spec.dim, 0, spec.full_shape[spec.dim])


def seed_for(seed: int, name: str) -> int:
    """A stable 63-bit seed per (run seed, parameter name); Python's hash() is salted per process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_value(name: str, spec: ShardSpec, seed: int) -> torch.Tensor:
    """The full serial tensor a parameter starts from; identical for every layout."""
    if spec.init == "zeros":
        return torch.zeros(spec.full_shape)
    if spec.init == "ones":
        return torch.ones(spec.full_shape)
    if spec.init != "normal":
        raise ValueError(f"unknown init {spec.init!r} for {name}")
    generator = torch.Generator().manual_seed(seed_for(seed, spec.init_name or name))
    return torch.randn(spec.full_shape, generator=generator) * spec.std


@torch.no_grad()
def initialize_parameters(module: torch.nn.Module, seed: int) -> None:
    """Generate each full parameter from (seed, name) and keep this rank's shard.

    Costs one full tensor at a time on the CPU; fine up to the sizes whose single largest parameter
    fits in host memory, which covers every model in conf/.
    """
    for name, param in module.named_parameters():
        spec = spec_of(param)
        param.copy_(shard_of(full_init_value(name, spec, seed), spec).to(param.dtype))


def gather_full(tensor: torch.Tensor, spec: ShardSpec, tp: CommGroup) -> torch.Tensor:
    """The full serial tensor from every TP rank's piece (one all-gather over TP); padding dropped."""
    if spec.dim is None or tp.size == 1:
        return unshard([tensor.detach()], spec)
    pieces = comm.all_gather(tensor.detach().unsqueeze(0), tp, dim=0)
    ranks_per_chunk = tp.size // spec.num_chunks
    return unshard([pieces[c * ranks_per_chunk] for c in range(spec.num_chunks)], spec)
