"""DeepSpeed as the optimizer backend: `deepspeed.initialize` (ZeRO stage 0, 1 or 2) around a PP=1 model.

DeepSpeed then owns what our `DistributedOptimizer` does natively: gradient accumulation over the
microbatches, the DP reduction (an average, like ours), ZeRO partitioning, the global-norm clipping and
AdamW. What it cannot know about the framework is supplied here:

- `LayoutMPU` presents our `ParallelLayout` as DeepSpeed's model-parallel unit (`mpu`, Megatron's
  interface): DeepSpeed reduces gradients over our DP group only, and sums the gradient norm over our
  TP group.
- Gradient norm, each parameter counted once: DeepSpeed counts a parameter on TP rank 0, and on the
  other TP ranks only when it has `tensor_model_parallel=True`. That attribute is set to our own rule
  (`clip.counts_in_norm`): TP-split parameters on every rank, replicated ones on rank 0 only, and KV
  heads replicated over TP (TP > KV heads) once per chunk.
- Partial TP gradients (a "sum" reduction in the placement: KV heads replicated over TP, sequence-parallel
  norm weights): a gradient hook sums them over the TP ranks that hold the same chunk, per microbatch, before
  DeepSpeed accumulates or reduces them (a sum, so it commutes with accumulation and the DP average).
- Weight decay: two parameter groups with our rule (`adamw.uses_weight_decay`: none for 1-D params).
- Tied input/output embeddings: with PP = 1 the head uses the embedding's tensor itself; nothing to do.

- bf16 parameters (ZeRO-1/2): fp32 master weights, gradients accumulated and reduced in fp32, as ours.

Limits: one pipeline stage (pp = 1, one model chunk; with pp > 1 use the native optimizer), fp32 or bf16
parameters (no fp16 / loss scaling), bf16 only with ZeRO-1/2; no gradient norm reported at stage 0. DeepSpeed's collectives do not go through `comm`, so the layout's
byte counters only see TP traffic. `DS_ACCELERATOR` is set to "cpu" before DeepSpeed is imported when it
is unset and CUDA is not available.

    engine = build_deepspeed_engine(chunks, layout, OptimizerConfig(lr=1e-3), zero_stage=1, microbatches=4)
    loss = deepspeed_train_step(engine, tokens, targets, layout, microbatches=4)
    deepspeed_step_stats(engine)  # {"grad_norm": ..., "skipped": ...}
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from megatron_lite.layers.cross_entropy import step_loss_divisor
from megatron_lite.optim.adamw import uses_weight_decay
from megatron_lite.optim.clip import counts_in_norm
from megatron_lite.optim.optimizer import OptimizerConfig
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import CommGroup
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.sharding import spec_of
from megatron_lite.data.microbatches import split_microbatches

ZERO_STAGES = (0, 1, 2)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
SHARED_MEMORY_COMM_OP = "deepspeed_shm_comm"


def import_deepspeed():
    """Import DeepSpeed, on the CPU accelerator unless told otherwise or CUDA is there. DeepSpeed picks
    its accelerator at its first import, so this must run before anything else imports it."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import logger

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce at init_distributed, used only by
    # its inference all-reduce, which we never call. The compile takes minutes on a fresh machine, and a rank
    # killed during it leaves torch's build lock behind, on which every later run waits forever.
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # elsewhere it is not built, and the probe below is not needed
        deepspeed.ops.__compatible_ops__[SHARED_MEMORY_COMM_OP] = False
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    return deepspeed


