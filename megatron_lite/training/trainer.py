"""The training loop of one rank: steps, evaluation, metrics, checkpoints, and a sample at the end."""

from __future__ import annotations

import math
import os

import torch

from megatron_lite.checkpoint import latest_step, load_checkpoint, save_checkpoint
from megatron_lite.data.sampler import DistributedBatchSampler, get_batch
from megatron_lite.pipeline.schedules import PipelinePlan
from megatron_lite.training.config import RunConfig
from megatron_lite.training.generate import sample_tokens
from megatron_lite.training.launch import describe_placement
from megatron_lite.training.logging import MetricsLogger, WandbSettings
from megatron_lite.training.metrics import StepMetrics, StepTimer, model_flops_per_token
from megatron_lite.training.preemption import StopRequest, requeue_slurm_job, slurm_job_id
from megatron_lite.training.setup import build_datasets, build_layout, build_trainable, cosine_lr, pipeline_plan
from megatron_lite.training.step import run_schedule


@torch.no_grad()
def evaluate(chunks, plan: PipelinePlan, dataset, layout, cfg: RunConfig) -> float:
    """Mean loss over the first `eval_batches` global batches of `dataset` (the same ones every time),
    through a forward-only pipeline."""
    for chunk in chunks:
        chunk.eval()
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)
    losses = [run_schedule(chunks, plan, *get_batch(dataset, indices), layout, forward_only=True)
              for _, indices in zip(range(cfg.trainer.eval_batches), sampler)]
    for chunk in chunks:
        chunk.train()
    return sum(losses) / len(losses)


def _wandb_settings(cfg: RunConfig, output_dir: str | None) -> WandbSettings:
    w = cfg.logging.wandb
    return WandbSettings(mode=w.mode, project=w.project, name=w.name, tags=tuple(w.tags), entity=w.entity,
                         dir=w.dir or output_dir)


def _save(cfg, step, chunks, optimizer, layout, sampler) -> None:
    """optimizer: the native one (the DeepSpeed backend refuses checkpoint.dir up front)."""
    extra = {"step": step, "scheduler": {"step": step}, "data": sampler.state_dict(), "config": cfg.to_dict()}
    save_checkpoint(cfg.checkpoint.dir, step, chunks, optimizer, layout, extra, keep_last=cfg.checkpoint.keep_last)


