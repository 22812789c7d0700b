"""Megatron-style indexed token files: `PREFIX.bin` (token ids) and `PREFIX.idx` (document ends).

On-disk format (little endian):
  PREFIX.bin  all documents' token ids back to back (each document ends with the EOD id),
              as uint16 when the vocabulary fits, else int32.
  PREFIX.idx  header (32 bytes): magic b"MLTIDX\\0\\0", uint64 version, uint64 dtype code,
              uint64 document count N; then N int64 document end offsets (exclusive, in tokens,
              into the .bin stream), so document i is tokens [ends[i-1], ends[i]).
Both files are memory-mapped on read, so opening a dataset costs no RAM and no time.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path
from types import MappingProxyType

import numpy as np

MAGIC = b"MLTIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<8sQQQ")
DTYPE_CODES = MappingProxyType({1: np.dtype(np.uint16), 2: np.dtype(np.int32)})
_REBUILD_HINT = "re-run preprocessing (scripts/preprocess_data.py) to rebuild it"


class CorruptIndexError(ValueError):
    """An .idx/.bin pair that cannot be read back as written."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; {_REBUILD_HINT}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def _dtype_code(dtype: np.dtype) -> int:
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise ValueError(f"unsupported token dtype {dtype}; expected one of {list(DTYPE_CODES.values())}")


def index_paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedTokensWriter:
    """Streams documents into temp files and moves them into place only on success.

    The .idx is moved last: it is what readers validate the .bin against, so an interrupted run
    leaves either the old pair, a pair that fails validation, or no files, never a silent half.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.bin_path, self.idx_path = index_paths(prefix)
        self.dtype = np.dtype(dtype)
        _dtype_code(self.dtype)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        # Unique temp names let several ranks preprocess the same prefix at once safely.
        self._bin_tmp = _temp_path(self.bin_path)
        self._bin_file = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        flat_ids = np.asarray(flat_ids)
        if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids outside the range of {self.dtype}")
        self._bin_file.write(flat_ids.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def finalize(self) -> None:
        self._bin_file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        ends = np.cumsum(lengths, dtype=np.int64)
        idx_tmp = _temp_path(self.idx_path)
        with open(idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _dtype_code(self.dtype), len(ends)))
            f.write(ends.tobytes())
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._bin_file.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedTokensWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _temp_path(final: Path) -> Path:
    # Not tempfile.mkstemp: its 0600 mode would stop other users of a shared cache reading the files.
    path = final.with_name(f"{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    open(path, "xb").close()
    return path


class IndexedTokens:
    """Read-only view of a PREFIX.bin / PREFIX.idx pair, memory-mapped."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = index_paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; run preprocessing to create it")
        self.dtype, self.doc_ends = self._read_index()
        self._tokens = self._map_tokens()

    def _read_index(self) -> tuple[np.dtype, np.ndarray]:
        size = self.idx_path.stat().st_size
        if size < _HEADER.size:
            raise CorruptIndexError(self.idx_path, f"truncated ({size} bytes, header is {_HEADER.size})")
        with open(self.idx_path, "rb") as f:
            magic, version, code, num_docs = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise CorruptIndexError(self.idx_path, f"bad magic {magic!r}, not a megatron_lite index")
        if version != VERSION:
            raise CorruptIndexError(self.idx_path, f"format version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise CorruptIndexError(self.idx_path, f"unknown dtype code {code}")
        expected = _HEADER.size + 8 * num_docs
        if size != expected:
            raise CorruptIndexError(self.idx_path, f"{size} bytes but {num_docs} documents need {expected}")
        if num_docs == 0:
            return DTYPE_CODES[code], np.zeros(0, np.int64)
        ends = np.memmap(self.idx_path, dtype=np.int64, mode="r", offset=_HEADER.size, shape=(num_docs,))
        if ends[0] < 0 or (num_docs > 1 and np.any(np.diff(ends) < 0)):
            raise CorruptIndexError(self.idx_path, "document offsets are not increasing")
        return DTYPE_CODES[code], ends

    def _map_tokens(self) -> np.ndarray:
        num_tokens = int(self.doc_ends[-1]) if len(self.doc_ends) else 0
        size = self.bin_path.stat().st_size
        if size != num_tokens * self.dtype.itemsize:
            raise CorruptIndexError(
                self.bin_path, f"{size} bytes but the index describes {num_tokens} {self.dtype} tokens"
            )
        if num_tokens == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(num_tokens,))

    @property
    def num_documents(self) -> int:
        return len(self.doc_ends)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i, its trailing EOD included."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents})")
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self._tokens[start : int(self.doc_ends[i])]

    def tokens(self, start: int, length: int) -> np.ndarray:
        """`length` ids of the concatenated stream from `start` (a view, not a copy)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        return self._tokens[start : start + length]

    # A pickled memmap would carry its whole contents; reopen by path instead (DataLoader workers).
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return f"IndexedTokens({self.prefix!r}, documents={self.num_documents}, tokens={self.num_tokens})"