class LayoutMPU:
    """Our layout behind Megatron's `mpu` interface, the methods DeepSpeed's engine, ZeRO 1/2 and
    gradient clipping call. Model parallel = TP x PP (Megatron's meaning); its rank is the TP rank,
    as in DeepSpeed's own bwc helpers. Methods of Ulysses sequence parallelism
    (`initialize_sequence_parallel`, `get_sequence_*`) are deliberately absent: DeepSpeed checks for
    them with hasattr and would take another code path."""

    def __init__(self, layout: ParallelLayout):
        if not dist.is_initialized():
            raise RuntimeError("the DeepSpeed backend needs torch.distributed initialised (ParallelLayout.from_mesh)")
        self.layout = layout
        self._model_parallel = self._build_model_parallel_group(layout)

    @staticmethod
    def _build_model_parallel_group(layout: ParallelLayout):
        """TP x PP ranks of this rank's DP index. With pp == 1 that is the TP group; otherwise one group per
        DP index, every rank creating every group in the same order (new_group is collective)."""
        if layout.pp.size == 1:
            return layout.tp.group
        from megatron_lite.parallel.layout import rank_at

        sizes, mine = layout.sizes, None
        for dp in range(sizes.dp):
            ranks = [rank_at(sizes, pp, dp, tp) for pp in range(sizes.pp) for tp in range(sizes.tp)]
            group = dist.new_group(ranks)
            if layout.rank in ranks:
                mine = group
        return mine

    @staticmethod
    def _group(g: CommGroup):
        if g.group is None:
            if dist.get_world_size() != 1:
                raise ValueError(f"layout group {g.name!r} has no process group; build the layout with "
                                 "ParallelLayout.from_mesh")
            return dist.group.WORLD
        return g.group

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp.rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp.size

    def get_tensor_model_parallel_group(self):
        return self._group(self.layout.tp)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.tp.ranks[0]

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # model parallel (TP x PP)
    def get_model_parallel_rank(self) -> int:
        return self.layout.tp.rank if self.layout.pp.size == 1 else self.layout.pp.rank * self.layout.tp.size + self.layout.tp.rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp.size * self.layout.pp.size

    def get_model_parallel_group(self):
        return self._model_parallel if self._model_parallel is not None else self._group(self.layout.tp)

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.layout.dp.rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp.size

    def get_data_parallel_group(self):
        return self._group(self.layout.dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.layout.dp.ranks)

    # pipeline parallel (both spellings DeepSpeed knows)
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.layout.pp.rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp.size

    def get_pipeline_model_parallel_group(self):
        return self._group(self.layout.pp)

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group


def check_supported(chunks: list[torch.nn.Module], layout: ParallelLayout, zero_stage: int) -> None:
    """Raise ValueError naming what the DeepSpeed backend cannot do, and the way out."""
    if layout.pp.size > 1:
        raise ValueError(f"the DeepSpeed optimizer backend runs one pipeline stage; parallel.pp={layout.pp.size}: "
                         "use the native optimizer with pp > 1")
    if len(chunks) != 1:
        raise ValueError(f"the DeepSpeed optimizer backend takes one model chunk, got {len(chunks)}; "
                         "use the native optimizer with virtual pipeline stages")
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeed zero_stage={zero_stage} is not one of {ZERO_STAGES} (ZeRO-3 shards "
                         "parameters, which the tensor-parallel layers do not expect)")
    dtypes = {p.dtype for p in chunks[0].parameters()}
    if len(dtypes) != 1 or not dtypes <= set(SUPPORTED_DTYPES):
        raise ValueError(f"the DeepSpeed optimizer backend supports fp32 or bf16 parameters (one dtype), got "
                         f"{sorted(map(str, dtypes))}; use the native optimizer for fp16")
    if dtypes == {torch.bfloat16} and zero_stage == 0:
        raise ValueError("DeepSpeed's stage 0 accumulates bf16 gradients in bf16 (ours and its ZeRO-1/2 in fp32); "
                         "use zero_stage 1 or 2 with bf16")


