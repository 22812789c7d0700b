"""Hugging Face import and export against `transformers` on the same directory, in the same run.

A random LLaMA of about 1B parameters (hidden 2048, 16 layers, 16 heads / 8 KV heads, FFN 5632,
vocabulary 32000, untied, bf16: ~1.8 GB of safetensors) is written locally: the key set and shapes
are `LlamaForCausalLM`'s own (its state dict on the meta device), the values random. Then, each
timed `--repeats` times, alternating with the peer:
- import: `LlamaForCausalLM.from_pretrained(dir, dtype=bfloat16)` in one process (as it returns, and
  with every weight page read once: it may return views of the memory-mapped file), against our
  `load_hf_weights` into the model chunks of every rank at TP1 and TP2 (per-process time: the slowest
  rank, measured inside the rank, process start excluded), with the bytes each rank read;
- export: `save_pretrained` of the loaded model against `export_chunks` at TP1 and TP2 (gather over TP,
  part files, shards assembled by rank 0).
Goal (issue 15): import <= 1.0x transformers' load time per process.

`--dtype` is the dtype both load into: bf16 (the file's own; transformers then maps the file and copies
nothing) or fp32 (what training holds its weights in: both convert every weight).

    python benchmarks/hf_interop.py [--repeats 2] [--dtype bf16|fp32] [--dir DIR] [--small] [--json out.json]

Each of our ranks gets its share of the threads transformers runs with (TP1: all of them, TP2: half).
`--small` runs a ~20M-parameter model (smoke test). The page cache is warm for every variant (each
one reads the same file just written), so the figures compare CPU and copying work, not disk speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_result, library_version  # noqa: E402

SIZES = {"1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                    intermediate_size=5632, vocab_size=32000),
         "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       intermediate_size=1408, vocab_size=8000)}


def write_random_llama(path: str, size: str) -> int:
    """A LlamaForCausalLM directory with random bf16 weights; returns the parameter count."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(**SIZES[size], tie_word_embeddings=False, max_position_embeddings=4096)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return sum(t.numel() for t in tensors.values())


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def ours_worker(rank: int, world: int, path: str, out: str, dtype: str = "bf16") -> dict:
    from megatron_lite.interop import export_chunks, load_hf_weights, model_config_from_hf
    from megatron_lite.models.config import BuildOptions
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.parallel import comm
    from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes

    layout = ParallelLayout.from_mesh(ParallelSizes(tp=world)) if world > 1 else ParallelLayout.serial()
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    comm.barrier()
    start = time.perf_counter()
    chunks = build_model_chunks(cfg, layout, seed=0, options=BuildOptions(dtype=DTYPES[dtype]), initialize=False)
    stats = load_hf_weights(chunks, path, cfg)
    import_s = time.perf_counter() - start
    comm.barrier()
    start = time.perf_counter()
    export_chunks(chunks, layout, out, cfg, template=path)
    export_s = time.perf_counter() - start
    return {"import_s": import_s, "export_s": export_s, **stats}


def transformers_round(path: str, out: str, dtype: str = "bf16") -> dict:
    import transformers

    start = time.perf_counter()
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    import_s = time.perf_counter() - start
    # from_pretrained may hand out views of the memory-mapped file: its pages are read at first use.
    # One byte per 4 KiB page brings every weight in (mapping the page cache, no copy).
    for param in model.parameters():
        param.detach().reshape(-1).view(torch.uint8)[::4096].max()
    materialized_s = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(out)
    export_s = time.perf_counter() - start
    return {"import_s": import_s, "import_materialized_s": materialized_s, "export_s": export_s}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one); removed at the end")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the dtype both systems load into")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from megatron_lite.parallel.spawn import run_on_ranks

    work = tempfile.mkdtemp(prefix="hf_interop_bench_", dir=args.dir)
    try:
        src = os.path.join(work, "src")
        params = write_random_llama(src, "small" if args.small else "1b")
        file_bytes = os.path.getsize(os.path.join(src, "model.safetensors"))
        print(f"random LLaMA: {params / 1e9:.2f}B parameters, {file_bytes / 2**30:.2f} GiB bf16 safetensors", flush=True)
        times: dict[str, list[dict]] = {"transformers": [], "ours-tp1": [], "ours-tp2": []}
        for repeat in range(args.repeats):
            order = ["transformers", "ours-tp1", "ours-tp2"]
            for name in (order if repeat % 2 == 0 else order[::-1]):
                out = os.path.join(work, f"out-{name}-{repeat}")
                if name == "transformers":
                    row = transformers_round(src, out, args.dtype)
                else:
                    world = int(name[-1])
                    ranks = run_on_ranks(ours_worker, world, src, out, args.dtype, timeout_s=1800,
                                         threads_per_rank=max(1, torch.get_num_threads() // world))
                    row = {"import_s": max(r["import_s"] for r in ranks), "export_s": max(r["export_s"] for r in ranks),
                           "bytes_read_per_rank": [r["bytes_read"] for r in ranks]}
                times[name].append(row)
                print(f"{name:>13} repeat {repeat}: import {row['import_s']:.2f} s, export {row['export_s']:.2f} s",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
        median = {name: {k: statistics.median(r[k] for r in rows) for k in ("import_s", "export_s")}
                  for name, rows in times.items()}
        peer = statistics.median(r["import_materialized_s"] for r in times["transformers"])
        ratios = [{"ours": name, "peer": "transformers", "what": what,
                   "ratio": median[name][what] / median["transformers"][what]}
                  for name in ("ours-tp1", "ours-tp2") for what in ("import_s", "export_s")]
        ratios += [{"ours": name, "peer": "transformers (weights read once)", "what": "import_s",
                    "ratio": median[name]["import_s"] / peer} for name in ("ours-tp1", "ours-tp2")]
        print("\nmedian seconds (ratio to transformers; < 1 is faster):")
        for name in times:
            cells = []
            for what in ("import_s", "export_s"):
                ratio = median[name][what] / median["transformers"][what]
                cells.append(f"{what[:-2]} {median[name][what]:6.2f} s ({ratio:.2f}x)")
            print(f"  {name:>13}: " + " | ".join(cells))
        print(f"  transformers with every weight read once: import {peer:.2f} s; ours-tp1 "
              f"{median['ours-tp1']['import_s'] / peer:.2f}x, ours-tp2 {median['ours-tp2']['import_s'] / peer:.2f}x")
        share = [b / file_bytes for b in times["ours-tp2"][0]["bytes_read_per_rank"]]
        print(f"  bytes read per rank at TP2: {', '.join(f'{s:.3f}' for s in share)} of the file")
        result = {"benchmark": "hf_interop", "dtype": args.dtype, "params": params, "file_bytes": file_bytes, "times": times,
                  "median": median, "ratios": ratios, "library": library_version(),
                  "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
        return emit_result(result, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
