"""Decoder-only transformer built from tensor-parallel layers; one pipeline stage per module.

Parameter names are the same under every layout (layers keep their global index), so a parameter's
name plus its ShardSpec identifies its full serial tensor: that is what makes initialisation,
gradient checks and checkpoints layout-independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.checkpoint import checkpoint

from megatron_lite.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.layers.embedding import VocabParallelEmbedding, vocab_shard_spec
from megatron_lite.layers.linear import ColumnParallelLinear, RowParallelLinear, column_parallel_linears
from megatron_lite.layers.moe import MoEBlock
from megatron_lite.models.config import BuildOptions, ModelConfig, RopeScaling
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.random import DropoutRNG, dropout
from megatron_lite.parallel.sharding import initialize_parameters, make_param, replicated_spec, spec_of, tied

WORD_EMBEDDING = "embedding.word.weight"


@dataclass(frozen=True)
class StageContext:
    """What every block of a stage needs to know about how it runs."""

    cfg: ModelConfig
    tp: CommGroup
    options: BuildOptions
    rng: DropoutRNG
    ep: CommGroup  # the experts of MoE layers are split over it

    @property
    def sequence_parallel(self) -> bool:
        return self.options.sequence_parallel and self.tp.size > 1

    def residual_generator(self) -> torch.Generator:
        """Between TP blocks activations are replicated over TP, or split along the sequence with SP."""
        return self.rng.tensor_parallel if self.sequence_parallel else self.rng.replicated


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm with replicated weights (partial gradients per TP rank under SP)."""

    def __init__(self, ctx: StageContext):
        super().__init__()
        cfg = ctx.cfg
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        shape, partial = (cfg.hidden_size,), ctx.sequence_parallel
        self.weight = make_param(replicated_spec(shape, partial_over_tp=partial, init="ones"))
        with_bias = cfg.norm == "layernorm" and cfg.bias
        self.bias = make_param(replicated_spec(shape, partial_over_tp=partial, init="zeros")) if with_bias else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Per-pair rotation speeds, in float32 as Hugging Face and Meta's reference code compute them
    (a model was trained with those roundings: at 8k positions float64 angles differ by ~5e-4 rad)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """RoPE in the rotate-half convention (as Hugging Face LLaMA checkpoints use). The angles are made
    per call from the positions (no [max_seq_len, head_dim] tables per layer: at 128k positions those
    would cost 128 MB each)."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.signature = (head_dim, theta, scaling)  # equal signatures rotate alike (shared per inference step)
        # Not a buffer: module.to(bfloat16) must not round the frequencies.
        self._inv_freq = {torch.device("cpu"): rope_inverse_frequencies(head_dim, theta, scaling)}

    def rotation(self, positions: torch.Tensor, device: torch.device, dtype: torch.dtype):
        """(cos, sin) of the angles at `positions` ([s], or [b, s] giving [b, 1, s, d] for every head)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq(device)
        angles = torch.cat([angles, angles], dim=-1)
        if angles.dim() == 3:
            angles = angles.unsqueeze(1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, x, start: int = 0, positions: torch.Tensor | None = None, cos_sin=None):
        """x: [b, heads, s, d] at positions start, start + 1, ... or, given, `positions` [b, s] (one row
        per sequence: a KV-cached decode step, prompts of different lengths); `cos_sin`: the
        `rotation(positions, ...)` of those positions, computed once for every layer."""
        if cos_sin is None:
            if positions is None:
                positions = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)
            cos_sin = self.rotation(positions, x.device, x.dtype)
        cos, sin = cos_sin
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Attention(torch.nn.Module):
    """Heads split over TP; KV heads split too, or replicated when TP exceeds their number."""

    def __init__(self, ctx: StageContext, layer_std: float):
        super().__init__()
        cfg, tp = ctx.cfg, ctx.tp
        self.ctx = ctx
        self.heads = cfg.num_heads // tp.size
        self.kv_heads = max(cfg.kv_heads // tp.size, 1)
        self.head_dim = cfg.head_dim
        kv_chunks = min(cfg.kv_heads, tp.size)
        h, kv_width = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        column = dict(bias=cfg.bias, std=cfg.init_std, enter_region=False)
        self.q_proj = ColumnParallelLinear(h, h, tp, **column)
        self.k_proj = ColumnParallelLinear(h, kv_width, tp, num_chunks=kv_chunks, **column)
        self.v_proj = ColumnParallelLinear(h, kv_width, tp, num_chunks=kv_chunks, **column)
        self.o_proj = RowParallelLinear(h, h, tp, bias=cfg.bias, std=layer_std, sequence_parallel=ctx.sequence_parallel)
        self.rope = (RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
                     if cfg.position == "rope" else None)

    def forward(self, x, cache=None):
        """cache: None (training, and any forward over whole sequences), or one layer's KV cache for a
        prefill or decode step (inference/kv_cache.py): `rotation(rope, dtype)` -> RoPE's (cos, sin) at
        the new tokens' positions and `store(k, v)` -> (keys, values, mask) of every cached token each
        new query may attend to (mask None: all of them, or causally in a prefill from position 0)."""
        if cache is not None:
            return self.o_proj(self.cached_heads(x, cache))
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (rearrange(y, "b s (h d) -> b h s d", d=self.head_dim) for y in column_parallel_linears(
            x, [p.weight for p in projections], [p.bias for p in projections], self.ctx.tp, self.ctx.sequence_parallel))
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if self.ctx.options.recompute == "selective":
            out = checkpoint(self.core, q, k, v, use_reentrant=False, context_fn=self.ctx.rng.recompute_contexts)
        else:
            out = self.core(q, k, v)
        return self.o_proj(rearrange(out, "b h s d -> b s (h d)"))

    def cached_heads(self, x, cache):
        """Inference: this rank's attention heads [b, s, local heads * d] over the KV cache, before o_proj."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        b, s = x.shape[:2]  # view/transpose rather than einops: a decode step is made of small operations
        q, k, v = (y.view(b, s, -1, self.head_dim).transpose(1, 2) for y in column_parallel_linears(
            x, [p.weight for p in projections], [p.bias for p in projections], self.ctx.tp, False))
        if self.rope is not None:
            cos_sin = cache.rotation(self.rope, q.dtype)
            q, k = self.rope(q, cos_sin=cos_sin), self.rope(k, cos_sin=cos_sin)
        k, v, mask = cache.store(k, v)
        # No mask: every sequence at the same position (decode: all cached slots; prefill: causal).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1,
                                             enable_gqa=self.heads > self.kv_heads)
        return out.transpose(1, 2).reshape(b, s, -1)

    def core(self, q, k, v):
        """softmax(q k^T / sqrt(d)) v with causal mask: the part selective recomputation recomputes."""
        group = self.heads // self.kv_heads
        p = self.ctx.cfg.dropout
        if p == 0.0 or not self.training:
            # SDPA shares each KV head with its query group itself (no repeated K/V copies).
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
        # Explicit form: SDPA's dropout draws from the global generator, not the TP-aware one.
        k = repeat(k, "b h s d -> b (h g) s d", g=group)
        v = repeat(v, "b h s d -> b (h g) s d", g=group)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        return dropout(probs, p, self.ctx.rng.tensor_parallel, True) @ v


class MLP(torch.nn.Module):
    def __init__(self, ctx: StageContext, layer_std: float, ffn_size: int | None = None):
        super().__init__()
        cfg, tp = ctx.cfg, ctx.tp
        self.ctx, self.activation = ctx, cfg.activation
        h, f = cfg.hidden_size, ffn_size or cfg.ffn_size
        column = dict(bias=cfg.bias, std=cfg.init_std, enter_region=False)
        self.up_proj = ColumnParallelLinear(h, f, tp, **column)
        self.gate_proj = ColumnParallelLinear(h, f, tp, **column) if cfg.activation == "swiglu" else None
        self.down_proj = RowParallelLinear(f, h, tp, bias=cfg.bias, std=layer_std, sequence_parallel=ctx.sequence_parallel)

    def forward(self, x):
        return self.down_proj(self.hidden(x))

    def hidden(self, x):
        """The activation before down_proj: this rank's slice of the ffn features."""
        projections = [self.up_proj] + ([self.gate_proj] if self.gate_proj is not None else [])
        up, *gate = column_parallel_linears(x, [p.weight for p in projections], [p.bias for p in projections],
                                            self.ctx.tp, self.ctx.sequence_parallel)
        return F.silu(gate[0]) * up if gate else F.gelu(up, approximate="tanh")


def feed_forward(ctx: StageContext, layer: int, layer_std: float) -> torch.nn.Module:
    """The layer's MLP, or its mixture of experts (with the shared experts as one dense MLP)."""
    cfg = ctx.cfg
    if not cfg.is_moe_layer(layer):
        return MLP(ctx, layer_std)
    shared = cfg.moe.num_shared_experts
    return MoEBlock(cfg, ctx.tp, ctx.ep, ctx.sequence_parallel, layer_std,
                    shared=MLP(ctx, layer_std, shared * cfg.expert_ffn_size) if shared else None)


class TransformerLayer(torch.nn.Module):
    def __init__(self, ctx: StageContext, layer: int):
        super().__init__()
        # GPT-2's scaled init of the projections that write into the residual stream.
        layer_std = ctx.cfg.init_std / math.sqrt(2 * ctx.cfg.num_layers)
        self.ctx, self.layer_id = ctx, layer
        self.attn_norm = Norm(ctx)
        self.attention = Attention(ctx, layer_std)
        self.mlp_norm = Norm(ctx)
        self.mlp = feed_forward(ctx, layer, layer_std)

    def forward(self, x, cache=None):
        if cache is not None:  # inference: one step over a KV cache (Attention.forward)
            return self._forward(x, cache.layer(self.layer_id))
        if self.ctx.options.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False, context_fn=self.ctx.rng.recompute_contexts)
        return self._forward(x)

    def _forward(self, x, layer_cache=None):
        p, generator = self.ctx.cfg.dropout, self.ctx.residual_generator()
        x = x + dropout(self.attention(self.attn_norm(x), layer_cache), p, generator, self.training)
        return x + dropout(self.mlp(self.mlp_norm(x)), p, generator, self.training)


