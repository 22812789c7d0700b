"""The training loop of one rank: steps, evaluation, metrics, checkpoints, and a sample at the end."""

from __future__ import annotations

import math
import os

import torch

from megatron_lite.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megatron_lite.parallel import comm
from megatron_lite.data.sampler import DistributedBatchSampler, get_batch
from megatron_lite.pipeline.schedules import PipelinePlan
from megatron_lite.training.config import RunConfig
from megatron_lite.training.generate import sample_tokens
from megatron_lite.training.launch import describe_placement
from megatron_lite.training.logging import MetricsLogger, WandbSettings, scrub_secrets
from megatron_lite.training.metrics import StepMetrics, StepTimer, model_flops_per_token
from megatron_lite.training.preemption import StopRequest, requeue_slurm_job, slurm_job_id
from megatron_lite.training.resume import ResumePlan, plan_resume
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


class RunStopped(RuntimeError):
    """The run stopped itself for a reason the user must act on (e.g. it diverged); the launcher shows
    the message without a traceback."""

    report_without_traceback = True


def _finite_state(loss: float, chunks, layout) -> bool:
    """Whether the last loss and every weight on every rank are finite: no checkpoint is written from
    a diverged model."""
    ok = math.isfinite(loss) and all(bool(torch.isfinite(p).all()) for chunk in chunks for p in chunk.parameters())
    flag = torch.tensor([0.0 if ok else 1.0], device=layout.device)
    comm.all_reduce(flag, layout.group("world"), op="max")
    return flag.item() == 0.0


def _save(cfg, plan: ResumePlan, step, chunks, optimizer, layout, sampler, logger, loss, skipping: bool) -> bool:
    """optimizer: the native one (the DeepSpeed backend refuses checkpoint.dir up front). Nothing is
    saved while steps are being skipped for non-finite gradients, or from non-finite weights."""
    if skipping or not _finite_state(loss, chunks, layout):
        logger.message(f"not saving a checkpoint at step {step}: "
                       + ("the step was skipped, its gradients were not finite" if skipping
                          else "the loss or the weights are not finite"))
        return False
    extra = {"step": step, "scheduler": {"step": step}, "data": sampler.state_dict(),
             "config": scrub_secrets(cfg.to_dict()), "run_id": plan.run_id}
    try:
        save_checkpoint(plan.save_dir, step, chunks, optimizer, layout, extra, keep_last=cfg.checkpoint.keep_last)
    except CheckpointError as err:  # e.g. disk full: the message says what is left and what was kept
        raise RunStopped(str(err)) from err
    return True


def _counts_as_skipped(stats: dict, loss: float, optimizer) -> bool:
    """A step skipped for non-finite gradients; fp16's loss-scale backoff (finite loss, a scale that
    can still go down) is the scaler doing its job and does not count."""
    if not stats["skipped"]:
        return False
    scaler = getattr(optimizer, "scaler", None)
    backing_off = scaler is not None and math.isfinite(loss) and stats.get("loss_scale", 0.0) > scaler.min_scale
    return not backing_off


