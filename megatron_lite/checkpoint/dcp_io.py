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

import concurrent.futures
import io
import math
import os
import pickle
import re

import torch
import torch.distributed.checkpoint as dcp
# A BaseException: callers (checkpoint.py) catch it by name, as dcp_io.CheckpointException.
from torch.distributed.checkpoint.api import CheckpointException as CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
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
from megatron_lite.checkpoint.store import file_checksum


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
        # weights_only: tensors and plain containers only (checkpoint.py saves nothing else); a pickle
        # that asks for any other global (os.system, a class of ours) is refused, nothing of it is run.
        fqn = read_item.dest_index.fqn
        try:
            self.objects[fqn] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f"asks to load {found.group(1)}" if found else f"holds more than plain data ({_line(err)})"
            raise UnsafeCheckpoint(f"object {fqn!r} {what}, which a checkpoint never contains: refusing to load "
                                   "it (a crafted or foreign file)") from None

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        box = self._tensors[read_item.dest_index.fqn][read_item.dest_index.index]
        view = box.tensor
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: DCP copied into it in place


class UnsafeCheckpoint(ValueError):
    """A checkpoint file asks the unpickler for something a checkpoint never holds (a crafted file)."""


def _line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:300]


# What DCP's `.metadata` (a pickle of its Metadata dataclass) asks the unpickler for, found by saving
# fp32, bf16 and fp16 checkpoints with this torch and logging find_class: DCP's dataclasses and its
# memory-format enum, the _StorageInfo of each chunk, torch.Size, dtypes, the layout lookup of
# TensorProperties, the pathlib type of the storage path. Anything else (os.system, builtins.eval,
# a constructor with side effects) is refused before it is called.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # maps a layout's name ("torch.strided") to the torch.layout
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # Python 3.13
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        constant = getattr(torch, name, None) if module == "torch" else None
        if isinstance(constant, (torch.dtype, torch.layout, torch.memory_format)):  # torch.float32, torch.strided
            return constant
        raise UnsafeCheckpoint(f"asks to load {module}.{name}, which a checkpoint index never contains: refusing to "
                               "load it (a crafted or foreign file)")


class _Reader(dcp.FileSystemReader):
    """FileSystemReader whose index is read by the restricted unpickler above."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"holds a {type(metadata).__name__}, not DCP metadata: refusing to load it")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Writer(dcp.FileSystemWriter):
    """FileSystemWriter that makes this rank's data files durable itself and checksums them meanwhile:
    DCP's own fsync is off; once the files are written, a thread computes each file's CRC-32 (from the
    page cache) while this thread fsyncs it, so the checksum costs little more than the fsync that a
    save pays anyway. Errors of either reach DCP, which reports them to every rank."""

    def __init__(self, path: str, checksums: bool):
        super().__init__(path, single_file_per_rank=True, sync_files=False, overwrite=True)
        self._checksums = checksums
        self.checksums: dict[str, dict] = {}

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()
        names = sorted({os.fspath(r.storage_data.relative_path) for r in results})
        self.checksums = sync_and_checksum(os.fspath(self.path), names, self._checksums)
        return future

    def finish(self, metadata: Metadata, results) -> None:
        super().finish(metadata, results)  # the coordinator writes .metadata (tmp name, then renamed)
        sync_and_checksum(os.fspath(self.path), [".metadata"], False)


def sync_and_checksum(directory: str, names: list[str], checksums: bool) -> dict[str, dict]:
    """fsync each file; with `checksums`, their sizes and CRC-32s, computed by a thread meanwhile."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        sums = {name: pool.submit(file_checksum, os.path.join(directory, name)) for name in names} if checksums else {}
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return {name: future.result() for name, future in sums.items()}


def write_boxes(path: str, tensors: dict[str, tuple[tuple[int, ...], list[Box]]], objects: dict[str, object],
                checksums: bool = True) -> dict[str, dict]:
    """Collective: every rank writes its boxes (fqn -> (global shape, boxes)) and picklable objects,
    fsync'ed. Over all ranks, the boxes of each fqn must tile its global shape exactly (DCP checks it).
    Returns {file name: {"size", "crc32"}} of the data files this rank wrote (empty without `checksums`)."""
    writer = _Writer(path, checksums)
    dcp.save({}, storage_writer=writer, planner=_BoxSavePlanner(tensors, objects))
    return writer.checksums


def read_metadata(path: str) -> Metadata:
    return _Reader(path).read_metadata()


def read_boxes(path: str, tensors: dict[str, list[Box]], objects: list[str]) -> dict[str, object]:
    """Collective: fill each box (a view of live data) from the saved chunks that overlap it, whatever
    layout wrote them; returns the requested objects."""
    planner = _BoxLoadPlanner(tensors, objects)
    dcp.load({}, storage_reader=_Reader(path), planner=planner)
    return planner.objects


def tensor_shape(metadata: Metadata, fqn: str) -> tuple[int, ...] | None:
    md = metadata.state_dict_metadata.get(fqn)
    return tuple(md.size) if isinstance(md, TensorStorageMetadata) else None
