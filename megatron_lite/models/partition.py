"""Which layers live on which pipeline stage, and the model chunks one rank builds.

Virtual stage s (model chunk c on rank r, s = c * p + r; in ZBV's V, s = r for chunk 0 and 2p - 1 - r for
chunk 1) holds a contiguous run of layers; the first virtual stage also holds the embedding, the last
one the output head and the loss.
"""

from __future__ import annotations

from dataclasses import replace

from megatron_lite.models.config import BuildOptions, ModelConfig
from megatron_lite.models.transformer import TransformerStage, build_model
from megatron_lite.parallel.layout import ParallelLayout, stage_of
from megatron_lite.parallel.sharding import spec_of


def check_layer_split(num_layers: int, num_stages: int, virtual_stages: int = 1) -> int:
    """Number of layers per model chunk; raises ValueError if they cannot be split evenly."""
    for key, value in (("num_stages", num_stages), ("virtual_stages", virtual_stages), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    chunks = num_stages * virtual_stages
    if num_layers % chunks != 0:
        lower = (num_layers // chunks) * chunks
        hint = f"{lower} or {lower + chunks}" if lower else f"{chunks}"
        raise ValueError(
            f"num_layers={num_layers} cannot be split into pp*virtual_stages="
            f"{num_stages}*{virtual_stages}={chunks} equal chunks; use a multiple of {chunks} "
            f"(e.g. {hint}) or change pp/virtual_stages"
        )
    return num_layers // chunks


def split_layers(num_layers: int, num_stages: int, virtual_stages: int = 1,
                 layers_per_stage: list[int] | None = None) -> list[list[int]]:
    """Layer ids per virtual stage. Balanced by default: with v == 1 a remainder goes one layer each
    to the earliest stages (the last stage already carries the output head and the loss)."""
    chunks = num_stages * virtual_stages
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != chunks or any(c < 1 for c in counts) or sum(counts) != num_layers:
            raise ValueError(
                f"parallel.layers_per_stage={counts} must list {chunks} positive counts (one per "
                f"pipeline stage x virtual stage) summing to model.num_layers={num_layers}"
            )
    elif virtual_stages > 1:
        counts = [check_layer_split(num_layers, num_stages, virtual_stages)] * chunks
    else:
        if num_layers < num_stages:
            raise ValueError(f"model.num_layers={num_layers} is smaller than parallel.pp={num_stages}; "
                             f"every stage needs at least one layer")
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (stage < extra) for stage in range(num_stages)]
    starts = [sum(counts[:i]) for i in range(chunks)]
    return [list(range(start, start + count)) for start, count in zip(starts, counts)]


def build_model_chunks(cfg: ModelConfig, layout: ParallelLayout, seed: int, virtual_stages: int = 1,
                       layers_per_stage: list[int] | None = None,
                       options: BuildOptions = BuildOptions(), initialize: bool = True,
                       mapping: str = "loop") -> list[TransformerStage]:
    """This rank's model chunks (one per virtual stage it hosts), weights equal to the serial model's
    (initialize=False: left uninitialised for weights loaded next). mapping: how chunks map to virtual
    stages, as the schedule needs (`pipeline.schedules.schedule_mapping`)."""
    p, rank = layout.pp.size, layout.pp.rank
    layers = split_layers(cfg.num_layers, p, virtual_stages, layers_per_stage)
    last = p * virtual_stages - 1
    chunks = []
    for chunk in range(virtual_stages):
        stage = stage_of(rank, chunk, p, mapping)
        chunks.append(build_model(cfg, layout, seed, layers[stage], first=stage == 0, last=stage == last,
                                  options=options, initialize=initialize))
    if mapping == "v":
        _share_tied_embedding(chunks)
    return chunks


def _share_tied_embedding(chunks: list[TransformerStage]) -> None:
    """Where one rank holds both pipeline ends in different chunks (the V of ZBV), the head uses the
    embedding's weight itself, as in the serial model, instead of a copy summed over the pipeline ends."""
    firsts = [c for c in chunks if c.embedding is not None]
    lasts = [c for c in chunks if c.head is not None]
    if not firsts or not lasts or firsts[0] is lasts[0] or not firsts[0].cfg.tie_embeddings:
        return
    word, head = firsts[0].embedding.word, lasts[0].head
    spec = spec_of(word.weight)
    word.weight.shard_spec = replace(spec, tie=None, reductions=tuple(r for r in spec.reductions if r.group != "embedding"))
    del head.weight
    head._tied = [word]


def named_parameters(chunks: list[TransformerStage]):
    """(global name, parameter) over every chunk; names are the serial model's."""
    for chunk in chunks:
        yield from chunk.named_parameters()
