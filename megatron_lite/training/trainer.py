"""The training loop of one rank: layout, data, model, optimizer, schedule, evaluation, logging."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megatron_lite.data.defaults import prepare_shakespeare
from megatron_lite.data.gpt_dataset import GPTWindowDataset
from megatron_lite.data.indexed import IndexedTokens
from megatron_lite.data.sampler import DistributedBatchSampler, get_batch
from megatron_lite.data.tokenizer import ByteTokenizer
from megatron_lite.models.config import check_model_fits_layout
from megatron_lite.models.presets import model_preset
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes, check_sizes
from megatron_lite.training.config import RunConfig
from megatron_lite.training.step import train_step


def check_run_config(cfg: RunConfig, world_size: int) -> None:
    """Everything that can be checked before a process group exists."""
    sizes = ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp)
    check_sizes(sizes, world_size)
    if sizes.pp != 1:
        raise ValueError(f"parallel.pp={sizes.pp}: pipeline parallelism is not wired into the trainer yet; use pp=1")
    model_cfg = model_preset(cfg.model)
    check_model_fits_layout(model_cfg, sizes)
    if cfg.trainer.seq_length > model_cfg.max_seq_len:
        raise ValueError(f"trainer.seq_length={cfg.trainer.seq_length} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}")


def cosine_lr(step: int, cfg: RunConfig) -> float:
    opt = cfg.optim
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = min(1.0, (step - opt.warmup_steps) / max(1, cfg.trainer.max_steps - opt.warmup_steps))
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))


def build_layout(cfg: RunConfig) -> ParallelLayout:
    if not dist.is_initialized():
        check_run_config(cfg, 1)
        return ParallelLayout.serial()
    check_run_config(cfg, dist.get_world_size())
    return ParallelLayout.from_mesh(ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp))


@torch.no_grad()
def evaluate(model, dataset, layout: ParallelLayout, cfg: RunConfig) -> float:
    model.eval()
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)
    total = torch.zeros(())
    for _, indices in zip(range(cfg.trainer.eval_batches), sampler):
        tokens, targets = get_batch(dataset, indices)
        total += model.loss(model(tokens), targets).mean()
    model.train()
    return comm.all_reduce(total / cfg.trainer.eval_batches, layout.dp, op="avg").item()


def train(cfg: RunConfig) -> dict:
    """Train on the embedded Shakespeare corpus; returns the final train and validation losses."""
    layout = build_layout(cfg)
    logging_rank = layout.rank == 0
    tokenizer = ByteTokenizer()
    prefixes = prepare_shakespeare(cfg.data.cache_dir, tokenizer)
    train_set = GPTWindowDataset(IndexedTokens(prefixes["train"]), cfg.trainer.seq_length, cfg.seed)
    valid_set = GPTWindowDataset(IndexedTokens(prefixes["validation"]), cfg.trainer.seq_length, cfg.seed)

    model = build_model(model_preset(cfg.model), layout, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)
    tokens_per_step = cfg.global_batch_size * cfg.trainer.seq_length
    if logging_rank:
        params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.model}: {params:,} parameters on rank 0 | tp={layout.tp.size} dp={layout.dp.size} | "
              f"global batch {cfg.global_batch_size} x {cfg.trainer.seq_length} tokens", flush=True)

    history = {"train_loss": [], "val_loss": []}
    start = time.perf_counter()
    for step, indices in zip(range(cfg.trainer.max_steps), sampler):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        tokens, targets = get_batch(train_set, indices)
        loss = train_step(model, optimizer, tokens, targets, layout, cfg.parallel.microbatches)
        history["train_loss"].append(loss)
        last = step + 1 == cfg.trainer.max_steps
        if logging_rank and (step % cfg.trainer.log_interval == 0 or last):
            elapsed = time.perf_counter() - start
            print(f"step {step:5d} | loss {loss:.4f} | lr {cosine_lr(step, cfg):.2e} | "
                  f"{tokens_per_step * (step + 1) / elapsed:,.0f} tokens/s", flush=True)
        if (step + 1) % cfg.trainer.eval_interval == 0 or last:
            val = evaluate(model, valid_set, layout, cfg)
            history["val_loss"].append(val)
            if logging_rank:
                print(f"step {step:5d} | validation loss {val:.4f} | perplexity {math.exp(val):.2f}", flush=True)
    return history
