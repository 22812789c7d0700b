"""scripts/generate.py end to end: a megatron-lite checkpoint under TP2 x PP2 with JSONL in and out, a
Hugging Face directory streaming one prompt, and bad input as one clear error before any process starts."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint import save_checkpoint
from megatron_lite.data.tokenizer import ByteTokenizer
from megatron_lite.inference import Generator
from megatron_lite.inference.cli import TextStream
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.training.config import compose

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96"]


def run_generate(tmp_path, *overrides, timeout=180):
    args = [sys.executable, str(ROOT / "scripts" / "generate.py"), *overrides]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A serial model (seed 7, not the script's seed) saved as step 3; and its generator."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = compose(TINY)
    layout = ParallelLayout.serial()
    chunks = build_model_chunks(cfg.model_config(), layout, seed=7)
    save_checkpoint(str(root), 3, chunks, None, layout)
    return str(root), Generator(cfg, chunks=chunks)


def test_checkpoint_tp2_pp2_jsonl(tmp_path, checkpoint):
    root, reference = checkpoint
    prompts = ["ROMEO:", "JULIET: O", "Now is the winter", "KING"]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    done = run_generate(tmp_path, *TINY, f"checkpoint.resume_from={root}", "prompts_file=prompts.jsonl",
                        "output=out.jsonl", "max_new_tokens=12", "parallel.tp=2", "parallel.pp=2", "groups=2",
                        "temperature=0.8", "top_k=50", "seed=5")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = reference.generate(prompts, max_new_tokens=12, temperature=0.8, top_k=50, seed=5)
    assert [r["prompt"] for r in rows] == prompts
    assert [r["tokens"] for r in rows] == expected.tokens
    assert [r["completion"] for r in rows] == expected.texts
    assert "time to first token" in done.stdout and "tokens/s" in done.stdout
    assert "KV cache per rank: 0: " in done.stdout and "3: " in done.stdout


def test_hf_directory_streams_one_prompt(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    done = run_generate(tmp_path, "model=hf", f"model.path={tmp_path / 'hf'}", "prompt=To be", "max_new_tokens=10",
                        "stop_at_eos=false")
    assert done.returncode == 0, done.stderr
    cfg = compose(["model=hf", f"model.path={tmp_path / 'hf'}"])
    expected = Generator(cfg).generate(["To be"], max_new_tokens=10, eos_id=None)
    streamed, stats = done.stdout.rsplit("\n", 2)[:2]
    assert streamed == "To be" + expected.texts[0]
    assert stats.startswith("time to first token")


def test_stream_holds_a_character_whose_bytes_span_tokens():
    """What is streamed adds up to the decoded whole, also when a multi-byte character (or a byte that
    never completes one) is cut between tokens."""
    tokenizer = ByteTokenizer()
    ids = list("a 귭 b".encode()) + [0xEA, 0xB7] + list(b"c") + [0xEA]
    for chunks in ([ids[i:i + 1] for i in range(len(ids))], [ids[:3], ids[3:8], ids[8:]]):
        stream = TextStream(tokenizer.decode, tokenizer.eod_id)
        pieces = [stream.push(chunk) for chunk in chunks] + [stream.flush()]
        assert "".join(pieces) == tokenizer.decode(ids) == "a 귭 b\ufffdc\ufffd"
        assert pieces[2] == "" if len(chunks) > 3 else True  # the first byte of 귭 alone shows nothing


@pytest.mark.parametrize("overrides, message", [
    (["prompt=" + "x" * 300], "prompt 0 has 300 tokens, longer than the maximum length 256"),
    (["prompt=hi", "prompts_file=p.jsonl"], "give exactly one of prompt=TEXT or prompts_file=PATH"),
    (["prompt=hi", "temperature=-1"], "temperature=-1 must be a finite number >= 0"),
    (["prompt=hi", "parallel.tp=3"], "model.num_heads=4 is not divisible by parallel.tp=3"),
])
def test_bad_input_is_one_clear_error(tmp_path, overrides, message):
    done = run_generate(tmp_path, *overrides)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and re.search(message, done.stderr), done.stderr


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, checkpoint):
    root, _ = checkpoint
    done = run_generate(tmp_path, "model.num_layers=2", f"checkpoint.resume_from={root}", "prompt=hi",
                        "max_new_tokens=2")
    assert done.returncode == 2
    assert "model.embedding.word.weight has shape (257, 64), this model (257, 128)" in done.stderr


def test_generate_benchmark_small_smoke(tmp_path):
    """benchmarks/generate.py at its smallest: every layout gives the serial tokens (checked by the
    benchmark), the tables, the cache-vs-recompute ratio and the comparison with transformers' generate
    (batch 1 and 8, same tokens, checked by the benchmark) come out."""
    out = tmp_path / "generate.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--small", "--layouts", "serial",
                    "pp2 m=1 (walk)", "pp2 m=2 (rotate)", "--json", str(out)], check=True, timeout=300,
                   capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    assert [r["layout"] for r in result["rows"]] == ["serial", "pp2 m=1 (walk)", "pp2 m=2 (rotate)"]
    assert all(r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in result["rows"])
    assert result["pipelined_ratio"] > 0 and result["cache_vs_recompute"]["speedup"] > 0
    if importlib.util.find_spec("transformers") is not None:
        rows = result["vs_transformers"]["rows"]
        assert [r["batch"] for r in rows] == [1, 8]
        assert all(r["ours_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 and r["ratio"] > 0 for r in rows)
