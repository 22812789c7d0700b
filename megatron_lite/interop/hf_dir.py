"""A Hugging Face model directory on disk: config.json, safetensors shards, their index, tokenizer files.

Reading checks everything it can from the headers alone (a few KB per file) before any tensor data
is touched: the config is there, every shard the index names exists and is as long as its header
says (a truncated download is caught here, not as a crash in the middle of loading). Tensor data is
read in slices (`safetensors` `get_slice`), and the reader counts the bytes it hands out.

Writing produces what `save_pretrained` does (model.safetensors, or model-0000k-of-0000n.safetensors
plus model.safetensors.index.json) in a temporary directory renamed into place at the end, so an
interrupted export never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass

import torch

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Copied along on export: everything a user of the exported directory needs besides the weights.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class HFCheckpointError(ValueError):
    """A Hugging Face directory that cannot be read as it is (missing, truncated, inconsistent)."""


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file, checked against the file's length."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFCheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise HFCheckpointError(f"{path} is truncated: its header needs {8 + length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise HFCheckpointError(f"{path} has an unreadable safetensors header ({err})") from None
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise HFCheckpointError(f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has "
                                f"{size} (an interrupted download or copy?)")
    return header


class HFDirectory:
    """The config and the tensor catalogue (name -> file, dtype, shape) of a Hugging Face directory."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(self.path):
            raise HFCheckpointError(f"model.path={path!r} is not a directory (a Hugging Face model directory with "
                                    f"{CONFIG} and {SINGLE_FILE} or {INDEX})")
        config_path = os.path.join(self.path, CONFIG)
        if not os.path.isfile(config_path):
            raise HFCheckpointError(f"{self.path} has no {CONFIG}: not a Hugging Face model directory")
        try:
            with open(config_path) as f:
                self.config = json.load(f)
        except ValueError as err:
            raise HFCheckpointError(f"{config_path} is not valid JSON ({err})") from None
        self.index_metadata: dict | None = None
        index_path = os.path.join(self.path, INDEX)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                index = json.load(f)
            self.weight_map = dict(index["weight_map"])
            self.index_metadata = dict(index.get("metadata") or {})
        elif os.path.isfile(os.path.join(self.path, SINGLE_FILE)):
            self.weight_map = None
        else:
            others = sorted(n for n in os.listdir(self.path) if n.endswith((".bin", ".pt", ".pth", ".safetensors")))
            raise HFCheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX}"
                                    + (f" (it has {', '.join(others)}: only safetensors are read)" if others else ""))
        files = sorted(set(self.weight_map.values())) if self.weight_map is not None else [SINGLE_FILE]
        self.tensors: dict[str, TensorEntry] = {}
        for name in files:
            file_path = os.path.join(self.path, name)
            if not os.path.isfile(file_path):
                raise HFCheckpointError(f"{INDEX} of {self.path} names {name}, which is missing")
            for key, entry in read_header(file_path).items():
                if key == "__metadata__":
                    continue
                if entry["dtype"] not in DTYPES:
                    raise HFCheckpointError(f"{file_path}: tensor {key} has dtype {entry['dtype']}, which is not supported")
                self.tensors[key] = TensorEntry(name, DTYPES[entry["dtype"]], tuple(entry["shape"]))
        if self.weight_map is not None:
            for key, name in self.weight_map.items():
                if self.tensors.get(key) is None or self.tensors[key].file != name:
                    raise HFCheckpointError(f"{INDEX} of {self.path} puts {key} in {name}, which does not hold it")
        else:
            self.weight_map = {key: SINGLE_FILE for key in self.tensors}

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def file_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in self.files)

    def tokenizer_file(self) -> str | None:
        path = os.path.join(self.path, "tokenizer.json")
        return path if os.path.isfile(path) else None


class SliceReader:
    """Reads rectangles of the tensors of an `HFDirectory`; `bytes_read` counts what it returned.

    Each read maps the file, copies the slice out (into the caller's tensor when given) and unmaps it
    again: a slice kept as a view of the mapping would keep its pages resident, doubling the memory a
    rank's import peaks at."""

    def __init__(self, directory: HFDirectory):
        self.directory, self.bytes_read = directory, 0

    def read(self, key: str, region: list[tuple[int, int]], into: torch.Tensor | None = None) -> torch.Tensor:
        """`key`[start0:stop0, start1:stop1, ...] (one (start, stop) per dim), copied into `into` (of that
        shape) or into a new tensor."""
        from safetensors import safe_open

        entry = self.directory.tensors[key]
        with safe_open(os.path.join(self.directory.path, entry.file), framework="pt") as handle:
            tensor_slice = handle.get_slice(key)
            piece = tensor_slice[tuple(slice(a, b) for a, b in region)] if region else tensor_slice[:]
            del tensor_slice
            self.bytes_read += piece.numel() * piece.element_size()
            if into is None:
                return piece.clone()
            into.copy_(piece)
            return into


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> dict[str, str]:
    """key -> file name, filling shards in key order up to `max_shard_bytes` (save_pretrained's rule)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key in sorted(sizes):
        if shards[-1] and used + sizes[key] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    if len(shards) == 1:
        return {key: SINGLE_FILE for key in shards[0]}
    n = len(shards)
    return {key: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, keys in enumerate(shards) for key in keys}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '20KB' or a byte count (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


class HFWriter:
    """Writes a Hugging Face directory file by file into a temporary sibling, renamed into place by
    `commit`; `discard` (or an exception inside `with`) removes it and leaves `out` untouched."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and (not os.path.isdir(self.out) or os.listdir(self.out)):
            raise HFCheckpointError(f"{self.out} exists and is not an empty directory: choose a new output directory")
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.tmp)
        self.weight_map: dict[str, str] = {}
        self.total_size = self.total_parameters = 0

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.discard()

    def write_file(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: t.contiguous() for k, t in tensors.items()}, os.path.join(self.tmp, name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()
            self.total_parameters += tensor.numel()

    def write_json(self, name: str, payload: dict) -> None:
        with open(os.path.join(self.tmp, name), "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")

    def copy_side_files(self, source: str | None) -> list[str]:
        copied = []
        for name in SIDE_FILES if source else ():
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(self.tmp, name))
                copied.append(name)
        return copied

    def commit(self) -> str:
        if set(self.weight_map.values()) != {SINGLE_FILE}:
            self.write_json(INDEX, {"metadata": {"total_parameters": self.total_parameters,
                                                 "total_size": self.total_size},
                                    "weight_map": dict(sorted(self.weight_map.items()))})
        if os.path.isdir(self.out):
            os.rmdir(self.out)  # empty (checked at the start)
        os.replace(self.tmp, self.out)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
