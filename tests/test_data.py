"""Data pipeline: preprocessing round trips, indexed files, GPT windows, DP sampling, blending.

References are computed independently of the library: stdlib gzip/json reading and plain UTF-8
bytes stand in for what the token files must hold.
"""

import gzip
import json
import pickle
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lite.data.defaults import prepare_shakespeare, shakespeare_file
from megatron_lite.data.gpt_dataset import BlendedDataset, GPTWindowDataset
from megatron_lite.data.indexed import CorruptIndexError, IndexedTokens, IndexedTokensWriter, token_dtype
from megatron_lite.data.preprocess import parse_config, preprocess, resolve_input, run
from megatron_lite.data.sampler import DistributedBatchSampler, get_batch
from megatron_lite.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

REPO = Path(__file__).resolve().parent.parent
DOCS = ["Hello, world.\nSecond line.", "", "naïve café — 日本語 🎭\r\n tabs\there", "x"]


def read_jsonl_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def byte_stream(texts):
    """What the byte tokenizer must write: each document's UTF-8 bytes, then EOD (256)."""
    return np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8).astype(np.int64), 256) for t in texts])


def assert_round_trip(indexed, tokenizer, texts):
    assert indexed.num_documents == len(texts)
    for i, text in enumerate(texts):
        ids = indexed.document(i)
        assert ids[-1] == tokenizer.eod_id and tokenizer.eod_id not in ids[:-1].tolist()
        assert tokenizer.decode(ids) == text


