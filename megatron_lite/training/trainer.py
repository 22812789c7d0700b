"""The training loop of one rank: steps, evaluation, metrics, checkpoints, and a sample at the end."""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megatron_lite.parallel import comm
from megatron_lite.data.sampler import DistributedBatchSampler, get_batch
from megatron_lite.pipeline.schedules import PipelinePlan
from megatron_lite.training.config import RunConfig
from megatron_lite.training.sample import generation_chunks, sample_prompt_length, sample_tokens
from megatron_lite.training.launch import describe_placement
from megatron_lite.parallel.sharding import holds_canonical_copy, spec_of
from megatron_lite.training.faults import injected_crash
from megatron_lite.training.logging import (MetricsLogger, WandbSettings, describe_comm, holds_loss, largest_comm,
                                           scrub_secrets)
from megatron_lite.training.metrics import (StepMetrics, StepTimer, memory_metrics, model_flops_per_token,
                                            reset_memory_peaks)
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


def _wandb_settings(cfg: RunConfig, output_dir: str | None, run_id: str | None) -> WandbSettings:
    w = cfg.logging.wandb
    return WandbSettings(mode=w.mode, project=w.project, name=w.name, tags=tuple(w.tags), entity=w.entity,
                         dir=w.dir or output_dir, id=run_id)


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


def _save(cfg, plan: ResumePlan, step, chunks, optimizer, layout, sampler, logger, loss, state: RunState) -> bool:
    """optimizer: the native one (the DeepSpeed backend refuses checkpoint.dir up front). Nothing is
    saved while steps are being skipped for non-finite gradients, or from non-finite weights."""
    skipping = state.skipped_in_a_row > 0
    if skipping or not _finite_state(loss, chunks, layout):
        logger.message(f"not saving a checkpoint at step {step}: "
                       + ("the step was skipped, its gradients were not finite" if skipping
                          else "the loss or the weights are not finite"))
        return False
    extra = {"step": step, "scheduler": {"step": step}, "data": sampler.state_dict(),
             "config": scrub_secrets(cfg.to_dict()), "run_id": plan.run_id, "wandb_run_id": state.wandb_run_id,
             "skipped_total": state.skipped_total}
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


@dataclass
class RunState:
    """What the loop carries from step to step and into checkpoints, beyond model and optimizer."""

    wandb_run_id: str | None = None  # the W&B run a requeue resumes (stored with every checkpoint)
    skipped_total: int = 0  # steps whose update was skipped (non-finite gradients, fp16 backoff included)
    skipped_in_a_row: int = 0  # only those that count toward trainer.max_skipped_steps


def _total_parameters(chunks, layout) -> int:
    """Parameters of the whole model over all ranks: each value counted once, on the rank holding its
    canonical copy (the first TP/DP replica; a tied embedding on its primary stage)."""
    mine = sum(p.numel() for chunk in chunks for p in chunk.parameters()
               if holds_canonical_copy(spec_of(p), layout.coordinates, layout.sizes))
    count = torch.tensor([float(mine)], dtype=torch.float64, device=layout.device)
    return int(comm.all_reduce(count, layout.group("world")).item())


def _stage_metrics(layout, step_time_s: float, memory: dict[str, float]) -> dict[str, float]:
    """Step time and memory of every pipeline stage (the largest of its ranks), for W&B: the logging
    rank is on the last stage and sees only its own. A collective over the job."""
    kind = next(iter(memory))  # cuda_max_allocated_gib on CUDA, host_rss_gib on CPU
    rows = comm.all_gather_object((layout.pp.rank, step_time_s, memory[kind]), layout.group("world"))
    out = {}
    for stage in range(layout.pp.size):
        here = [row for row in rows if row[0] == stage]
        out[f"stage{stage}/step_time_s"] = max(t for _, t, _ in here)
        out[f"stage{stage}/{kind}"] = max(m for *_, m in here)
    return out