class Embedding(torch.nn.Module):
    """Token (+ learned position) embedding; under SP the output is this rank's sequence slice."""

    def __init__(self, ctx: StageContext):
        super().__init__()
        cfg = self.cfg = ctx.cfg
        self.ctx = ctx
        self.word = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.tp, pad_multiple=cfg.vocab_pad_multiple,
                                           std=cfg.init_std, sequence_parallel=ctx.sequence_parallel)
        self.position = (
            make_param(replicated_spec((cfg.max_seq_len, cfg.hidden_size), partial_over_tp=ctx.sequence_parallel,
                                       std=cfg.init_std))
            if cfg.position == "learned" else None
        )

    def forward(self, token_ids, positions: torch.Tensor | None = None):
        """positions [b, s]: each token's position (inference); None: 0, 1, ... for every sequence."""
        x = self.word(token_ids)
        if self.position is not None and positions is not None:
            x = x + self.position[positions]
        elif self.position is not None:
            positions = self.position[: token_ids.shape[1]]
            if self.ctx.sequence_parallel:
                positions = positions.chunk(self.ctx.tp.size)[self.ctx.tp.rank]
            x = x + positions
        return dropout(x, self.cfg.dropout, self.ctx.residual_generator(), self.training)


class LMHead(torch.nn.Module):
    """Final norm and vocabulary-parallel logits; holds its own weight unless tied to the embedding."""

    def __init__(self, ctx: StageContext, tied_to: VocabParallelEmbedding | None, tied_copy: bool = False):
        super().__init__()
        cfg, tp = ctx.cfg, ctx.tp
        self.tp, self.sequence_parallel = tp, ctx.sequence_parallel
        self.norm = Norm(ctx)
        # A plain list keeps the tied weight from being registered (and counted) twice.
        self._tied = [tied_to] if tied_to is not None else []
        if tied_to is None:
            # Untied, or a tied copy on the last pipeline stage that starts from the embedding's values.
            spec = vocab_shard_spec(cfg.vocab_size, cfg.hidden_size, tp, pad_multiple=cfg.vocab_pad_multiple,
                                    std=cfg.init_std)
            self.weight = make_param(tied(spec, WORD_EMBEDDING, primary=False) if tied_copy else spec)
        local_vocab = vocab_shard_spec(cfg.vocab_size, cfg.hidden_size, tp, pad_multiple=cfg.vocab_pad_multiple).local_shape[0]
        self.vocab_start = tp.rank * local_vocab
        self.real_columns = min(max(cfg.vocab_size - self.vocab_start, 0), local_vocab)

    def output_weight(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, x):
        [logits] = column_parallel_linears(self.norm(x), [self.output_weight()], [None], self.tp, self.sequence_parallel)
        if self.real_columns < logits.shape[-1]:
            # Padding ids are no tokens: -inf keeps them out of any softmax, sample or argmax downstream.
            padding = torch.arange(logits.shape[-1], device=logits.device) >= self.real_columns
            logits = logits.masked_fill(padding, float("-inf"))
        return logits


