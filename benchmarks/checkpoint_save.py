"""What recording checksums costs a checkpoint save: `save_checkpoint` with and without them.

One process, serial layout: a LLaMA-style model (8 layers, hidden 384, FFN 1536, vocabulary 8192,
fp32, ~22M parameters) with its AdamW state (master = the fp32 parameters, two moments): about 265 MB
of tensors per checkpoint, written by DCP (one data file, fsync'ed), then `.metadata`, meta.json and
(with checksums) each file's CRC-32 in checksums.json, then the rename, the `latest` marker and
pruning (keep_last=1, the same for both). The two variants alternate (A B B A ...) in the same process
so that both see the same machine and page-cache state; a timed save is the whole `save_checkpoint`
call; the fsync phase of the data files (where each rank's CRC-32 thread runs) is timed too.
`checkpoint.CHECKSUMS_ENABLED` switches checksums off (for this benchmark only).

    python benchmarks/checkpoint_save.py [--saves 8] [--warmup 1] [--dir DIR] [--json out.json]

`--dir` should be on the filesystem checkpoints go to (default: a temporary directory under the
current one); it is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_result, library_version  # noqa: E402

LAYERS, HIDDEN, FFN, HEADS, VOCAB, SEQ = 8, 384, 1536, 6, 8192, 128


def build():
    from megatron_lite.models.config import llama_config
    from megatron_lite.models.partition import build_model_chunks
    from megatron_lite.optim import OptimizerConfig, build_optimizer
    from megatron_lite.parallel.layout import ParallelLayout

    config = llama_config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                          num_kv_heads=HEADS, ffn_hidden_size=FFN, max_seq_len=SEQ)
    layout = ParallelLayout.serial()
    chunks = build_model_chunks(config, layout, 0)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-3))
    with torch.no_grad():  # moments that are not all zeros (compression-free anyway, but realistic)
        for entry in optimizer.state_dict()["params"].values():
            entry["exp_avg"].normal_(0, 1e-3)
            entry["exp_avg_sq"].uniform_(0, 1e-6)
    return chunks, optimizer, layout


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=8, help="timed saves per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed saves per variant first")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory here)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from megatron_lite.checkpoint import checkpoint as ckpt_module
    from megatron_lite.checkpoint import dcp_io, save_checkpoint, store

    sync_phase: list[float] = []  # this save's fsync (+ checksum) of the data files: where checksums cost
    untimed_sync = dcp_io.sync_and_checksum

    def timed_sync(directory, names, checksums):
        start = time.perf_counter()
        try:
            return untimed_sync(directory, names, checksums)
        finally:
            if names != [".metadata"]:
                sync_phase.append(time.perf_counter() - start)

    dcp_io.sync_and_checksum = timed_sync

    torch.manual_seed(0)
    chunks, optimizer, layout = build()
    params = sum(p.numel() for c in chunks for p in c.parameters())
    base = tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir or os.getcwd())
    print(f"# {library_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    times: dict[str, list[float]] = {"checksums": [], "none": []}
    phases: dict[str, list[float]] = {"checksums": [], "none": []}
    sizes: dict[str, int] = {}
    step = 0
    try:
        for i in range(args.warmup + args.saves):
            for variant in (("checksums", "none") if i % 2 == 0 else ("none", "checksums")):  # A B B A ...
                step += 1
                root = os.path.join(base, variant)
                ckpt_module.CHECKSUMS_ENABLED = variant == "checksums"
                sync_phase.clear()
                start = time.perf_counter()
                path = save_checkpoint(root, step, chunks, optimizer, layout, {"step": step}, keep_last=1)
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    times[variant].append(elapsed)
                    phases[variant].append(sum(sync_phase))
                sizes[variant] = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        # the checksum pass alone, on the last checkpoint (its files are in the page cache, as after a save)
        names = [n for n in os.listdir(path) if n != store.CHECKSUMS]
        start = time.perf_counter()
        store.checksum_files(path, names)
        crc_s = time.perf_counter() - start
    finally:
        ckpt_module.CHECKSUMS_ENABLED = True
        dcp_io.sync_and_checksum = untimed_sync
        shutil.rmtree(base, ignore_errors=True)

    with_sums, without = statistics.median(times["checksums"]), statistics.median(times["none"])
    print(f"model: {params / 1e6:.1f}M fp32 parameters + AdamW state; checkpoint {sizes['checksums'] / 2**20:.1f} MiB "
          f"({args.saves} timed saves per variant after {args.warmup} warm-up, alternating)")
    print(f"{'variant':<12}{'median s':>10}{'min s':>9}{'max s':>9}{'MB/s':>9}{'fsync(+crc) s':>15}")
    for variant in ("none", "checksums"):
        t = times[variant]
        print(f"{variant:<12}{statistics.median(t):>10.3f}{min(t):>9.3f}{max(t):>9.3f}"
              f"{sizes[variant] / 1e6 / statistics.median(t):>9.0f}{statistics.median(phases[variant]):>15.3f}")
    ratio = with_sums / without
    paired = statistics.median(a / b for a, b in zip(times["checksums"], times["none"]))  # neighbours in time
    extra_s = statistics.median(phases["checksums"]) - statistics.median(phases["none"])
    print(f"ratio checksums / none: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; goal <= +5%), median of the paired "
          f"saves' ratios {paired:.3f}; the fsync phase with the CRC-32 thread takes {extra_s:+.3f} s "
          f"({extra_s / without * 100:+.1f}% of a save); CRC-32 of the files alone (not overlapped): {crc_s:.3f} s "
          f"({sizes['checksums'] / 1e9 / crc_s:.2f} GB/s)")
    return emit_result({"benchmark": "checkpoint_save", "library": library_version(), "torch": torch.__version__,
                        "params": params, "checkpoint_bytes": sizes["checksums"], "saves": args.saves,
                        "warmup": args.warmup, "times_s": times, "median_s": {"checksums": with_sums, "none": without},
                        "ratio": ratio, "paired_ratio": paired, "sync_phase_s": phases, "crc_only_s": crc_s},
                       args.json)


if __name__ == "__main__":
    main()
