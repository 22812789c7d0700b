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
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes, check_sizes
from megatron_lite.pipeline.partition import build_model_chunks, named_parameters, split_layers
from megatron_lite.pipeline.schedules import PipelinePlan, build_schedule
from megatron_lite.training.config import RunConfig
from megatron_lite.training.step import run_schedule, train_step


def check_run_config(cfg: RunConfig, world_size: int) -> None:
    """Everything that can be checked before a process group exists."""
    sizes = ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp)
    check_sizes(sizes, world_size)
    model_cfg = model_preset(cfg.model)
    check_model_fits_layout(model_cfg, sizes)
    pipeline_plan(cfg)
    split_layers(model_cfg.num_layers, sizes.pp, cfg.parallel.virtual_stages)
    if cfg.trainer.seq_length > model_cfg.max_seq_len:
        raise ValueError(f"trainer.seq_length={cfg.trainer.seq_length} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}")


def cosine_lr(step: int, cfg: RunConfig) -> float:
    opt = cfg.optim
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = min(1.0, (step - opt.warmup_steps) / max(1, cfg.trainer.max_steps - opt.warmup_steps))
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))


def optimizer_config(cfg: RunConfig) -> OptimizerConfig:
    opt = cfg.optim
    return OptimizerConfig(lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                           grad_clip=opt.grad_clip, zero1=opt.zero1, bucket_size_mb=opt.bucket_size_mb)


def pipeline_plan(cfg: RunConfig) -> PipelinePlan:
    par = cfg.parallel
    try:
        return build_schedule(par.schedule, par.pp, par.microbatches, par.virtual_stages)
    except ValueError as err:
        raise ValueError(f"parallel.schedule={par.schedule!r}: {err}") from None


def build_layout(cfg: RunConfig) -> ParallelLayout:
    if not dist.is_initialized():
        check_run_config(cfg, 1)
        return ParallelLayout.serial()
    check_run_config(cfg, dist.get_world_size())
    return ParallelLayout.from_mesh(ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp))


@torch.no_grad()
def evaluate(chunks, plan: PipelinePlan, dataset, layout: ParallelLayout, cfg: RunConfig) -> float:
    """Mean loss over `eval_batches` global batches of `dataset`, through a forward-only pipeline."""
    for chunk in chunks:
        chunk.eval()
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)
    losses = [run_schedule(chunks, plan, *get_batch(dataset, indices), layout, forward_only=True)
              for _, indices in zip(range(cfg.trainer.eval_batches), sampler)]
    for chunk in chunks:
        chunk.train()
    return sum(losses) / len(losses)


def train(cfg: RunConfig) -> dict:
    """Train on the embedded Shakespeare corpus; returns the final train and validation losses."""
    layout = build_layout(cfg)
    logging_rank = layout.rank == 0
    tokenizer = ByteTokenizer()
    if layout.rank == 0:  # one rank tokenizes; the others then find valid files and skip the work
        prepare_shakespeare(cfg.data.cache_dir, tokenizer)
    comm.barrier()
    prefixes = prepare_shakespeare(cfg.data.cache_dir, tokenizer)
    train_set = GPTWindowDataset(IndexedTokens(prefixes["train"]), cfg.trainer.seq_length, cfg.seed)
    valid_set = GPTWindowDataset(IndexedTokens(prefixes["validation"]), cfg.trainer.seq_length, cfg.seed)

    chunks = build_model_chunks(model_preset(cfg.model), layout, cfg.seed, cfg.parallel.virtual_stages)
    plan = pipeline_plan(cfg)
    params = [p for _, p in named_parameters(chunks)]
    optimizer = build_optimizer(chunks, layout, optimizer_config(cfg))
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)
    tokens_per_step = cfg.global_batch_size * cfg.trainer.seq_length
    if logging_rank:
        print(f"{cfg.model}: {sum(p.numel() for p in params):,} parameters on rank 0 | tp={layout.tp.size} "
              f"pp={layout.pp.size} dp={layout.dp.size} {plan.name} m={plan.num_microbatches} | "
              f"global batch {cfg.global_batch_size} x {cfg.trainer.seq_length} tokens", flush=True)

    history = {"train_loss": [], "val_loss": []}
    start = time.perf_counter()
    for step, indices in zip(range(cfg.trainer.max_steps), sampler):
        optimizer.set_lr(cosine_lr(step, cfg))
        tokens, targets = get_batch(train_set, indices)
        loss, stats = train_step(chunks, optimizer, tokens, targets, layout, plan)
        history["train_loss"].append(loss)
        last = step + 1 == cfg.trainer.max_steps
        if logging_rank and (step % cfg.trainer.log_interval == 0 or last):
            elapsed = time.perf_counter() - start
            print(f"step {step:5d} | loss {loss:.4f} | lr {cosine_lr(step, cfg):.2e} | "
                  f"grad norm {stats['grad_norm']:.3f}{' (skipped)' if stats['skipped'] else ''} | "
                  f"{tokens_per_step * (step + 1) / elapsed:,.0f} tokens/s", flush=True)
        if (step + 1) % cfg.trainer.eval_interval == 0 or last:
            val = evaluate(chunks, plan, valid_set, layout, cfg)
            history["val_loss"].append(val)
            if logging_rank:
                print(f"step {step:5d} | validation loss {val:.4f} | perplexity {math.exp(val):.2f}", flush=True)
    return history