def _loop(cfg, plan, layout, data, trainable, pipeline, sampler, logger, timer, history, stop, start_step) -> None:
    chunks, optimizer = trainable.chunks, trainable.optimizer
    ckpt, save_dir = cfg.checkpoint, plan.save_dir
    tokens_per_step = cfg.global_batch_size * cfg.trainer.seq_length
    flops_per_token = model_flops_per_token(cfg.model_config(), cfg.trainer.seq_length)
    peak_flops = cfg.trainer.peak_tflops * 1e12 if cfg.trainer.peak_tflops else None
    done, loss, skipped_in_a_row = start_step, float("nan"), 0

    def save() -> bool:
        return _save(cfg, plan, done, chunks, optimizer, layout, sampler, logger, loss, skipped_in_a_row > 0)

    for step, indices in zip(range(start_step, cfg.trainer.max_steps), sampler):
        lr = cosine_lr(step, cfg)
        trainable.set_lr(lr)
        tokens, targets = get_batch(data.train, indices)
        with timer:
            loss, stats = trainable.step(tokens, targets)
        history["train_loss"].append(loss)
        skipped_in_a_row = skipped_in_a_row + 1 if _counts_as_skipped(stats, loss, optimizer) else 0
        perf = StepMetrics.compute(timer.elapsed, tokens_per_step, flops_per_token, layout.world_size, peak_flops)
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": stats["grad_norm"],
                   "train/skipped": float(stats["skipped"]), **perf.as_dict(),
                   **{f"comm/{key}_bytes": n for key, n in stats.get("comm_bytes", {}).items()}}
        done = step + 1
        if done % cfg.trainer.eval_interval == 0 or done == cfg.trainer.max_steps:
            val = evaluate(chunks, pipeline, data.validation, layout, cfg)
            history["val_loss"].append(val)
            metrics.update({"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})
        logger.log(step, metrics, force="val/loss" in metrics or bool(stats["skipped"]))
        history["last_step"] = step
        if skipped_in_a_row >= cfg.trainer.max_skipped_steps:
            raise RunStopped(f"{skipped_in_a_row} steps in a row (up to step {done}) were skipped because the loss "
                             f"or gradients were not finite (loss {loss}, grad norm {stats['grad_norm']}): the run "
                             f"has diverged and stops (trainer.max_skipped_steps={cfg.trainer.max_skipped_steps}); "
                             "no checkpoint was written from this state. Lower optim.lr or resume from an earlier "
                             "checkpoint")
        if layout.rank == cfg.trainer.crash_rank and done == cfg.trainer.crash_after_step:
            raise RuntimeError(f"trainer.crash_rank={layout.rank}: crashing after step {done} on purpose")
        if done < cfg.trainer.max_steps and stop.agreed(layout):
            history["preempted"] = True
            if save_dir:
                history["saved"] = save()
            return
        if save_dir and ckpt.interval and done % ckpt.interval == 0 and done < cfg.trainer.max_steps:
            save()
    if save_dir and done > start_step:
        save()


def decide_resume(cfg: RunConfig, layout, output_dir: str | None, plan: ResumePlan | None):
    """Rank 0's plan (made by the launcher, or here) on every rank: one view of the filesystem decides
    what every rank loads. Returns (plan, the directory lock this process took, if any)."""
    lock, outcome = None, None
    if layout.rank == 0:
        try:
            if plan is None:
                plan, lock = plan_resume(cfg, output_dir)
            outcome = ("ok", plan)
        except (ValueError, CheckpointError, OSError) as err:
            outcome = ("error", f"{type(err).__name__}: {err}")
    status, value = comm.all_gather_object(outcome, layout.group("world"))[0]
    if status == "error":
        raise RunStopped(value)
    return value, lock


def train(cfg: RunConfig, output_dir: str | None = None, plan: ResumePlan | None = None) -> dict:
    """Train, from the checkpoint `plan` names (rank 0's; None: decided here, see training/resume.py);
    returns the loss history."""
    layout = build_layout(cfg)
    plan, lock = decide_resume(cfg, layout, output_dir, plan)
    try:
        return _train(cfg, layout, plan, output_dir)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, layout, plan: ResumePlan, output_dir: str | None) -> dict:
    data = build_datasets(cfg, layout)
    pipeline = pipeline_plan(cfg)
    trainable = build_trainable(cfg, layout, pipeline)
    chunks, optimizer = trainable.chunks, trainable.optimizer
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)

    start_step = 0
    if plan.load_step is not None:
        extra = load_checkpoint(plan.load_dir, chunks, optimizer, layout, step=plan.load_step, verify=False)
        start_step = extra["step"]
        sampler.load_state_dict(extra["data"])

    logging_rank = layout.rank == 0
    logger = MetricsLogger(logging_rank, _wandb_settings(cfg, output_dir), cfg.to_dict(),
                           total_steps=cfg.trainer.max_steps, log_interval=cfg.trainer.log_interval,
                           start_step=start_step)
    params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    origin = "" if plan.source != "resume_from" else f" of checkpoint.resume_from={plan.load_dir}"
    logger.message(f"{cfg.model.name}: {params:,} parameters on rank 0 | tp={layout.tp.size} pp={layout.pp.size} "
                   f"dp={layout.dp.size} {pipeline.name} m={pipeline.num_microbatches} | global batch "
                   f"{cfg.global_batch_size} x {cfg.trainer.seq_length} tokens"
                   + (f" | resumed at step {start_step}{origin}" if start_step else ""))
    if plan.save_dir:
        logger.message(f"checkpoints: {plan.save_dir}")

    placement = describe_placement(layout)  # a collective: every rank takes part, rank 0 prints
    if placement:
        logger.message(placement)

    history = {"train_loss": [], "val_loss": [], "start_step": start_step, "preempted": False}
    timer = StepTimer(layout.device if layout.device.type == "cuda" else None)
    try:
        with StopRequest() as stop:
            _loop(cfg, plan, layout, data, trainable, pipeline, sampler, logger, timer, history, stop, start_step)
    except RunStopped:
        logger.finish(exit_code=1)  # the launcher prints the message
        raise
    if history["preempted"]:
        # Requeue only with a checkpoint to resume from (the save ended with a barrier: every rank's
        # files are on disk). SLURM ends the job's tasks as soon as it requeues: rank 0 asks last.
        saved = history.get("saved", False)
        job = slurm_job_id() if saved else None
        logger.message(f"stop signal: stopped after step {history['last_step']}"
                       + (", checkpoint saved" if saved else "") + (f", requeueing job {job}" if job else ""))
        logger.finish()
        if job and layout.rank == 0:
            error = requeue_slurm_job(job)
            if error:
                logger.message(f"requeue of job {job} failed ({error}): resubmit it to resume from the checkpoint")
        return history

    if cfg.trainer.sample_tokens:
        prompt = data.validation_tokens.tokens(0, cfg.trainer.seq_length).tolist()
        ids = sample_tokens(chunks, pipeline, layout, prompt, cfg.trainer.sample_tokens, cfg.seed)
        text = data.tokenizer.decode([i for i in ids if i != data.tokenizer.eod_id])
        history["sample"] = text
        logger.message("sample from the model after training:\n" + text)
    logger.finish()
    return history


def run_rank(rank: int, world_size: int, cfg: RunConfig, output_dir: str | None, plan: ResumePlan | None) -> dict:
    """Entry point of one locally spawned rank (see scripts/train.py); `plan` was made by the launcher."""
    os.environ.setdefault("RANK", str(rank))
    return train(cfg, output_dir, plan)
