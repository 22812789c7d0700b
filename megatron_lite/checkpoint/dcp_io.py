"""Writing and reading boxes of logical tensors through torch.distributed.checkpoint (DCP).

DCP plans in `WriteItem`s and `ReadItem`s over (offset, size) rectangles of a global tensor; DTensor
and ShardedTensor are only two ways of producing them. Our rectangles are not a DTensor placement
(padding dropped, replicated KV chunks, ZeRO ranges cut into several boxes) and a ShardedTensor needs
the metadata of every rank's shards on every rank, so we use DCP's documented extension point instead:
a SavePlanner that emits one SHARD write item per box, and a LoadPlanner that asks for each box with
DCP's public `create_read_items_for_chunk_list` (the resharding algorithm: every saved chunk that
overlaps a requested box becomes a read). DCP still does the rest: the global plan, the check that the
saved chunks of every tensor tile it exactly (no overlap, no gap), `.metadata`, the file format.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import torch
import torch.distributed.checkpoint as dcp
# A BaseException: callers (checkpoint.py) catch it by name, as dcp_io.CheckpointException.
from torch.distributed.checkpoint.api import CheckpointException as CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_lite.checkpoint.boxes import Box


class _BoxSavePlanner(DefaultSavePlanner):
    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], list[Box]]], objects: dict[str, object]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors, self._objects = tensors, objects
        self._by_index = {(fqn, box.offsets): box.tensor for fqn, (_, boxes) in tensors.items() for box in boxes}

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, (shape, boxes) in self._tensors.items():
            for box in boxes:
                offsets = torch.Size(box.offsets)
                chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(box.sizes))
                items.append(WriteItem(
                    index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(box.tensor),
                                                size=torch.Size(shape))))
        items += [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO) for fqn in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        fqn = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save(self._objects[fqn], buffer)
            return buffer
        return self._by_index[(fqn, tuple(write_item.index.offset))].detach()


class _BoxLoadPlanner(DefaultLoadPlanner):
    def __init__(self, tensors: dict[str, list[Box]], objects: list[str]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors, self._object_keys = tensors, objects
        self.objects: dict[str, object] = {}

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        reads: list[ReadItem] = []
        for fqn, boxes in self._tensors.items():
            md = self.metadata.state_dict_metadata[fqn]  # presence and shape checked by the caller
            chunks = [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes)) for b in boxes]
            items = create_read_items_for_chunk_list(fqn, md, chunks)
            covered = sum(math.prod(item.lengths) for item in items)
            wanted = sum(math.prod(b.sizes) for b in boxes)
            if covered != wanted:
                raise ValueError(f"{fqn}: the saved chunks cover {covered} of the {wanted} elements requested")
            reads += items
        for fqn in self._object_keys:
            zero = torch.Size((0,))
            reads.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn), dest_offsets=zero,
                                  storage_index=MetadataIndex(fqn), storage_offsets=zero, lengths=zero))
        return LoadPlan(reads)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.objects[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        box = self._tensors[read_item.dest_index.fqn][read_item.dest_index.index]
        view = box.tensor
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: DCP copied into it in place


class _Writer(dcp.FileSystemWriter):
    """FileSystemWriter that calls `after_write` once this rank's files are written (a test seam for
    dying in the middle of a save: data files there, `.metadata` not yet)."""

    def __init__(self, path: str, after_write: Callable[[], None] | None):
        super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True)
        self._after_write = after_write

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        future.wait()
        if self._after_write is not None:
            self._after_write()
        return future


def write_boxes(path: str, tensors: dict[str, tuple[tuple[int, ...], list[Box]]], objects: dict[str, object],
                after_write: Callable[[], None] | None = None) -> None:
    """Collective: every rank writes its boxes (fqn -> (global shape, boxes)) and picklable objects.
    Over all ranks, the boxes of each fqn must tile its global shape exactly (DCP checks it)."""
    dcp.save({}, storage_writer=_Writer(path, after_write), planner=_BoxSavePlanner(tensors, objects))


def read_metadata(path: str) -> Metadata:
    return dcp.FileSystemReader(path).read_metadata()


def read_boxes(path: str, tensors: dict[str, list[Box]], objects: list[str]) -> dict[str, object]:
    """Collective: fill each box (a view of live data) from the saved chunks that overlap it, whatever
    layout wrote them; returns the requested objects."""
    planner = _BoxLoadPlanner(tensors, objects)
    dcp.load({}, storage_reader=dcp.FileSystemReader(path), planner=planner)
    return planner.objects


def tensor_shape(metadata: Metadata, fqn: str) -> tuple[int, ...] | None:
    md = metadata.state_dict_metadata.get(fqn)
    return tuple(md.size) if isinstance(md, TensorStorageMetadata) else None
