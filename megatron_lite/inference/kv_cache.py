"""Key/value caches for generation: one preallocated [batch, local KV heads, max length, head dim] pair
per layer of this rank's pipeline stage.

The KV heads are the ones this rank's attention holds: split over TP, or replicated when TP exceeds
the number of KV heads (Attention.kv_heads), so the cache is sharded exactly like the k/v projections.

Each sequence keeps its tokens at the slots of their positions (slot = position): prompts of different
lengths need no padding of positions, and a step attends, for each new token, to the slots up to its
own position only. Slots a padded prompt row wrote past its real length are overwritten by its first
generated tokens before any query can see them, so padding never influences any sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """The caches of one group of sequences for the layers `layer_ids` (this rank's stage)."""

    def __init__(self, layer_ids, batch: int, max_length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if batch < 1 or max_length < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and max_length >= 1, got {batch} and {max_length}")
        shape = (batch, kv_heads, max_length, head_dim)
        self.batch, self.max_length = batch, max_length
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}

    @classmethod
    def for_stage(cls, stage, batch: int, max_length: int) -> "KVCache":
        """Caches for every layer of a model stage (TransformerStage), shaped like its attention."""
        layers = list(stage.layers.values())
        kv_heads = layers[0].attention.kv_heads if layers else 1
        device = next(stage.parameters()).device
        return cls([layer.layer_id for layer in layers], batch, max_length, kv_heads, stage.cfg.head_dim,
                   stage.dtype, device)

    def rows(self, lo: int, hi: int) -> "KVCache":
        """The caches of sequences lo..hi-1: views of the same memory (a micro-batch of the group)."""
        view = KVCache.__new__(KVCache)
        view.batch, view.max_length = hi - lo, self.max_length
        view.keys = {i: t[lo:hi] for i, t in self.keys.items()}
        view.values = {i: t[lo:hi] for i, t in self.values.items()}
        return view

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())

    def step(self, positions: torch.Tensor, logit_rows: torch.Tensor | None = None,
             used: int | None = None, aligned: bool = False) -> "CacheStep":
        """The view one forward uses: new tokens at `positions` [b, s] (their slots); `used`: 1 + the
        largest position, when the caller knows it (else read from `positions`, a device sync);
        `aligned`: every row's positions are used - s .. used - 1 (equal lengths): no mask needed."""
        if positions.dim() != 2 or positions.shape[0] != self.batch:
            raise ValueError(f"positions must be [batch={self.batch}, new tokens], got {tuple(positions.shape)}")
        if used is None:
            used = int(positions.max()) + 1
            if int(positions.min()) < 0:
                raise ValueError(f"negative positions: {positions.tolist()}")
        if used > self.max_length:
            raise ValueError(f"positions up to {used - 1} do not fit a KV cache of {self.max_length} slots")
        return CacheStep(self, positions, logit_rows, used, aligned)


@dataclass
class CacheStep:
    """One forward over a KV cache: what TransformerStage.forward(x, cache=...) reads."""

    cache: KVCache
    positions: torch.Tensor  # [b, s] long
    logit_rows: torch.Tensor | None  # [b]: the token per sequence whose logits the head computes
    used: int  # slots 0 .. used-1 may be attended to in this step
    aligned: bool = False  # every row at positions used - s .. used - 1

    def __post_init__(self):
        b, s = self.positions.shape
        self.mask = None  # aligned rows: a decode step sees every slot, a prefill from 0 is causal
        if not self.aligned or (s > 1 and s != self.used):
            slots = torch.arange(self.used, device=self.positions.device)
            # mask[b, 0, t, j]: query t of sequence b sees slot j <= its own position (causal, per sequence).
            self.mask = (slots[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)
        # Where each new key/value goes: along the slot dim, per row and token (one scatter per tensor).
        self.slots = self.positions[:, None, :, None]
        self.rotations = {}  # RoPE's (cos, sin) of this step, the same in every layer

    def layer(self, layer_id: int) -> "LayerCache":
        return LayerCache(self, layer_id)


class LayerCache:
    """One layer's view of a CacheStep (what Attention.forward takes)."""

    def __init__(self, step: CacheStep, layer_id: int):
        self.step, self.layer_id = step, layer_id
        self.positions = step.positions

    def rotation(self, rope, dtype: torch.dtype):
        """RoPE's (cos, sin) at the new tokens' positions, computed by the first layer that asks."""
        key = (rope.signature, dtype)
        if key not in self.step.rotations:
            self.step.rotations[key] = rope.rotation(self.positions, self.positions.device, dtype)
        return self.step.rotations[key]

    def store(self, k: torch.Tensor, v: torch.Tensor):
        """Write the new keys/values [b, kv heads, s, d] at their slots; return the cached keys and
        values of slots 0..used-1 and the attention mask [b, 1, s, used]."""
        step = self.step
        keys, values = step.cache.keys[self.layer_id], step.cache.values[self.layer_id]
        index = step.slots.expand(k.shape)
        keys.scatter_(2, index, k.to(keys.dtype))
        values.scatter_(2, index, v.to(values.dtype))
        return keys[:, :, : step.used], values[:, :, : step.used], step.mask