@pytest.fixture(scope="module")
def shakespeare_val(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    prefix = prepare_shakespeare(cache, ByteTokenizer(), splits=("validation",))["validation"]
    return IndexedTokens(prefix), read_jsonl_gz(shakespeare_file("validation"))


# ---------------------------------------------------------------- preprocessing round trips


def test_shakespeare_validation_byte_round_trip(shakespeare_val):
    indexed, texts = shakespeare_val
    assert indexed.dtype == np.uint16 and indexed.num_documents == 3
    np.testing.assert_array_equal(indexed.tokens(0, indexed.num_tokens), byte_stream(texts))
    assert_round_trip(indexed, ByteTokenizer(), texts)


def test_prepare_shakespeare_reuses_valid_files_and_rebuilds_corrupt(tmp_path, monkeypatch):
    import megatron_lite.data.defaults as defaults

    calls = []
    real = defaults.preprocess
    monkeypatch.setattr(defaults, "preprocess", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = prepare_shakespeare(tmp_path, ByteTokenizer(), splits=("validation",))
    prepare_shakespeare(tmp_path, ByteTokenizer(), splits=("validation",))
    assert len(calls) == 1
    Path(first["validation"] + ".idx").write_bytes(b"garbage")
    prepare_shakespeare(tmp_path, ByteTokenizer(), splits=("validation",))
    assert len(calls) == 2 and IndexedTokens(first["validation"]).num_documents == 3


def _write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")


def _write_parquet(path, texts, key="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({key: texts}), path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_small_file_round_trip(tmp_path, kind):
    path = tmp_path / f"docs.{kind}"
    (_write_jsonl if kind == "jsonl" else _write_parquet)(path, DOCS, key="content")
    tok = ByteTokenizer()
    indexed = preprocess(str(path), tmp_path / "out", tok, text_key="content", cache_dir=str(tmp_path / "hf"))
    np.testing.assert_array_equal(indexed.tokens(0, indexed.num_tokens), byte_stream(DOCS))
    assert_round_trip(indexed, tok, DOCS)


def test_text_files_are_one_document_each(tmp_path):
    texts = ["First file.\nWith two lines.\n", "Second file, ünïcode.\n\nParagraph two."]
    data = tmp_path / "txt"
    data.mkdir()
    for i, text in enumerate(texts):
        (data / f"{i}.txt").write_text(text, encoding="utf-8")
    indexed = preprocess(str(data), tmp_path / "out", ByteTokenizer(), cache_dir=str(tmp_path / "hf"))
    assert_round_trip(indexed, ByteTokenizer(), texts)
    single = preprocess(str(data / "1.txt"), tmp_path / "one", ByteTokenizer(), cache_dir=str(tmp_path / "hf"))
    assert_round_trip(single, ByteTokenizer(), texts[1:])


def test_bpe_train_preprocess_round_trip(tmp_path, shakespeare_val):
    _, texts = shakespeare_val
    train_docs = [texts[0][i : i + 1500] for i in range(0, 6000, 1500)]
    docs = train_docs + ["Unseen: naïve 日本語 🎭 zzz\n", ""]
    _write_jsonl(tmp_path / "docs.jsonl", docs)
    tok_path = tmp_path / "bpe.json"
    argv = [f"input={tmp_path / 'docs.jsonl'}", f"output_prefix={tmp_path / 'bpe'}", "tokenizer=hf",
            f"tokenizer_path={tok_path}", "train_bpe_vocab_size=300", f"hf_cache_dir={tmp_path / 'hf'}"]  # fmt: skip
    indexed = run(parse_config(argv))
    tok = build_tokenizer("hf", tok_path)
    assert isinstance(tok, HFTokenizer) and 257 < tok.vocab_size <= 300
    assert_round_trip(indexed, tok, docs)
    # Merges were learned: fewer tokens than bytes on the training text.
    assert indexed.num_tokens < 0.8 * sum(len(d.encode()) for d in docs)


def test_indexed_int32_for_large_vocab_and_pickle(tmp_path):
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.int32
    ids = np.array([5, 70000, 1, 99999, 3], np.int64)
    with IndexedTokensWriter(tmp_path / "big", token_dtype(100000)) as writer:
        writer.add_documents(ids, np.array([2, 3]))
    indexed = IndexedTokens(tmp_path / "big")
    assert indexed.dtype == np.int32 and indexed.num_tokens == 5
    np.testing.assert_array_equal(indexed.document(1), ids[2:])
    np.testing.assert_array_equal(indexed.tokens(1, 3), ids[1:4])
    clone = pickle.loads(pickle.dumps(indexed))
    assert len(pickle.dumps(indexed)) < 200 and clone.num_documents == 2


# ---------------------------------------------------------------- GPT windows


def test_windows_are_consecutive_slices_of_the_stream(shakespeare_val):
    indexed, texts = shakespeare_val
    raw, seq = byte_stream(texts), 64
    ds = GPTWindowDataset(indexed, seq, seed=1)
    assert len(ds) == (len(raw) - 1) // seq
    starts = []
    for i in list(range(50)) + [len(ds) - 1, len(ds), 3 * len(ds) + 7]:
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (seq,)
        start = ds.window_start(i)
        assert start % seq == 0
        np.testing.assert_array_equal(torch.cat([x, y[-1:]]).numpy(), raw[start : start + seq + 1])
        assert torch.equal(x[1:], y[:-1])
        starts.append(start)
    assert starts[:50] != sorted(starts[:50])  # shuffled, not in stream order
    # Each epoch visits every window once, in a different order.
    epoch0, epoch1 = ds.epoch_order(0).copy(), ds.epoch_order(1).copy()
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(len(ds)))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(len(ds)))
    assert not np.array_equal(epoch0, epoch1)


def test_windows_cross_document_boundaries(shakespeare_val):
    indexed, _ = shakespeare_val
    ds = GPTWindowDataset(indexed, 64, seed=0)
    first_end = int(indexed.doc_ends[0])
    crossing = next(i for i in range(len(ds)) if ds.window_start(i) < first_end - 1 < ds.window_start(i) + 63)
    x, _ = ds[crossing]
    assert 256 in x.tolist()


def test_dataset_determinism(shakespeare_val):
    indexed, _ = shakespeare_val
    a, b, c = (GPTWindowDataset(indexed, 32, seed=s) for s in (7, 7, 8))
    idx = list(range(20)) + [len(a) + 3]
    for i in idx:
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert any(not torch.equal(a[i][0], c[i][0]) for i in idx)


# ---------------------------------------------------------------- sampler


def test_dp_ranks_union_equals_single_process(shakespeare_val):
    ds = GPTWindowDataset(shakespeare_val[0], 16, seed=0)
    single = DistributedBatchSampler(None, 8, dp_rank=0, dp_size=1)
    ranks = [DistributedBatchSampler(None, 8, dp_rank=d, dp_size=2) for d in range(2)]
    for step, (full, r0, r1) in enumerate(islice(zip(single, *ranks), 5)):
        assert full == list(range(8 * step, 8 * step + 8))
        assert r0 + r1 == full and len(r0) == 4
        tokens, targets = get_batch(ds, full)
        parts = [get_batch(ds, r) for r in (r0, r1)]
        assert tokens.shape == (8, 16)
        assert torch.equal(tokens, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("resume_dp", [2, 4])
def test_sampler_resumes_at_next_batch(resume_dp):
    uninterrupted = DistributedBatchSampler(None, 12, dp_rank=1, dp_size=2)
    it = iter(uninterrupted)
    for _ in range(3):
        next(it)
    state = uninterrupted.state_dict()
    assert state == {"consumed_samples": 36}
    expected = list(islice(it, 4))
    restored = DistributedBatchSampler(None, 12, dp_rank=1, dp_size=2)
    restored.load_state_dict(state)
    assert list(islice(restored, 4)) == expected
    # The state is layout-free: resuming on another DP size covers the same global batches.
    others = [DistributedBatchSampler(None, 12, d, resume_dp, consumed_samples=36) for d in range(resume_dp)]
    assert [sum(step, []) for step in islice(zip(*others), 2)] == [list(range(36, 48)), list(range(48, 60))]


def test_sampler_finite_drops_partial_batch():
    batches = list(DistributedBatchSampler(50, 16, dp_rank=0, dp_size=2, consumed_samples=16))
    assert batches == [list(range(16, 24)), list(range(32, 40))]


# ---------------------------------------------------------------- blending


class _Tagged:
    def __init__(self, tag):
        self.tag = tag

    def __getitem__(self, i):
        return (self.tag, i)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [7, 1, 1, 3]])
