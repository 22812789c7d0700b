"""Everything a rank builds before its first step: checks, layout, data, model chunks, plan, optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from megatron_lite.data.defaults import prepare_shakespeare
from megatron_lite.data.gpt_dataset import BlendedDataset, GPTWindowDataset
from megatron_lite.data.indexed import IndexedTokens
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.models.config import check_model_fits_layout
from megatron_lite.optim import OptimizerConfig, build_optimizer
from megatron_lite.parallel import comm
from megatron_lite.parallel.device import choose_device, rank_device, visible_gpus
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes, check_sizes
from megatron_lite.models.partition import build_model_chunks, split_layers
from megatron_lite.pipeline.schedules import (ZERO_BUBBLE, PipelinePlan, build_schedule, forwards_precede_backwards,
                                              schedule_mapping)
from megatron_lite.training.config import RunConfig, check_values
from megatron_lite.training.faults import injected_crash
from megatron_lite.training.step import train_step


def resolve_data_parallel(cfg: RunConfig, world_size: int | None) -> RunConfig:
    """Fill `parallel.dp=null` from the launcher's world size (Megatron's rule: what TP x PP leaves)."""
    if cfg.parallel.dp is not None:
        return cfg
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if world_size is None:
        raise ValueError("parallel.dp=null needs a launcher (torchrun or srun) that sets the world size; "
                         "give parallel.dp a number to start the processes locally")
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp={model_parallel}")
    cfg.parallel.dp = world_size // model_parallel
    return cfg


def check_run_config(cfg: RunConfig, world_size: int) -> None:
    """Everything that can be checked before a process group exists; one clear ValueError each."""
    check_values(cfg)
    if cfg.parallel.dp is None or cfg.parallel.dp < 1:
        raise ValueError(f"parallel.dp={cfg.parallel.dp!r} must be a positive integer (or null under a launcher)")
    sizes = ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp, ep=cfg.parallel.ep)
    check_sizes(sizes, world_size)
    try:
        model_cfg = cfg.model_config()
    except ValueError as err:
        raise ValueError(f"model ({cfg.model.name}): {err}") from None
    check_model_fits_layout(model_cfg, sizes)
    if cfg.model.path is not None:  # headers only: complete files, every tensor there with its shape
        from megatron_lite.interop.load import check_hf_directory

        check_hf_directory(cfg.model.path, model_cfg)
    plan = pipeline_plan(cfg)
    moe = model_cfg.moe
    if moe is not None and moe.aux_loss_scope == "global_batch" and not forwards_precede_backwards(plan):
        raise ValueError(f"model.moe.aux_loss_scope=global_batch needs every forward of a step before its first "
                         f"backward; parallel.schedule={cfg.parallel.schedule} with {plan.num_microbatches} "
                         "microbatches interleaves them: use parallel.schedule=gpipe (or one micro batch), or "
                         "model.moe.aux_loss_scope=micro_batch")
    if moe is not None and cfg.optim.backend == "deepspeed" and (
            sizes.ep > 1 or moe.aux_loss_scope != "micro_batch" or moe.bias_update_rate > 0):
        raise ValueError("optim.backend=deepspeed trains MoE models with parallel.ep=1, aux_loss_scope=micro_batch "
                         "and bias_update_rate=0 only (DeepSpeed averages expert gradients over all of DP and runs "
                         "no step hooks); use optim.backend=native")
    split_layers(model_cfg.num_layers, sizes.pp, cfg.parallel.virtual_stages, cfg.parallel.layers_per_stage)
    seq = cfg.trainer.seq_length
    if seq > model_cfg.max_seq_len:
        raise ValueError(f"trainer.seq_length={seq} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    if cfg.trainer.sample_tokens >= model_cfg.max_seq_len:
        raise ValueError(f"trainer.sample_tokens={cfg.trainer.sample_tokens} must be below model.max_seq_len="
                         f"{model_cfg.max_seq_len} (the sample and its prompt share the model's positions); "
                         "lower it, or 0 for no sample")
    if cfg.parallel.sequence_parallel and seq % sizes.tp:
        raise ValueError(f"parallel.sequence_parallel needs trainer.seq_length={seq} divisible by parallel.tp={sizes.tp}")
    crash = injected_crash()
    if crash is not None and not crash.rank < world_size:
        raise ValueError(f"MEGATRON_LITE_CRASH_RANK={crash.rank} is not a rank of this {world_size}-rank job "
                         f"(0..{world_size - 1})")
    if cfg.optim.backend == "deepspeed" and cfg.parallel.schedule in ZERO_BUBBLE:
        raise ValueError(f"optim.backend=deepspeed runs fused backwards, parallel.schedule={cfg.parallel.schedule} splits "
                         "them; use optim.backend=native or parallel.schedule=1f1b")
    if cfg.optim.backend == "deepspeed" and sizes.pp > 1:
        raise ValueError("optim.backend=deepspeed supports pp=1 only; use optim.backend=native with parallel.pp > 1")
    if cfg.optim.backend == "deepspeed" and cfg.trainer.precision == "fp16":
        raise ValueError("optim.backend=deepspeed is wired for fp32 and bf16; use the native backend for fp16")
    if cfg.optim.backend == "deepspeed" and cfg.checkpoint.dir:
        raise ValueError("optim.backend=deepspeed does not write checkpoints yet; set checkpoint.dir=null or use "
                         "optim.backend=native")


def pipeline_plan(cfg: RunConfig) -> PipelinePlan:
    par, microbatches = cfg.parallel, cfg.microbatches
    try:
        return build_schedule(par.schedule, par.pp, microbatches, par.virtual_stages)
    except ValueError as err:
        raise ValueError(f"parallel.schedule={par.schedule!r} with {microbatches} microbatches (trainer."
                         f"global_batch_size={cfg.global_batch_size} / (micro_batch_size="
                         f"{cfg.trainer.micro_batch_size} x dp={par.dp})): {err}") from None


def cosine_lr(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps: a pure function of the step,
    so the scheduler's whole state is the step number."""
    opt = cfg.optim
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = min(1.0, (step - opt.warmup_steps) / max(1, cfg.trainer.max_steps - opt.warmup_steps))
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))


