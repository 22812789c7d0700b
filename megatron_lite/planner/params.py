"""Parameters, gradients and optimizer state per pipeline rank, from the model config alone.

The list of a model chunk's parameters (name, local elements, placement) mirrors what
models/transformer.py registers, in the same order; the buckets come from optim/buffers.py's own
assignment run on that list (reverse order, a new bucket at 25 MiB of fp32 gradient, at a change of
data-parallel group and around each tied copy, each padded to a multiple of its group's size), so the
bytes below are the bytes the framework allocates (tests/test_planner_memory.py builds the models and
compares, byte for byte).

Per rank of a pipeline stage:
  parameters   buffer elements (padding included) x the model dtype
  gradients    buffer elements x 4 (the gradient buffers are fp32 whatever the model dtype)
  optimizer    Adam's two fp32 moments (+ fp32 master weights when the model is not fp32) over this
               rank's shard: every bucket, or with ZeRO-1 1/size of each over its data-parallel group
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from megatron_lite.layers.embedding import padded_vocab_size
from megatron_lite.models.config import ModelConfig
from megatron_lite.models.partition import split_layers
from megatron_lite.optim import buffers
from megatron_lite.parallel.layout import stage_of
from megatron_lite.pipeline.schedules import schedule_mapping
from megatron_lite.planner.spec import Layout

FP32 = 4


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of one rank: its name in the model, local elements and how its gradient is reduced."""

    name: str
    numel: int
    data_parallel: str = "dp_cp"  # "dp_cp" (dense) or "edp_cp" (experts): the bucket's group
    partial_sums: tuple[str, ...] = ()  # groups its gradient is summed over after the average
    tied: bool = False  # a copy of the tied embedding split over the pipeline ends
    trainable: bool = True


