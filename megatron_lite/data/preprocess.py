"""Raw text (local json/jsonl/text/parquet/csv files, or a hub dataset) -> PREFIX.bin / PREFIX.idx.

Documents are read with `datasets.load_dataset`, tokenized with a batched `Dataset.map`, given a
trailing EOD id each, and streamed to disk by `IndexedTokensWriter` (atomic, see indexed.py).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from megatron_lite.data.indexed import IndexedTokens, IndexedTokensWriter, token_dtype
from megatron_lite.data.tokenizer import build_tokenizer, train_bpe_tokenizer

log = logging.getLogger(__name__)

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text",
            ".parquet": "parquet", ".csv": "csv"}  # fmt: skip


@dataclass
class PreprocessConfig:
    input: str = "???"
    output_prefix: str = "???"
    tokenizer: str = "byte"
    tokenizer_path: str | None = None
    train_bpe_vocab_size: int | None = None
    text_key: str = "text"
    hf_cache_dir: str | None = None
    num_workers: int = 1
    batch_size: int = 256


def builder_for(path: str | Path) -> str | None:
    """The `load_dataset` builder for a file name, looking through compression suffixes."""
    name = str(path).lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return BUILDERS.get(Path(name).suffix)


def resolve_input(spec: str) -> tuple[str, list[str] | None]:
    """(builder, files) for local input, or (hub dataset name, None).

    `spec` is comma-separated paths, directories or globs. A spec that names no existing path and
    has no known data extension is taken as a hub dataset name.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("input is empty; give a file, directory, glob or hub dataset name")
    looks_local = [Path(p).exists() or builder_for(p) or glob.has_magic(p) for p in parts]
    if len(parts) == 1 and not looks_local[0]:
        return parts[0], None
    files = sorted({f for p in parts for f in _expand(p)})
    builders = {builder_for(f) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"cannot pick one loader for {files}: expected files all of one kind among {sorted(BUILDERS)}"
        )
    return builders.pop(), files


def _expand(part: str) -> list[str]:
    path = Path(part)
    if path.is_dir():
        found = [str(f) for f in sorted(path.iterdir()) if f.is_file() and builder_for(f)]
        if not found:
            raise FileNotFoundError(f"no data files ({sorted(BUILDERS)}) in directory {path}")
        return found
    if glob.has_magic(part):
        found = sorted(glob.glob(part))
        if not found:
            raise FileNotFoundError(f"no files match {part}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    return [str(path)]


def load_documents(spec: str, text_key: str = "text", cache_dir: str | None = None):
    """A `datasets.Dataset` with one row per document and a `text_key` column."""
    builder, files = resolve_input(spec)  # before importing datasets: bad paths fail fast
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    if files is None:
        log.info("loading hub dataset %s", builder)
        ds = datasets.load_dataset(builder, split="train", cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    if builder == "text" and text_key not in ds.column_names:
        ds = ds.rename_column("text", text_key)
    if text_key not in ds.column_names:
        raise ValueError(f"{spec}: no column {text_key!r} (columns: {ds.column_names}); set text_key=...")
    return ds


def tokenize_documents(ds, tokenizer, text_key: str = "text", num_workers: int = 1, batch_size: int = 256):
    """Map documents to an `input_ids` column, each ending with the tokenizer's EOD id."""
    eod = np.asarray([tokenizer.eod_id], dtype=np.int32)

    def encode(batch: dict) -> dict:
        ids = tokenizer.encode_batch(batch[text_key])
        return {"input_ids": [np.concatenate([np.asarray(x, np.int32), eod]) for x in ids]}

    return ds.map(
        encode,
        batched=True,
        batch_size=batch_size,
        num_proc=num_workers if num_workers > 1 else None,
        remove_columns=ds.column_names,
        desc="tokenizing",
    )


def write_indexed(tokenized, output_prefix: str | Path, vocab_size: int, batch_size: int = 256) -> IndexedTokens:
    import pyarrow.compute as pc

    with IndexedTokensWriter(output_prefix, token_dtype(vocab_size)) as writer:
        for table in tokenized.with_format("arrow").iter(batch_size=batch_size):
            column = table.column("input_ids").combine_chunks()
            writer.add_documents(pc.list_flatten(column).to_numpy(), pc.list_value_length(column).to_numpy())
    return IndexedTokens(output_prefix)


def preprocess(
    input: str,
    output_prefix: str | Path,
    tokenizer,
    text_key: str = "text",
    cache_dir: str | None = None,
    num_workers: int = 1,
    batch_size: int = 256,
) -> IndexedTokens:
    """Tokenize every document of `input` and write OUTPUT_PREFIX.bin/.idx; returns the reader."""
    ds = load_documents(input, text_key, cache_dir)
    tokenized = tokenize_documents(ds, tokenizer, text_key, num_workers, batch_size)
    indexed = write_indexed(tokenized, output_prefix, tokenizer.vocab_size, batch_size)
    log.info("wrote %r", indexed)
    return indexed


def iter_texts(input: str, text_key: str = "text", cache_dir: str | None = None) -> Iterator[str]:
    ds = load_documents(input, text_key, cache_dir)
    for batch in ds.select_columns([text_key]).iter(batch_size=256):
        yield from batch[text_key]


def parse_config(argv: Sequence[str]) -> PreprocessConfig:
    """`key=value` arguments onto `PreprocessConfig`; unknown or missing keys are errors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = [f.name for f in fields(PreprocessConfig)]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PreprocessConfig), OmegaConf.from_dotlist(list(argv)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        config = OmegaConf.to_object(cfg) if not missing else None
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        raise ValueError(f"bad arguments {list(argv)}: {reason}; known keys: {known}") from err
    if missing:
        raise ValueError(f"missing required argument(s) {missing}; known keys: {known}")
    return config


def run(cfg: PreprocessConfig) -> IndexedTokens:
    if cfg.train_bpe_vocab_size is not None:
        if cfg.tokenizer != "hf" or not cfg.tokenizer_path:
            raise ValueError("train_bpe_vocab_size needs tokenizer=hf and tokenizer_path=WHERE_TO_SAVE")
        texts = iter_texts(cfg.input, cfg.text_key, cfg.hf_cache_dir)
        tokenizer = train_bpe_tokenizer(texts, cfg.train_bpe_vocab_size, cfg.tokenizer_path)
    else:
        tokenizer = build_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
    return preprocess(cfg.input, cfg.output_prefix, tokenizer, cfg.text_key, cfg.hf_cache_dir,
                      cfg.num_workers, cfg.batch_size)  # fmt: skip


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    indexed = run(parse_config(argv))
    print(f"{indexed.bin_path} and {indexed.idx_path}: {indexed.num_documents} documents, "
          f"{indexed.num_tokens} tokens ({indexed.dtype})")  # fmt: skip
    return 0