class TransformerStage(torch.nn.Module):
    """The part of the model that one pipeline stage runs: [embedding] + layers + [head].

    forward() maps token ids (first stage) or hidden states to hidden states, or to this rank's
    vocabulary slice of the logits on the last stage; loss() turns those logits into per-token losses.
    """

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, layer_ids, *, first: bool, last: bool,
                 options: BuildOptions = BuildOptions(), seed: int = 0):
        super().__init__()
        self.cfg, self.layout, self.options = cfg, layout, options
        layer_ids = list(layer_ids)
        stream = f"layers{layer_ids[0] if layer_ids else 'none'}"
        ctx = StageContext(cfg, layout.tp, options, DropoutRNG(seed, layout, stream), layout.group("ep"))
        self.embedding = Embedding(ctx) if first else None
        if first and not last and cfg.tie_embeddings:  # the head's copy lives on another stage
            word = self.embedding.word.weight
            word.shard_spec = tied(spec_of(word), WORD_EMBEDDING, primary=True)
        self.rng = ctx.rng
        self.layer_ids = layer_ids
        self.layers = torch.nn.ModuleDict({str(i): TransformerLayer(ctx, i) for i in layer_ids})
        self.head = None
        if last:
            tied_here = cfg.tie_embeddings and first
            self.head = LMHead(ctx, self.embedding.word if tied_here else None,
                               tied_copy=cfg.tie_embeddings and not first)

    def forward(self, x, cache=None):
        """cache (inference, see inference/kv_cache.py): None, or this step's KV caches with
        `positions` [b, s] of the new tokens, `layer(i)` the cache of layer i, and `logit_rows` [b] (or
        None): the one token per sequence whose logits the head computes ([b, 1, vocab slice])."""
        if cache is not None:
            return self._cached_forward(x, cache)
        if self.embedding is not None:
            x = self.embedding(x)
        for layer in self.layers.values():
            x = layer(x)
        return self.head(x) if self.head is not None else x

    def _cached_forward(self, x, cache):
        if self.embedding is not None:
            x = self.embedding(x, cache.positions)
        for layer in self.layers.values():
            x = layer(x, cache)
        if self.head is None:
            return x
        if cache.logit_rows is not None:
            x = x[torch.arange(x.shape[0], device=x.device), cache.logit_rows].unsqueeze(1)
        return self.head(x)

    def activation_shape(self, micro_batch: int, seq_length: int) -> tuple[int, int, int]:
        """Shape of the hidden states this stage receives from / sends to its pipeline neighbours."""
        tp = self.layout.tp.size
        if self.options.sequence_parallel and tp > 1:
            if seq_length % tp:
                raise ValueError(f"sequence parallelism needs the sequence length ({seq_length}) to be divisible "
                                 f"by parallel.tp={tp}")
            seq_length //= tp
        return (micro_batch, seq_length, self.cfg.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype

    def rng_streams(self) -> dict[str, DropoutRNG]:
        """The stage's random generators by a name that says where they draw (layers, pp/dp/tp position):
        a checkpoint restores them only into a stage of the same name."""
        return {f"{self.rng.name}/layers{','.join(map(str, self.layer_ids))}": self.rng}

    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {int(i): layer.mlp for i, layer in self.layers.items() if isinstance(layer.mlp, MoEBlock)}

    @property
    def needs_all_forwards_first(self) -> bool:
        """Whether a step's backwards need every forward of the step done first (global-batch scope)."""
        return self.cfg.moe is not None and self.cfg.moe.aux_loss_scope == "global_batch" and bool(self.moe_blocks())

    def _routing_sum(self, local: torch.Tensor) -> torch.Tensor:
        """Routing sums over the data-parallel ranks (and the TP ranks, which route a slice each under SP)."""
        summed = comm.all_reduce(local, self.layout.dp)
        return comm.all_reduce(summed, self.layout.tp) if self.options.sequence_parallel else summed

    def prepare_backward(self) -> None:
        """Called by the executor before the step's first backward of this chunk: global-batch scope
        completes its routing sums over the data-parallel ranks (one all-reduce for all layers)."""
        if not self.needs_all_forwards_first:
            return
        routers = [b.router for b in self.moe_blocks().values()]
        summed = self._routing_sum(torch.stack([r.step.sums.to(self.layout.device) for r in routers]))
        for block, row in zip(self.moe_blocks().values(), summed):
            block.load.add_terms(block.router.finalize_scope(row, block.router.step.forwards, self.layout.dp.size))

    def finish_step(self, skipped: bool) -> None:
        """Called after the optimizer step: auxiliary-loss-free balancing moves each MoE layer's bias from
        the step's global token counts (one all-reduce), the same on every rank; not on a skipped step."""
        routers = [b.router for b in self.moe_blocks().values() if b.router.expert_bias is not None]
        if not routers:
            return
        counts = torch.stack([r.step.bias_counts.to(self.layout.device) for r in routers])
        for r in routers:
            r.step.bias_counts = torch.zeros_like(r.step.bias_counts)
        summed = self._routing_sum(counts)
        if not skipped:
            for router, row in zip(routers, summed):
                router.update_bias(row)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The MoE layers' balancing and z losses of the last forward (None in a dense transformer)."""
        losses = [b.last_auxiliary_loss for b in self.moe_blocks().values() if b.last_auxiliary_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def loss(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [b, s], computed without gathering the vocabulary; 0, with no gradient,
        where the target is IGNORE_INDEX (-100). The step divides the sum by the global valid count."""
        return vocab_parallel_cross_entropy(local_logits, targets, self.layout.tp, self.head.vocab_start,
                                            self.cfg.vocab_size)


def build_model(cfg: ModelConfig, layout: ParallelLayout, seed: int, layer_ids=None, *, first: bool = True,
                last: bool = True, options: BuildOptions = BuildOptions(), initialize: bool = True) -> TransformerStage:
    """Build (a stage of) the model with weights equal to the serial model's for the same seed
    (initialize=False: uninitialised memory, for weights loaded next, e.g. from Hugging Face)."""
    layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
    model = TransformerStage(cfg, layout, layer_ids, first=first, last=last, options=options, seed=seed)
    if initialize:
        initialize_parameters(model, seed)
        return model.to(device=layout.device, dtype=options.dtype)
    for param in model.parameters():  # untouched memory of the final dtype: converting would touch every page
        param.data = torch.empty(param.shape, dtype=options.dtype, device=layout.device)
    return model.to(device=layout.device)


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of the serial model: active counts, in each MoE layer, only the top_k
    experts a token goes through (and the router and shared experts). Built on the meta device."""
    with torch.device("meta"):
        model = TransformerStage(cfg, ParallelLayout.serial(), range(cfg.num_layers), first=True, last=True)
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(p.numel() // cfg.moe.num_experts * (cfg.moe.num_experts - cfg.moe.top_k)
                   for block in model.moe_blocks().values() for p in block.experts.parameters())
    return total, total - inactive