def test_blending_counts_and_determinism(weights):
    n = 1000
    blend = BlendedDataset([_Tagged(k) for k in range(len(weights))], weights, seed=3, chunk=97)
    samples = [blend[i] for i in range(n)]
    w = np.asarray(weights, float) / sum(weights)
    ids = np.array([s[0] for s in samples])
    counts = np.stack([np.cumsum(ids == k) for k in range(len(w))], axis=1)
    targets = np.outer(np.arange(1, n + 1), w)
    assert np.abs(counts - targets).max() <= 1.0  # after every prefix, not only at n
    for k in range(len(w)):  # each dataset is read in order, without gaps
        assert [s[1] for s in samples if s[0] == k] == list(range(counts[-1, k]))
    again = BlendedDataset([_Tagged(k) for k in range(len(weights))], weights, seed=3)
    assert [again[i] for i in reversed(range(n))] == samples[::-1]


# ---------------------------------------------------------------- errors


def test_missing_input_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess(str(missing), tmp_path / "out", ByteTokenizer())
    assert not list(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="no files match"):
        resolve_input(f"{tmp_path}/*.parquet")
    # Only a name that is no path and has no data extension is taken for a hub dataset.
    assert resolve_input("roneneldan/TinyStories") == ("roneneldan/TinyStories", None)


def _small_index(tmp_path):
    with IndexedTokensWriter(tmp_path / "small", np.uint16) as writer:
        writer.add_documents(np.arange(10), np.array([4, 6]))
    return tmp_path / "small"


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:20]), "truncated"),
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:-8]), "documents need"),
        (lambda idx, b: idx.write_bytes(b"NOTMAGIC" + idx.read_bytes()[8:]), "bad magic"),
        (lambda idx, b: b.write_bytes(b.read_bytes()[:-2]), "index describes"),
    ],
)
def test_corrupt_index_is_reported(tmp_path, corrupt, match):
    prefix = _small_index(tmp_path)
    assert IndexedTokens(prefix).num_tokens == 10
    corrupt(Path(f"{prefix}.idx"), Path(f"{prefix}.bin"))
    with pytest.raises(CorruptIndexError, match=match) as err:
        IndexedTokens(prefix)
    assert "small." in str(err.value) and "re-run preprocessing" in str(err.value)


def test_interrupted_write_keeps_old_files(tmp_path):
    prefix = _small_index(tmp_path)
    with pytest.raises(RuntimeError):
        with IndexedTokensWriter(prefix, np.uint16) as writer:
            writer.add_documents(np.arange(3), np.array([3]))
            raise RuntimeError("killed")
    assert IndexedTokens(prefix).num_tokens == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.bin", "small.idx"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        DistributedBatchSampler(None, 10, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bogus'"):
        build_tokenizer("bogus")
    with pytest.raises(ValueError, match="bogus"):
        parse_config(["input=a.jsonl", "output_prefix=x", "bogus=1"])
    with pytest.raises(ValueError, match="output_prefix"):
        parse_config(["input=a.jsonl"])


def test_script_runs_from_repo_root_without_install(tmp_path):
    src = tmp_path / "d.jsonl"
    _write_jsonl(src, DOCS)
    cmd = [sys.executable, "scripts/preprocess_data.py", f"input={src}", f"output_prefix={tmp_path / 'o'}",
           f"hf_cache_dir={tmp_path / 'hf'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_round_trip(IndexedTokens(tmp_path / "o"), ByteTokenizer(), DOCS)
    bad = subprocess.run(cmd[:2] + ["input=/missing/file.jsonl", "output_prefix=x"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "/missing/file.jsonl" in bad.stderr
