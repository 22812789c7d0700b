"""What scripts/generate.py runs: its options, the prompts, each rank's generation and the report."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, fields
from typing import Callable

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megatron_lite.inference.generator import GenerationResult, Generator
from megatron_lite.inference.sampling import SamplingParams
from megatron_lite.models.config import check_model_fits_layout
from megatron_lite.parallel import comm
from megatron_lite.parallel.device import choose_device, rank_device, visible_gpus
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes, check_sizes
from megatron_lite.training.config import RunConfig, to_run_config


@dataclass
class GenerateOptions:
    prompt: str | None = None
    prompts_file: str | None = None
    output: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    groups: int = 1
    max_length: int | None = None
    stop_at_eos: bool = True


def split_config(composed: DictConfig) -> tuple[RunConfig, GenerateOptions]:
    """conf/generate.yaml = the run config + the generation keys at the top level."""
    plain = OmegaConf.to_container(composed, resolve=True)
    names = [f.name for f in fields(GenerateOptions)]
    options = GenerateOptions(**{name: plain.pop(name) for name in names if name in plain})
    return to_run_config(plain), options


def read_prompts(options: GenerateOptions) -> list[str]:
    if (options.prompt is None) == (options.prompts_file is None):
        raise ValueError("give exactly one of prompt=TEXT or prompts_file=PATH")
    if options.prompt is not None:
        return [str(options.prompt)]
    if not os.path.isfile(options.prompts_file):
        raise ValueError(f"prompts_file={options.prompts_file!r} does not exist")
    prompts = []
    with open(options.prompts_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = line.rstrip("\n")
            if isinstance(item, dict):
                item = item.get("prompt")
            if not isinstance(item, str):
                raise ValueError(f"{options.prompts_file}:{number}: expected a JSON string, an object with a "
                                 "\"prompt\" string, or plain text")
            prompts.append(item)
    if not prompts:
        raise ValueError(f"prompts_file={options.prompts_file!r} holds no prompts")
    return prompts


def check(cfg: RunConfig, options: GenerateOptions) -> list[str]:
    """Everything checkable before a process starts; returns the prompts."""
    sizes = ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp, ep=cfg.parallel.ep)
    check_sizes(sizes, sizes.world_size)
    model = cfg.model_config()
    check_model_fits_layout(model, sizes)
    if cfg.parallel.virtual_stages != 1:
        raise ValueError("generation runs one model chunk per pipeline rank: set parallel.virtual_stages=1")
    SamplingParams(options.temperature, options.top_k, options.top_p, cfg.seed)
    if cfg.model.path is not None:
        from megatron_lite.interop.load import check_hf_directory

        check_hf_directory(cfg.model.path, model)
    prompts = read_prompts(options)
    from megatron_lite.data.tokenizer import build_tokenizer
    from megatron_lite.inference.engine import check_requests

    max_length = options.max_length or model.max_seq_len
    if max_length > model.max_seq_len:
        raise ValueError(f"max_length={max_length} exceeds model.max_seq_len={model.max_seq_len}")
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    check_requests(tokenizer.encode_batch(prompts), options.max_new_tokens, max_length, model.vocab_size)
    if len(prompts) < sizes.dp:
        raise ValueError(f"{len(prompts)} prompts for parallel.dp={sizes.dp} replicas: give at least one each")
    return prompts


class TextStream:
    """The text of a growing list of token ids, handed out as it becomes final. A character whose bytes
    span tokens decodes as U+FFFD until its last byte comes, so trailing U+FFFD is held back until a
    later token settles it or the stream ends. A decoder that rewrites earlier text (WordPiece-style
    cleanup of spaces) makes the new text no extension of what was shown: nothing more is shown then
    until it is again; what was handed out never changes."""

    def __init__(self, decode: Callable[[list[int]], str], eos_id: int | None):
        self.decode, self.eos_id = decode, eos_id
        self.ids: list[int] = []
        self.shown = ""

    def push(self, tokens: list[int]) -> str:
        self.ids += [t for t in tokens if t != self.eos_id]
        return self._advance(self.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        return self._advance(self.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def generate_rank(rank: int, world_size: int, cfg: RunConfig, options: GenerateOptions, prompts: list[str]):
    """One rank's generation (all ranks, or the only process); rank 0 streams and reports."""
    if dist.is_initialized():
        sizes = ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp, ep=cfg.parallel.ep)
        layout = ParallelLayout.from_mesh(sizes)
    else:
        layout = ParallelLayout.serial(device=rank_device(choose_device(cfg.parallel.device, 1, visible_gpus()), 0))
    generator = Generator(cfg, layout)
    streaming = len(prompts) == 1 and rank == 0
    text_stream = TextStream(generator.tokenizer.decode, generator.eos_id)

    def stream(rows, tokens):
        print(text_stream.push(tokens), end="", flush=True)

    if streaming:
        print(prompts[0], end="", flush=True)
    result = generator.generate(prompts, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                top_k=options.top_k, top_p=options.top_p, seed=cfg.seed,
                                eos_id=-1 if options.stop_at_eos else None, groups=options.groups,
                                max_length=options.max_length, on_tokens=stream if streaming else None)
    kv_bytes = comm.all_gather_object(result.kv_cache_bytes, layout.group("world"))
    if rank == 0:
        if streaming:
            print(text_stream.flush())
        else:
            write_jsonl(prompts, result, options.output)
        print(report(result, kv_bytes), file=sys.stderr if options.output is None and not streaming else sys.stdout)
    return {"tokens": result.tokens, "kv_cache_bytes": kv_bytes}


def write_jsonl(prompts: list[str], result: GenerationResult, path: str | None) -> None:
    lines = [json.dumps({"prompt": p, "completion": c, "tokens": t})
             for p, c, t in zip(prompts, result.texts, result.tokens)]
    if path is None:
        print("\n".join(lines))
        return
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} generations to {path}")


def report(result: GenerationResult, kv_bytes: list[int]) -> str:
    per_rank = ", ".join(f"{rank}: {n / 2**20:.2f} MiB" if n >= 2**20 else f"{rank}: {n / 2**10:.1f} KiB"
                         for rank, n in enumerate(kv_bytes))
    return (f"time to first token {result.ttft_s * 1e3:.1f} ms | time per output token {result.tpot_s * 1e3:.2f} ms"
            f" | {result.tokens_per_s:.1f} tokens/s | KV cache per rank: {per_rank}")
