"""Throughput, FLOPs and MFU of a training step, and the memory of a rank.

FLOP convention (the one Megatron-LM's papers and `num_floating_point_operations` use):

* a matmul of [m, k] x [k, n] costs 2*m*k*n FLOPs; element-wise work (norms, activations, softmax,
  RoPE, biases, dropout, the loss) and the embedding lookup are not counted;
* backward costs twice the forward (gradient w.r.t. the input and w.r.t. the weight), so a
  training step is 3x the forward;
* attention scores q k^T and the probability-weighted values p v are counted over the **full**
  s x s matrix, 2 * 2 * s * h FLOPs per token per layer in forward, even though the mask is causal.
  That is Megatron's paper formula, what `torch.utils.flop_counter` counts for attention, and what a
  dense attention kernel really multiplies; halving it for causality (as some papers do) would
  make MFU of identical runs disagree between tools;
* the logits matmul uses the padded vocabulary (the rows really multiplied).

`recompute` adds what is run again in backward: "full" one more forward of every transformer layer
(not of the embedding or the logits), "selective" one more forward of the attention core. Counted
with recomputation the result is *hardware* FLOPs (for HFU); MFU uses `recompute="none"`.
PyTorch's non-reentrant checkpoint stops recomputing once the last saved tensor is regenerated, so
the FLOPs it really executes are lower by the last matmul of each checkpointed region (down_proj for
"full", p @ v for "selective"); the convention here counts the whole region, as Megatron does.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from megatron_lite.layers.embedding import padded_vocab_size
from megatron_lite.models.config import RECOMPUTE, ModelConfig

GIB = 1024**3


def _layer_forward_flops(cfg: ModelConfig, seq_length: int, layer: int = 0) -> tuple[float, float]:
    """(dense matmuls, attention core) forward FLOPs per token of one transformer layer. An MoE layer
    counts what a token really goes through (active parameters): the router, its top_k experts and the
    shared experts."""
    h, kv_width = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    projections = 2 * h * (h + 2 * kv_width + h)  # q, k, v (GQA: kv_heads * head_dim wide), o
    matrices = 3 if cfg.activation == "swiglu" else 2  # up (+ gate), down
    if cfg.is_moe_layer(layer):
        moe = cfg.moe
        mlp = 2 * h * moe.num_experts + 2 * h * cfg.expert_ffn_size * matrices * (moe.top_k + moe.num_shared_experts)
    else:
        mlp = 2 * h * cfg.ffn_size * matrices
    attention_core = 2 * 2 * seq_length * h  # q k^T and p v over all query heads, full s x s matrix
    return projections + mlp, attention_core


def model_flops_per_token(cfg: ModelConfig, seq_length: int, recompute: str = "none", *,
                          tp_size: int = 1) -> float:
    """Training FLOPs (forward + backward) per token of one step; see the module docstring.

    `tp_size` only sets the vocabulary padding (to a multiple of tp_size * cfg.vocab_pad_multiple).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {RECOMPUTE}")
    per_layer = [_layer_forward_flops(cfg, seq_length, layer) for layer in range(cfg.num_layers)]
    core = per_layer[0][1]
    logits = 2 * cfg.hidden_size * padded_vocab_size(cfg.vocab_size, tp_size, cfg.vocab_pad_multiple)
    layers_forward = sum(dense + attention for dense, attention in per_layer)
    extra = {"none": 0.0, "full": layers_forward, "selective": cfg.num_layers * core}[recompute]
    return 3 * (layers_forward + logits) + extra


def megatron_gpt_flops_per_token(cfg: ModelConfig, seq_length: int, *, tp_size: int = 1) -> float:
    """Megatron's closed form 72 B s L h^2 (1 + s/(6h) + V/(12 L h)) divided by the B s tokens.

    Valid for MHA with ffn = 4h and a GeLU MLP (the GPT assumptions); raises otherwise.
    """
    if cfg.kv_heads != cfg.num_heads or cfg.ffn_size != 4 * cfg.hidden_size or cfg.activation != "gelu":
        raise ValueError("Megatron's closed form assumes multi-head attention, ffn = 4h and a GeLU MLP")
    h, L, s = cfg.hidden_size, cfg.num_layers, seq_length
    V = padded_vocab_size(cfg.vocab_size, tp_size, cfg.vocab_pad_multiple)
    return 72 * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))


def host_rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc/self/statm), its peak where that is unreadable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return host_peak_rss_bytes()


def host_peak_rss_bytes() -> int:
    """The process's lifetime peak RSS (getrusage): Python, libraries and data, not just tensors; it
    cannot be reset."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def memory_metrics(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory of this rank in GiB, named for what is measured. CUDA: the caching allocator's peak
    allocated and reserved bytes since the last `reset_memory_peaks` (the log interval); CPU: the
    process's resident set size now and its lifetime peak."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "cuda_max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    return {"host_rss_gib": host_rss_bytes() / GIB, "host_peak_rss_gib": host_peak_rss_bytes() / GIB}


def reset_memory_peaks(device: torch.device | str | None = None) -> None:
    """Start a new CUDA peak window (allocated and reserved); nothing to reset on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass(frozen=True)
class StepMetrics:
    """Throughput of one global step as seen by one rank.

    tflops_per_rank is the whole job's model FLOP rate divided by the world size (the ranks share
    the step's work); mfu is that over the device's peak FLOP/s (None when the peak is unknown);
    hfu likewise with hardware FLOPs (counted with recomputation), None unless given.
    """

    step_time_s: float
    tokens_per_s: float
    tflops_per_rank: float
    mfu: float | None
    hfu: float | None

    @classmethod
    def compute(cls, step_time_s: float, tokens_per_step: int, flops_per_token: float, world_size: int,
                peak_flops_per_device: float | None = None, *,
                hardware_flops_per_token: float | None = None) -> "StepMetrics":
        if step_time_s <= 0:
            raise ValueError(f"step time must be positive, got {step_time_s}")
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        tokens_per_s = tokens_per_step / step_time_s
        flops_per_rank = tokens_per_s * flops_per_token / world_size
        known_peak = peak_flops_per_device is not None and peak_flops_per_device > 0
        mfu = flops_per_rank / peak_flops_per_device if known_peak else None
        hfu = (tokens_per_s * hardware_flops_per_token / world_size / peak_flops_per_device
               if known_peak and hardware_flops_per_token is not None else None)
        return cls(step_time_s, tokens_per_s, flops_per_rank / 1e12, mfu, hfu)

    def as_dict(self, prefix: str = "perf/") -> dict[str, float | str]:
        """Flat metrics for the logger; mfu/hfu left out when unknown."""
        out = {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_rank": self.tflops_per_rank,
            "mfu": self.mfu,
            "hfu": self.hfu,
        }
        return {prefix + key: value for key, value in out.items() if value is not None}


class StepTimer:
    """Wall-clock time of a step with `time.perf_counter`; on CUDA it synchronizes the device at both
    ends so queued kernels are counted in the step they belong to.

        timer = StepTimer(device)
        timer.start(); ...; seconds = timer.stop()      # or: with timer: ...;  timer.elapsed
    """

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.device = device
        self._start: float | None = None
        self.elapsed: float = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("StepTimer.stop() called before start()")
        self._sync()
        self.elapsed = time.perf_counter() - self._start
        self._start = None
        return self.elapsed

    def __enter__(self) -> "StepTimer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