def _loop(cfg, layout, data, trainable, plan, sampler, logger, timer, history, stop, start_step) -> None:
    chunks, optimizer = trainable.chunks, trainable.optimizer
    ckpt = cfg.checkpoint
    tokens_per_step = cfg.global_batch_size * cfg.trainer.seq_length
    flops_per_token = model_flops_per_token(cfg.model_config(), cfg.trainer.seq_length)
    peak_flops = cfg.trainer.peak_tflops * 1e12 if cfg.trainer.peak_tflops else None
    done = start_step
    for step, indices in zip(range(start_step, cfg.trainer.max_steps), sampler):
        lr = cosine_lr(step, cfg)
        trainable.set_lr(lr)
        tokens, targets = get_batch(data.train, indices)
        with timer:
            loss, stats = trainable.step(tokens, targets)
        history["train_loss"].append(loss)
        perf = StepMetrics.compute(timer.elapsed, tokens_per_step, flops_per_token, layout.world_size, peak_flops)
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": stats["grad_norm"],
                   "train/skipped": float(stats["skipped"]), **perf.as_dict(),
                   **{f"comm/{key}_bytes": n for key, n in stats.get("comm_bytes", {}).items()}}
        done = step + 1
        if done % cfg.trainer.eval_interval == 0 or done == cfg.trainer.max_steps:
            val = evaluate(chunks, plan, data.validation, layout, cfg)
            history["val_loss"].append(val)
            metrics.update({"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})
        logger.log(step, metrics, force="val/loss" in metrics)
        history["last_step"] = step
        if layout.rank == cfg.trainer.crash_rank and done == cfg.trainer.crash_after_step:
            raise RuntimeError(f"trainer.crash_rank={layout.rank}: crashing after step {done} on purpose")
        if done < cfg.trainer.max_steps and stop.agreed(layout):
            history["preempted"] = True
            if ckpt.dir:
                _save(cfg, done, chunks, optimizer, layout, sampler)
            return
        if ckpt.dir and ckpt.interval and done % ckpt.interval == 0 and done < cfg.trainer.max_steps:
            _save(cfg, done, chunks, optimizer, layout, sampler)
    if ckpt.dir and done > start_step:
        _save(cfg, done, chunks, optimizer, layout, sampler)


def train(cfg: RunConfig, output_dir: str | None = None) -> dict:
    """Train (resuming from the latest checkpoint if there is one); returns the loss history."""
    layout = build_layout(cfg)
    data = build_datasets(cfg, layout)
    plan = pipeline_plan(cfg)
    trainable = build_trainable(cfg, layout, plan)
    chunks, optimizer = trainable.chunks, trainable.optimizer
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)

    start_step = 0
    ckpt = cfg.checkpoint
    if ckpt.dir and ckpt.resume and latest_step(ckpt.dir) is not None:
        extra = load_checkpoint(ckpt.dir, chunks, optimizer, layout)
        start_step = extra["step"]
        sampler.load_state_dict(extra["data"])

    logging_rank = layout.rank == 0
    logger = MetricsLogger(logging_rank, _wandb_settings(cfg, output_dir), cfg.to_dict(),
                           total_steps=cfg.trainer.max_steps, log_interval=cfg.trainer.log_interval,
                           start_step=start_step)
    params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    logger.message(f"{cfg.model.name}: {params:,} parameters on rank 0 | tp={layout.tp.size} pp={layout.pp.size} "
                   f"dp={layout.dp.size} {plan.name} m={plan.num_microbatches} | global batch "
                   f"{cfg.global_batch_size} x {cfg.trainer.seq_length} tokens"
                   + (f" | resumed at step {start_step}" if start_step else ""))

    placement = describe_placement(layout)  # a collective: every rank takes part, rank 0 prints
    if placement:
        logger.message(placement)

    history = {"train_loss": [], "val_loss": [], "start_step": start_step, "preempted": False}
    timer = StepTimer(layout.device if layout.device.type == "cuda" else None)
    with StopRequest() as stop:
        _loop(cfg, layout, data, trainable, plan, sampler, logger, timer, history, stop, start_step)
    if history["preempted"]:
        # Requeue only with a checkpoint to resume from (the save ended with a barrier: every rank's
        # files are on disk). SLURM ends the job's tasks as soon as it requeues: rank 0 asks last.
        job = slurm_job_id() if ckpt.dir else None
        logger.message(f"stop signal: stopped after step {history['last_step']}"
                       + (", checkpoint saved" if ckpt.dir else "") + (f", requeueing job {job}" if job else ""))
        logger.finish()
        if job and layout.rank == 0:
            error = requeue_slurm_job(job)
            if error:
                logger.message(f"requeue of job {job} failed ({error}): resubmit it to resume from the checkpoint")
        return history

    if cfg.trainer.sample_tokens:
        prompt = data.validation_tokens.tokens(0, cfg.trainer.seq_length).tolist()
        ids = sample_tokens(chunks, plan, layout, prompt, cfg.trainer.sample_tokens, cfg.seed)
        text = data.tokenizer.decode([i for i in ids if i != data.tokenizer.eod_id])
        history["sample"] = text
        logger.message("sample from the model after training:\n" + text)
    logger.finish()
    return history


def run_rank(rank: int, world_size: int, cfg: RunConfig, output_dir: str | None) -> dict:
    """Entry point of one locally spawned rank (see scripts/train.py)."""
    os.environ.setdefault("RANK", str(rank))
    return train(cfg, output_dir)
