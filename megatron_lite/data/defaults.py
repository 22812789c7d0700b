"""The default training data: the Shakespeare corpus shipped inside the package.

`prepare_shakespeare` turns it into indexed token files once per tokenizer, so a training run
needs no data arguments and no network.
"""

from __future__ import annotations

from pathlib import Path

from megatron_lite.data.indexed import CorruptIndexError, IndexedTokens
from megatron_lite.data.preprocess import preprocess

SHAKESPEARE_SPLITS = ("train", "validation")


def shakespeare_dir() -> Path:
    return Path(__file__).resolve().parent / "corpora" / "shakespeare"


def shakespeare_file(split: str) -> Path:
    if split not in SHAKESPEARE_SPLITS:
        raise ValueError(f"unknown Shakespeare split {split!r}; expected one of {SHAKESPEARE_SPLITS}")
    path = shakespeare_dir() / f"{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"embedded corpus missing: {path} (is the package data installed?)")
    return path


def _is_valid(prefix: Path) -> bool:
    try:
        IndexedTokens(prefix)
    except (FileNotFoundError, CorruptIndexError):
        return False
    return True


def prepare_shakespeare(
    cache_dir: str | Path, tokenizer, splits: tuple[str, ...] = SHAKESPEARE_SPLITS
) -> dict[str, str]:
    """Preprocess the embedded corpus into `cache_dir` unless valid files are already there.

    Returns split -> prefix. Prefixes carry the tokenizer's name, so byte and BPE caches coexist.
    Several ranks may call this at once: writes are atomic and produce identical files.
    """
    cache_dir = Path(cache_dir)
    prefixes = {}
    for split in splits:
        prefix = cache_dir / f"shakespeare_{split}_{tokenizer.name}"
        if not _is_valid(prefix):
            preprocess(str(shakespeare_file(split)), prefix, tokenizer, cache_dir=str(cache_dir / "hf_datasets"))
        prefixes[split] = str(prefix)
    return prefixes