def _sum_partial_grad_hook(groups: list[CommGroup]):
    """Gradient hook: sum this partial gradient over the groups of its placement's "sum" reductions
    (the TP ranks holding the same chunk)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        for group in groups:
            comm.all_reduce(grad, group)
        return grad

    return hook


def prepare_parameters(model: torch.nn.Module, layout: ParallelLayout) -> list:
    """Mark parameters for DeepSpeed's norm (counted on this TP rank or not) and hook the partial TP
    gradients. Returns the hook handles."""
    handles = []
    for param in model.parameters():
        # DeepSpeed counts a parameter if TP rank == 0 or this attribute is set, and handles DP itself
        # (partitioned); on TP rank 0 our rule counts every parameter (without PP there is no tied
        # copy), so the two rules agree.
        param.tensor_model_parallel = counts_in_norm(param, layout, partitioned=True)
        groups = [layout.group(name) for name in spec_of(param).partial_sums]
        groups = [g for g in groups if g.size > 1]
        if groups:
            handles.append(param.register_hook(_sum_partial_grad_hook(groups)))
    return handles


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Our decay rule: matrices and embeddings decayed, biases and norm weights (1-D) not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if uses_weight_decay(p)], "weight_decay": weight_decay},
              {"params": [p for p in params if not uses_weight_decay(p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def deepspeed_config(layout: ParallelLayout, config: OptimizerConfig, zero_stage: int, microbatches: int,
                     micro_batch_size: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """The DeepSpeed config dict. `micro_batch_size` only feeds DeepSpeed's batch-size bookkeeping (its
    data loader and throughput timer); the training step splits whatever batch it is given."""
    # Elements, as our bucket_numel, rounded up to a multiple of 128 (DeepSpeed wants its all-gather
    # buckets aligned).
    bucket = -(-max(1, int(config.bucket_size_mb * 2**20) // 4) // 128) * 128
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": microbatches,
        "train_batch_size": micro_batch_size * microbatches * layout.dp.size,
        "gradient_clipping": config.grad_clip or 0.0,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              "overlap_comm": False, "contiguous_gradients": True},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        # bf16: fp32 master weights and fp32 gradient accumulation over microbatches, as ours.
        **({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if dtype == torch.bfloat16 else {}),
    }


def _set_launcher_env(layout: ParallelLayout) -> None:
    """DeepSpeed reads these even when the default process group exists (which it reuses); set only
    what a launcher (torchrun) did not."""
    defaults = {"RANK": dist.get_rank(), "WORLD_SIZE": dist.get_world_size(), "LOCAL_RANK": dist.get_rank(),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}
    for key, value in defaults.items():
        os.environ.setdefault(key, str(value))


def build_deepspeed_engine(chunks: list[torch.nn.Module], layout: ParallelLayout,
                           config: OptimizerConfig = OptimizerConfig(), zero_stage: int = 1, microbatches: int = 1,
                           micro_batch_size: int = 1, extra_config: dict | None = None):
    """A DeepSpeed engine training this rank's model (one chunk from `build_model_chunks`, pp = 1) with
    AdamW (config.lr/betas/eps/weight_decay, our decay groups), clipping at config.grad_clip, ZeRO stage
    0, 1 or 2, and gradient accumulation over `microbatches`. `config.zero1` is ignored (zero_stage
    decides); `extra_config` is merged into DeepSpeed's config (dict values key by key)."""
    check_supported(chunks, layout, zero_stage)
    deepspeed = import_deepspeed()
    _set_launcher_env(layout)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # reuses the initialised default group
    model = chunks[0]
    handles = prepare_parameters(model, layout)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps)
    dtype = next(model.parameters()).dtype
    ds_config = deepspeed_config(layout, config, zero_stage, microbatches, micro_batch_size, dtype)
    for key, value in (extra_config or {}).items():  # one level deep: extra "zero_optimization" keys add to ours
        ds_config[key] = {**ds_config[key], **value} if isinstance(value, dict) and isinstance(
            ds_config.get(key), dict) else value
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           mpu=LayoutMPU(layout))
    engine.megatron_lite_hooks = handles  # keep the gradient hooks with the engine
    return engine


def deepspeed_train_step(engine, tokens: torch.Tensor, targets: torch.Tensor, layout: ParallelLayout,
                         microbatches: int) -> float:
    """One optimizer step on this rank's batch (forward/backward per microbatch, DeepSpeed accumulates,
    reduces over DP and steps at the last one); returns the mean loss over the valid targets of the
    global batch, and takes the gradients of it, by the same rule as `train_step` (see
    `step_loss_divisor`)."""
    if engine.gradient_accumulation_steps() != microbatches:
        raise ValueError(f"the engine accumulates over {engine.gradient_accumulation_steps()} microbatches, "
                         f"the step was given microbatches={microbatches}")
    model = engine.module
    divisor = step_loss_divisor(targets, layout.dp, layout.device)
    loss_sum = torch.zeros((), device=layout.device)
    for token_mb, target_mb in zip(split_microbatches(tokens, microbatches), split_microbatches(targets, microbatches)):
        logits = engine(token_mb.to(layout.device))
        loss = model.loss(logits, target_mb.to(layout.device)).sum() / divisor
        auxiliary = model.auxiliary_loss()  # MoE balancing/z losses, per micro batch as in the executor
        objective = loss if auxiliary is None else loss + auxiliary / microbatches
        # The divisor already spans all microbatches (and DP ranks, whose average DeepSpeed takes as the
        # divisor expects): no further division by the accumulation steps.
        engine.backward(objective, scale_wrt_gas=False)
        engine.step()  # an update only after the last microbatch
        loss_sum += loss.detach()
    return comm.all_reduce(loss_sum, layout.dp, op="avg").item()


def deepspeed_step_stats(engine) -> dict:
    """The last step's global gradient norm (before clipping; None where DeepSpeed keeps none: stage 0
    with a torch optimizer, which clips all the same) and whether DeepSpeed skipped the update."""
    norm = engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        norm = norm.item()
    return {"grad_norm": norm, "skipped": not getattr(engine, "_step_applied", True)}


def set_lr(engine, lr: float) -> None:
    """Learning rate of every parameter group (the trainer's schedule calls this before each step)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