def _moe_metrics(chunks, layout, cfg, sequence_parallel: bool) -> dict[str, float]:
    """Routing since the last log step, over the whole job: per MoE layer the tokens of the busiest
    expert over the mean (1.0: perfectly balanced), the mean balancing and z losses per micro batch
    (or step, global-batch scope) and layer, and with a capacity the share of assignments dropped. A collective over the job (every rank takes part, with zeros for the layers of
    other stages). TP ranks without SP route the same tokens: each counts 1/tp of them."""
    moe = cfg.moe
    layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    tokens = torch.zeros(len(layers), moe.num_experts, dtype=torch.float64)
    terms = torch.zeros(4, dtype=torch.float64)  # balancing, z, how many were summed, dropped assignments
    for chunk in chunks:
        for layer, block in chunk.moe_blocks().items():
            dropped = block.load.dropped
            counts, sums, summed = block.load.take()
            tokens[layers.index(layer)] += counts.double().cpu()
            terms += torch.cat([sums.cpu(), torch.tensor([float(summed), float(dropped)], dtype=torch.float64)])
    duplicates = 1 if sequence_parallel else layout.tp.size
    terms[3] /= duplicates
    summed = comm.all_reduce(torch.cat([tokens.flatten() / duplicates, terms]).to(layout.device),
                             layout.group("world")).cpu()
    tokens, terms = summed[:tokens.numel()].view_as(tokens), summed[tokens.numel():]
    out = {}
    for row, layer in zip(tokens, layers):
        if row.sum() > 0:
            out[f"moe/layer{layer}/max_over_mean"] = (row.max() / row.mean()).item()
    if out:
        out["moe/max_over_mean"] = max(out.values())
    if moe.capacity_factor is not None and tokens.sum() > 0:
        out["moe/dropped_fraction"] = (terms[3] / tokens.sum()).item()
    if terms[2] > 0:
        out["moe/balance_loss"], out["moe/z_loss"] = (terms[0] / terms[2]).item(), (terms[1] / terms[2]).item()
    return out


def _report_comm(stats: dict, layout, logger) -> dict[str, int]:
    """The first step's bytes per group and operation, gathered from every rank (no rank sees every
    group: a first-stage rank has no loss broadcast to send, a last-stage one no embedding input), as
    one console line and W&B figures. A collective over the job."""
    counters = comm.all_gather_object(stats.get("comm_bytes", {}), layout.group("world"))
    if layout.world_size > 1:
        logger.message(f"communication per step (largest rank's payload x ranks): {describe_comm(counters)}")
    largest = {f"comm/{key}_bytes": n for key, (n, _) in largest_comm(counters).items()}
    logger.summarize(largest)
    return largest