def optimizer_config(cfg: RunConfig) -> OptimizerConfig:
    opt = cfg.optim
    return OptimizerConfig(lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                           grad_clip=opt.grad_clip, zero1=opt.zero1, bucket_size_mb=opt.bucket_size_mb)


def build_layout(cfg: RunConfig) -> ParallelLayout:
    """The layout on the job's process group (its backend chose the device, see parallel/device.py),
    or the one-process layout on the device `parallel.device` picks. A CPU job keeps freed host memory
    in the process (parallel/host_memory.py), which the trainer asks for and a library user does not get."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_run_config(cfg, world)
    if not dist.is_initialized():
        choice = choose_device(cfg.parallel.device, 1, visible_gpus())
        return ParallelLayout.serial(device=rank_device(choice, 0))
    return ParallelLayout.from_mesh(ParallelSizes(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp, ep=cfg.parallel.ep),
                                    retain_host_memory=True)


@dataclass
class Datasets:
    tokenizer: object
    train: object  # GPTWindowDataset or BlendedDataset
    validation: GPTWindowDataset
    validation_tokens: IndexedTokens


def build_datasets(cfg: RunConfig, layout: ParallelLayout) -> Datasets:
    data, seq = cfg.data, cfg.trainer.seq_length
    tokenizer = build_tokenizer(data.tokenizer, data.tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the {data.tokenizer} tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; raise model.vocab_size")
    if data.name == "shakespeare":
        if layout.rank == 0:  # one rank tokenizes; the others then find valid files and skip the work
            prepare_shakespeare(data.cache_dir, tokenizer)
        comm.barrier()
        prefixes = prepare_shakespeare(data.cache_dir, tokenizer)
        train_prefixes, weights, validation_prefix = [prefixes["train"]], [1.0], prefixes["validation"]
    else:
        train_prefixes, validation_prefix = list(data.train_prefixes), data.validation_prefix
        weights = list(data.train_weights) or [1.0] * len(train_prefixes)
    train_sets = [GPTWindowDataset(IndexedTokens(prefix), seq, cfg.seed) for prefix in train_prefixes]
    train = train_sets[0] if len(train_sets) == 1 else BlendedDataset(train_sets, weights, cfg.seed)
    validation_tokens = IndexedTokens(validation_prefix)
    return Datasets(tokenizer, train, GPTWindowDataset(validation_tokens, seq, cfg.seed), validation_tokens)


@dataclass
class Trainable:
    """The model chunks and how one step updates them, whichever optimizer backend is behind it."""

    chunks: list
    optimizer: object | None  # the native optimizer (checkpointed), None with the DeepSpeed backend
    set_lr: Callable[[float], None]
    step: Callable[..., tuple[float, dict]]  # step(tokens, targets) -> (loss, stats)


def build_chunks(cfg: RunConfig, layout: ParallelLayout) -> list:
    """This rank's model chunks: from the Hugging Face directory model.path (its own slices only), or
    the serial random initialisation."""
    from_hf = cfg.model.path is not None
    chunks = build_model_chunks(cfg.model_config(), layout, cfg.seed, cfg.parallel.virtual_stages,
                                cfg.parallel.layers_per_stage, options=cfg.build_options(), initialize=not from_hf,
                                mapping=schedule_mapping(cfg.parallel.schedule))
    if from_hf:
        from megatron_lite.interop.load import load_hf_weights

        load_hf_weights(chunks, cfg.model.path, cfg.model_config())
    return chunks


def build_trainable(cfg: RunConfig, layout: ParallelLayout, plan: PipelinePlan) -> Trainable:
    chunks = build_chunks(cfg, layout)
    if cfg.optim.backend == "deepspeed":
        from megatron_lite.optim import deepspeed_backend as ds

        engine = ds.build_deepspeed_engine(chunks, layout, optimizer_config(cfg), cfg.optim.deepspeed_zero_stage,
                                           cfg.microbatches, cfg.trainer.micro_batch_size)

        def deepspeed_step(tokens, targets):
            loss = ds.deepspeed_train_step(engine, tokens, targets, layout, cfg.microbatches)
            return loss, ds.deepspeed_step_stats(engine)

        return Trainable(chunks, None, lambda lr: ds.set_lr(engine, lr), deepspeed_step)
    optimizer = build_optimizer(chunks, layout, optimizer_config(cfg))
    return Trainable(chunks, optimizer, optimizer.set_lr,
                     lambda tokens, targets: train_step(chunks, optimizer, tokens, targets, layout, plan))