@dataclass(frozen=True)
class Bucket:
    start: int
    end: int  # padded: end - start divides by the group size
    group: str
    slots: tuple[tuple[ParamInfo, int], ...]  # (parameter, first buffer element)

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class StageMemory:
    """Bytes of one rank of a pipeline stage (all its model chunks)."""

    stage: int
    layers: tuple[int, ...]
    parameters: int  # numel of the parameters themselves (unpadded)
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def total(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes


def chunk_layers(cfg: ModelConfig, layout: Layout) -> list[list[int]]:
    """Layer ids of every virtual stage (Megatron numbering: chunk c of rank r is virtual stage c * p + r)."""
    return split_layers(cfg.num_layers, layout.pp, layout.virtual_stages,
                        list(layout.layers_per_stage) if layout.layers_per_stage else None)


def rank_chunks(cfg: ModelConfig, layout: Layout, stage: int) -> list[tuple[list[int], bool, bool]]:
    """(layers, first, last) of each model chunk pipeline rank `stage` holds, in chunk order, placed as
    the schedule places them (models/partition.py: Megatron's loop, or ZBV's V)."""
    layers = chunk_layers(cfg, layout)
    last = layout.pp * layout.virtual_stages - 1
    mapping = schedule_mapping(layout.schedule)
    out = []
    for chunk in range(layout.virtual_stages):
        vstage = stage_of(stage, chunk, layout.pp, mapping)
        out.append((layers[vstage], vstage == 0, vstage == last))
    return out


def shares_tied_weight(cfg: ModelConfig, layout: Layout, stage: int) -> bool:
    """Whether the rank's head reuses its embedding's weight from another chunk (ZBV's rank 0 holds both
    pipeline ends: models/partition.py's _share_tied_embedding) instead of a tied copy summed over them."""
    if not cfg.tie_embeddings or schedule_mapping(layout.schedule) != "v":
        return False
    chunks = rank_chunks(cfg, layout, stage)  # in a V no chunk is both ends (2p >= 2 stages)
    return any(first for _, first, _ in chunks) and any(last for _, _, last in chunks)


def rank_parameters(cfg: ModelConfig, layout: Layout, stage: int) -> list[list[ParamInfo]]:
    """chunk_parameters of each model chunk pipeline rank `stage` holds, in chunk order."""
    shared = shares_tied_weight(cfg, layout, stage)
    return [chunk_parameters(cfg, layout, layers, first, last, shared)
            for layers, first, last in rank_chunks(cfg, layout, stage)]


def _partial(replicas: int, tp: int) -> tuple[str, ...]:
    if replicas == 1:
        return ()
    return ("tp",) if replicas == tp else (f"tp/{replicas}",)


def chunk_parameters(cfg: ModelConfig, layout: Layout, layers, first: bool, last: bool,
                     shared_tied_weight: bool = False) -> list[ParamInfo]:
    """The parameters a model chunk registers, in registration order, with this rank's local sizes.
    shared_tied_weight: the rank's other chunk holds the other pipeline end and the head uses the
    embedding's weight itself (`shares_tied_weight`): one untied parameter, registered by the embedding."""
    tp, h = layout.tp, cfg.hidden_size
    sp = layout.sequence_parallel and tp > 1
    sp_sum = ("tp",) if sp else ()
    params: list[ParamInfo] = []

    def add(name, numel, **kw):
        params.append(ParamInfo(name, numel, **kw))

    vocab_rows = padded_vocab_size(cfg.vocab_size, tp, cfg.vocab_pad_multiple) // tp
    tied_copy = cfg.tie_embeddings and first != last and not shared_tied_weight
    if first:  # a module's own parameters come before its children's in named_parameters()
        if cfg.position == "learned":
            add("embedding.position", cfg.max_seq_len * h, partial_sums=sp_sum)
        add("embedding.word.weight", vocab_rows * h, tied=tied_copy,
            partial_sums=("embedding",) if tied_copy else ())
    kv_chunks = min(cfg.kv_heads, tp)
    kv_sum = _partial(tp // kv_chunks, tp)
    kv_width = cfg.kv_heads * cfg.head_dim
    norm_bias = cfg.norm == "layernorm" and cfg.bias

    def norm(prefix):
        add(f"{prefix}.weight", h, partial_sums=sp_sum)
        if norm_bias:
            add(f"{prefix}.bias", h, partial_sums=sp_sum)

    def column(prefix, out, inp, chunks=tp, partial=()):
        add(f"{prefix}.weight", out // chunks * inp, partial_sums=partial)
        if cfg.bias:
            add(f"{prefix}.bias", out // chunks, partial_sums=partial)

    def row(prefix, out, inp):
        add(f"{prefix}.weight", out * (inp // tp))
        if cfg.bias:
            add(f"{prefix}.bias", out, partial_sums=sp_sum)

    def mlp(prefix, ffn):
        column(f"{prefix}.up_proj", ffn, h)
        if cfg.activation == "swiglu":
            column(f"{prefix}.gate_proj", ffn, h)
        row(f"{prefix}.down_proj", h, ffn)

    for layer in layers:
        p = f"layers.{layer}"
        norm(f"{p}.attn_norm")
        column(f"{p}.attention.q_proj", h, h)
        column(f"{p}.attention.k_proj", kv_width, h, kv_chunks, kv_sum)
        column(f"{p}.attention.v_proj", kv_width, h, kv_chunks, kv_sum)
        row(f"{p}.attention.o_proj", h, h)
        norm(f"{p}.mlp_norm")
        if cfg.is_moe_layer(layer):
            moe = cfg.moe
            add(f"{p}.mlp.router.weight", moe.num_experts * h, partial_sums=sp_sum)
            if moe.bias_update_rate > 0:
                add(f"{p}.mlp.router.expert_bias", moe.num_experts, trainable=False)  # kept in fp32
            local, f = moe.num_experts // layout.ep, cfg.expert_ffn_size
            expert = dict(data_parallel="edp_cp", partial_sums=sp_sum)
            add(f"{p}.mlp.experts.up_proj", local * f * h, **expert)
            if cfg.activation == "swiglu":
                add(f"{p}.mlp.experts.gate_proj", local * f * h, **expert)
            add(f"{p}.mlp.experts.down_proj", local * h * f, **expert)
            if moe.num_shared_experts:
                mlp(f"{p}.mlp.shared", moe.num_shared_experts * f)
        else:
            mlp(f"{p}.mlp", cfg.ffn_size)
    if last:
        if not (cfg.tie_embeddings and (first or shared_tied_weight)):
            add("head.weight", vocab_rows * h, tied=tied_copy, partial_sums=("embedding",) if tied_copy else ())
        norm("head.norm")
    return params


def group_sizes(layout: Layout) -> dict[str, int]:
    return {"dp_cp": layout.dp, "edp_cp": layout.dp // layout.ep}


class _Planned:
    """A ParamInfo seen as a parameter by optim/buffers.py (numel and a placement with tie and group)."""

    def __init__(self, info: ParamInfo):
        self.info = info
        self.shard_spec = SimpleNamespace(tie=info.name if info.tied else None, data_parallel=info.data_parallel)

    def numel(self) -> int:
        return self.info.numel


def assign_buckets(params: list[ParamInfo], layout: Layout, bucket_size_mb: float = 25.0) -> list[Bucket]:
    """optim/buffers.py's buckets of one chunk, by its own assignment: reverse registration order; a
    bucket closes at `bucket_size_mb` MiB of fp32 gradient, before a parameter of another data-parallel
    group, and around each tied copy; each is zero-padded to a multiple of its group's size."""
    named = [(p.name, _Planned(p)) for p in reversed(params) if p.trainable]
    _, buckets = buffers._assign(named, group_sizes(layout), buffers.bucket_numel(bucket_size_mb))
    return [Bucket(b.start, b.end, b.group, tuple((slot.param.info, slot.start) for slot in b.slots))
            for b in buckets]


def shard_numel(buckets: list[Bucket], layout: Layout) -> int:
    """Elements of the buffers whose optimizer state this rank holds."""
    if not layout.zero1:
        return buckets[-1].end if buckets else 0
    sizes = group_sizes(layout)
    return sum(b.numel // sizes[b.group] for b in buckets)


def stage_memory(cfg: ModelConfig, layout: Layout, stage: int, dtype_bytes: int, bucket_size_mb: float = 25.0,
                 training: bool = True) -> StageMemory:
    """Bytes per rank of pipeline stage `stage`; training=False: the weights alone (inference)."""
    numel = padded = state = frozen = 0
    layers: list[int] = []
    chunks = zip(rank_chunks(cfg, layout, stage), rank_parameters(cfg, layout, stage))
    for (chunk_layer_ids, _, _), params in chunks:
        layers += chunk_layer_ids
        numel += sum(p.numel for p in params)
        frozen += sum(p.numel for p in params if not p.trainable)
        buckets = assign_buckets(params, layout, bucket_size_mb)
        padded += buckets[-1].end if buckets else 0
        state += shard_numel(buckets, layout)
    if not training:
        return StageMemory(stage, tuple(layers), numel, numel * dtype_bytes, 0, 0)
    per_element = 2 + (dtype_bytes != FP32)  # moments (+ master weights)
    return StageMemory(stage, tuple(layers), numel, padded * dtype_bytes + frozen * FP32, padded * FP32,
                       state * per_element * FP32)


def model_parameters(cfg: ModelConfig) -> int:
    """Parameters of the serial model (what the README's "70B" counts)."""
    layout = Layout()
    return sum(p.numel for p in chunk_parameters(cfg, layout, range(cfg.num_layers), True, True))