def _loop(cfg, plan, layout, data, trainable, pipeline, sampler, logger, timer, history, stop, start_step,
          state: RunState) -> None:
    chunks, optimizer = trainable.chunks, trainable.optimizer
    ckpt, save_dir = cfg.checkpoint, plan.save_dir
    tokens_per_step = cfg.global_batch_size * cfg.trainer.seq_length
    flops_per_token = model_flops_per_token(cfg.model_config(), cfg.trainer.seq_length)
    peak_flops = cfg.trainer.peak_tflops * 1e12 if cfg.trainer.peak_tflops else None
    scaled = getattr(optimizer, "scaler", None) is not None
    crash = injected_crash()
    done, loss = start_step, float("nan")

    def save() -> bool:
        return _save(cfg, plan, done, chunks, optimizer, layout, sampler, logger, loss, state)

    reset_memory_peaks(layout.device)
    for step, indices in zip(range(start_step, cfg.trainer.max_steps), sampler):
        lr = cosine_lr(step, cfg)
        trainable.set_lr(lr)
        tokens, targets = get_batch(data.train, indices)
        with timer:
            loss, stats = trainable.step(tokens, targets)
        done = step + 1
        history["train_loss"].append(loss)
        state.skipped_total += bool(stats["skipped"])
        state.skipped_in_a_row = state.skipped_in_a_row + 1 if _counts_as_skipped(stats, loss, optimizer) else 0
        perf = StepMetrics.compute(timer.elapsed, tokens_per_step, flops_per_token, layout.world_size, peak_flops)
        memory = memory_metrics(layout.device)
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": stats["grad_norm"],
                   "train/skipped": float(stats["skipped"]), "train/skipped_total": state.skipped_total,
                   "train/tokens": done * tokens_per_step, "train/samples": done * cfg.global_batch_size,
                   **perf.as_dict(), **{f"memory/{key}": value for key, value in memory.items()}}
        if scaled:
            metrics["train/loss_scale"] = stats["loss_scale"]
        if step == start_step:
            metrics.update(_report_comm(stats, layout, logger))
        if done % cfg.trainer.eval_interval == 0 or done == cfg.trainer.max_steps:
            val = evaluate(chunks, pipeline, data.validation, layout, cfg)
            history["val_loss"].append(val)
            metrics.update({"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})
        if logger.due(done):
            metrics.update(_stage_metrics(layout, timer.elapsed, memory))
            if cfg.model.moe is not None:
                metrics.update(_moe_metrics(chunks, layout, cfg.model_config(), cfg.parallel.sequence_parallel))
            reset_memory_peaks(layout.device)  # the next console line shows the next interval's peak
        logger.log(done, metrics, force=bool(stats["skipped"]))
        history["last_step"] = done
        if state.skipped_in_a_row >= cfg.trainer.max_skipped_steps:
            raise RunStopped(f"{state.skipped_in_a_row} steps in a row (up to step {done}) were skipped because the "
                             f"loss or gradients were not finite (loss {loss}, grad norm {stats['grad_norm']}): the "
                             f"run has diverged and stops (trainer.max_skipped_steps={cfg.trainer.max_skipped_steps}); "
                             "no checkpoint was written from this state. Lower optim.lr or resume from an earlier "
                             "checkpoint")
        if crash and layout.rank == crash.rank and done == crash.after_step:
            raise RuntimeError(f"MEGATRON_LITE_CRASH_RANK={layout.rank}: crashing after step {done} on purpose")
        if done < cfg.trainer.max_steps and stop.agreed(layout):
            history["preempted"] = True
            if save_dir:
                history["saved"] = save()
            return
        if save_dir and ckpt.interval and done % ckpt.interval == 0 and done < cfg.trainer.max_steps:
            save()
    if save_dir and done > start_step and save():
        history["saved_step"] = done


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


def _wandb_run_id(cfg: RunConfig, plan: ResumePlan, extra: dict, layout) -> str | None:
    """The W&B run this process logs to: its own run's, stored with the checkpoint it resumes from (a
    requeued job continues its run), or a new id from rank 0 (rank 0 writes it into checkpoints)."""
    if cfg.logging.wandb.mode == "disabled":
        return None
    if plan.source == "own" and extra.get("wandb_run_id"):
        return extra["wandb_run_id"]
    return comm.all_gather_object(uuid.uuid4().hex[:16] if layout.rank == 0 else None, layout.group("world"))[0]


def _startup_lines(cfg: RunConfig, layout, pipeline, parameters: int) -> list[str]:
    backend = dist.get_backend() if dist.is_initialized() else "none (one process)"
    device = layout.device.type + (f" x{layout.world_size}" if layout.device.type == "cuda" else "")
    return [f"device {device}, backend {backend}, world {layout.world_size} | layout {layout.sizes.describe()} | "
            f"{pipeline.name}, {pipeline.num_microbatches} microbatches",
            f"model {cfg.model.name}: {parameters:,} parameters | global batch {cfg.global_batch_size} x "
            f"{cfg.trainer.seq_length} tokens = micro batch {cfg.trainer.micro_batch_size} x {cfg.microbatches} "
            f"microbatches x dp {layout.dp.size}"]


def _train(cfg: RunConfig, layout, plan: ResumePlan, output_dir: str | None) -> dict:
    data = build_datasets(cfg, layout)
    pipeline = pipeline_plan(cfg)
    trainable = build_trainable(cfg, layout, pipeline)
    chunks, optimizer = trainable.chunks, trainable.optimizer
    sampler = DistributedBatchSampler(None, cfg.global_batch_size, layout.dp.rank, layout.dp.size)

    start_step, extra = 0, {}
    if plan.load_step is not None:
        extra = load_checkpoint(plan.load_dir, chunks, optimizer, layout, step=plan.load_step, verify=False)
        start_step = extra["step"]
        sampler.load_state_dict(extra["data"])
    state = RunState(wandb_run_id=_wandb_run_id(cfg, plan, extra, layout),
                     skipped_total=extra.get("skipped_total", 0) if plan.source == "own" else 0)

    parameters = _total_parameters(chunks, layout)
    logger = MetricsLogger(holds_loss(layout), _wandb_settings(cfg, output_dir, state.wandb_run_id), cfg.to_dict(),
                           total_steps=cfg.trainer.max_steps, log_interval=cfg.trainer.log_interval,
                           start_step=start_step)
    logger.summarize({"model/parameters": parameters})
    for line in _startup_lines(cfg, layout, pipeline, parameters):
        logger.message(line)
    if start_step:
        origin = f" of checkpoint.resume_from={plan.load_dir}" if plan.source == "resume_from" else ""
        logger.message(f"resumed after step {start_step}{origin}")
    if plan.save_dir:
        logger.message(f"checkpoints: {plan.save_dir}")

    placement = describe_placement(layout)  # a collective: every rank takes part
    if placement:
        logger.message(placement)

    history = {"train_loss": [], "val_loss": [], "start_step": start_step, "preempted": False}
    timer = StepTimer(layout.device if layout.device.type == "cuda" else None)
    try:
        with StopRequest() as stop:
            _loop(cfg, plan, layout, data, trainable, pipeline, sampler, logger, timer, history, stop, start_step,
                  state)
    except RunStopped:
        logger.finish(exit_code=1)  # the launcher prints the message
        raise
    if history["preempted"]:
        # Requeue only with a checkpoint to resume from (the save ended with a barrier: every rank's
        # files are on disk). SLURM ends the job's tasks as soon as it requeues: the logging rank has
        # written its line and closed its W&B run (the barrier) before rank 0 asks.
        saved = history.get("saved", False)
        job = slurm_job_id() if saved else None
        logger.message(f"stop signal: stopped after step {history['last_step']}"
                       + (", checkpoint saved" if saved else "") + (f", requeueing job {job}" if job else ""))
        logger.finish()
        comm.barrier()
        if job and layout.rank == 0:
            error = requeue_slurm_job(job)
            if error:
                print(f"requeue of job {job} failed ({error}): resubmit it to resume from the checkpoint", flush=True)
        return history

    if cfg.trainer.sample_tokens:
        sample_chunks, reason = generation_chunks(cfg, chunks, layout, _final_checkpoint(cfg, plan, history))
        if sample_chunks is None:
            logger.message(f"no sample at the end: {reason}")
        else:
            prompt = data.validation_tokens.tokens(0, sample_prompt_length(cfg)).tolist()
            ids = sample_tokens(cfg, sample_chunks, layout, prompt, data.tokenizer.eod_id)
            history["sample"] = text = data.tokenizer.decode(ids)
            logger.message("sample from the model after training:\n" + text)
    logger.finish()
    return history


def _final_checkpoint(cfg: RunConfig, plan: ResumePlan, history: dict) -> tuple[str, int] | str:
    """(directory, step) of the checkpoint holding the weights the run ended with, or why there is none."""
    if "saved_step" in history:
        return plan.save_dir, history["saved_step"]
    if "last_step" not in history and plan.load_step is not None:  # nothing left to train: what was loaded
        return plan.load_dir, plan.load_step
    if not cfg.checkpoint.dir:
        return "checkpoint.dir is null"
    return "the final checkpoint was not written"


def run_rank(rank: int, world_size: int, cfg: RunConfig, output_dir: str | None, plan: ResumePlan | None) -> dict:
    """Entry point of one locally spawned rank (see scripts/train.py); `plan` was made by the launcher."""
    os.environ.setdefault("RANK", str(rank))
    return train(cfg, output_dir, plan)
