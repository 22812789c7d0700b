"""Inference under TP with communication hidden behind computation: the batch is cut into micro-batches
that go through each layer interleaved, so that the TP all-reduce of one micro-batch's attention (or
MLP) output runs while the next micro-batch computes its own.

Each layer is a generator per micro-batch that yields a partial sum (a row-parallel projection before
its all-reduce) and takes it back summed; `drive` starts each all-reduce asynchronously and resumes a
micro-batch only when its sum has arrived. Sums are elementwise, so the result equals the plain
cached forward bit for bit; only the order of the work changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.models.transformer import MLP, TransformerLayer, TransformerStage
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup


def _finish(summed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return summed if bias is None else summed + bias


def layer_steps(layer: TransformerLayer, x: torch.Tensor, cache):
    """One micro-batch through one layer, yielding the partial sums to all-reduce over TP."""
    attention = layer.attention
    heads = attention.cached_heads(layer.attn_norm(x), cache)
    x = x + _finish((yield F.linear(heads, attention.o_proj.weight)), attention.o_proj.bias)
    if not isinstance(layer.mlp, MLP):  # a mixture of experts runs its own collectives, as usual
        return x + layer.mlp(layer.mlp_norm(x))
    down = layer.mlp.down_proj
    return x + _finish((yield F.linear(layer.mlp.hidden(layer.mlp_norm(x)), down.weight)), down.bias)


def drive(steps: list, tp: CommGroup) -> list[torch.Tensor]:
    """Run the micro-batches' generators, each all-reduce in flight while the other micro-batches compute."""
    pending = [comm.all_reduce_async(next(s).contiguous(), tp) for s in steps]
    out: list[torch.Tensor | None] = [None] * len(steps)
    while any(p is not None for p in pending):
        for i, step in enumerate(steps):
            if pending[i] is None:
                continue
            try:
                pending[i] = comm.all_reduce_async(step.send(pending[i].wait()).contiguous(), tp)
            except StopIteration as done:
                pending[i], out[i] = None, done.value
    return out


def overlapped_forward(stage: TransformerStage, x: torch.Tensor, parts: list) -> torch.Tensor:
    """stage(x, cache=...) for micro-batches of consecutive rows, `parts` their cache steps (each with
    `positions`, `layer(i)`, `logit_rows`), interleaved layer by layer."""
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + part.positions.shape[0])
    xs = [x[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    if stage.embedding is not None:
        xs = [stage.embedding(xi, part.positions) for xi, part in zip(xs, parts)]
    for layer in stage.layers.values():
        xs = drive([layer_steps(layer, xi, part.layer(layer.layer_id)) for xi, part in zip(xs, parts)],
                   stage.layout.tp)
    if stage.head is None:
        return torch.cat(xs)
    heads = []
    for xi, part in zip(xs, parts):
        if part.logit_rows is not None:
            xi = xi[torch.arange(xi.shape[0], device=xi.device), part.logit_rows].unsqueeze(1)
        heads.append(stage.head(xi))
    return torch.cat(heads)
