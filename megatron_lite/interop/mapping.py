"""A family's rules applied to one model: the coverage check, expected shapes, and the translation
between a rectangle of one of our tensors and the rectangle of the Hugging Face tensor holding it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lite.interop.families import IGNORED_SUFFIXES, Family, Rule, family_of
from megatron_lite.interop.hf_dir import HFCheckpointError, HFDirectory
from megatron_lite.models.config import ModelConfig


def serial_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameters' full serial shapes by name, from a one-process model built on the meta device
    (no memory, no initialisation), so the table is checked against the real module, not a copy of it."""
    from megatron_lite.models.transformer import TransformerStage
    from megatron_lite.parallel.layout import ParallelLayout
    from megatron_lite.parallel.sharding import spec_of

    with torch.device("meta"):
        model = TransformerStage(cfg, ParallelLayout.serial(), range(cfg.num_layers), first=True, last=True)
    return {name: spec_of(p).full_shape for name, p in model.named_parameters()}


@dataclass(frozen=True)
class Location:
    """Where one of our tensors lies in a Hugging Face tensor: rows [row_offset, row_offset + rows) of
    the concatenation along our dim 0, which HF stores transposed when `transpose`; or, for a stacked
    expert weight, the whole of row `expert` of ours (one Location per expert)."""

    hf: str
    row_offset: int
    transpose: bool
    expert: int | None = None


@dataclass(frozen=True)
class Piece:
    """Rows [rows[0], rows[1]) of a region of our tensor come from `hf_region` of the HF tensor `hf`
    (in HF's dim order); `expert`: that one row is a whole HF tensor (our dim 0 is not in it)."""

    hf: str
    hf_region: list[tuple[int, int]]
    rows: tuple[int, int]
    transpose: bool
    expert: bool

    def target(self, ours: torch.Tensor) -> torch.Tensor:
        """The view of (this rank's region of) our tensor that this piece fills."""
        view = ours.narrow(0, self.rows[0], self.rows[1] - self.rows[0])
        view = view[0] if self.expert else view
        return view.t() if self.transpose else view


class Mapping:
    def __init__(self, cfg: ModelConfig, family: Family | None = None):
        self.cfg = cfg
        self.family = family or family_of(cfg)
        self.rules: dict[str, Rule] = {}
        self.shapes = serial_shapes(cfg)
        self.where: dict[str, list[Location]] = {}
        self.hf_shapes: dict[str, tuple[int, ...]] = {}
        for rule in self.family.rules(cfg):
            if rule.hf in self.rules:
                raise ValueError(f"mapping table of {self.family.name}: {rule.hf} appears twice")
            self.rules[rule.hf] = rule
            offset = 0
            for ours in rule.ours:
                if ours not in self.shapes:
                    raise ValueError(f"mapping table of {self.family.name}: {rule.hf} needs our {ours}, which this "
                                     "model does not have")
                known = self.where.setdefault(ours, [])
                if rule.expert is None and known or rule.expert is not None and (
                        len(rule.ours) > 1 or any(w.expert in (None, rule.expert) for w in known)):
                    raise ValueError(f"mapping table of {self.family.name}: our {ours} is mapped twice")
                known.append(Location(rule.hf, offset, rule.transpose, rule.expert))
                offset += self.shapes[ours][0]
            shape = self.shapes[rule.ours[0]][1:] if rule.expert is not None else (offset,) + self.shapes[rule.ours[0]][1:]
            self.hf_shapes[rule.hf] = tuple(reversed(shape)) if rule.transpose else tuple(shape)
        for ours, known in self.where.items():
            if known[0].expert is not None:
                known.sort(key=lambda w: w.expert)
                if [w.expert for w in known] != list(range(self.shapes[ours][0])):
                    raise ValueError(f"mapping table of {self.family.name}: our stacked {ours} has rules for experts "
                                     f"{[w.expert for w in known]}, not for each of its {self.shapes[ours][0]}")
        unmapped = sorted(set(self.shapes) - set(self.where))
        if unmapped:
            raise ValueError(f"mapping table of {self.family.name} has no rule for our {', '.join(unmapped)}")

    def check_directory(self, directory: HFDirectory) -> None:
        """Every HF tensor is consumed exactly once with the shape we expect; an unknown or missing key or
        a shape mismatch is an error naming it."""
        present = set(directory.tensors)
        expected = set(self.hf_shapes)
        missing = sorted(expected - present)
        if missing:
            raise HFCheckpointError(f"{directory.path} lacks {len(missing)} tensor(s) a {self.family.name} model with "
                                    f"this config.json needs: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        unknown = sorted(k for k in present - expected if not self._duplicate_or_buffer(k))
        if unknown:
            raise HFCheckpointError(f"{directory.path} holds {len(unknown)} tensor(s) no rule of the {self.family.name} "
                                    f"table consumes: {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""))
        for key, shape in self.hf_shapes.items():
            if directory.tensors[key].shape != shape:
                raise HFCheckpointError(f"{directory.path}: tensor {key} has shape {list(directory.tensors[key].shape)} "
                                        f"but config.json implies {list(shape)}")

    def _duplicate_or_buffer(self, key: str) -> bool:
        # A tied output embedding saved a second time, or a non-parameter buffer of an older save.
        return (key == "lm_head.weight" and self.cfg.tie_embeddings) or key.endswith(IGNORED_SUFFIXES)

    def pieces(self, ours: str, region: list[tuple[int, int]]) -> list[Piece]:
        """The HF tensors and rectangles holding `region` (per-dim [start, stop)) of our full tensor: one,
        or one per expert of a stacked expert weight."""
        (start, stop), rest = region[0], list(region[1:])
        locations = self.where[ours]
        if locations[0].expert is None:
            where = locations[0]
            hf_region = [(start + where.row_offset, stop + where.row_offset)] + rest
            return [Piece(where.hf, list(reversed(hf_region)) if where.transpose else hf_region, (0, stop - start),
                          where.transpose, expert=False)]
        return [Piece(locations[e].hf, list(reversed(rest)) if locations[e].transpose else rest,
                      (e - start, e - start + 1), locations[e].transpose, expert=True) for e in range(start, stop)]

    def hf_tensor(self, rule: Rule, ours: dict[str, torch.Tensor]) -> torch.Tensor:
        """The full HF tensor from our full tensors (export)."""
        if rule.expert is not None:
            tensor = ours[rule.ours[0]][rule.expert].clone()  # its own storage: safetensors refuses shared ones
            return tensor.t() if rule.transpose else tensor
        tensor = torch.cat([ours[name] for name in rule.ours], dim=0) if len(rule.ours) > 1 else ours[rule.ours[0]]
        return tensor.t() if rule.transpose else tensor
