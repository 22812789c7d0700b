"""One decoder-only transformer config covering the GPT-2 family and the LLaMA family."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megatron_lite.parallel.layout import ParallelSizes

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")


ROPE_SCALING_TYPES = ("llama3",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (Hugging Face `rope_type: llama3`): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, shorter than
    .. / high_freq_factor kept, those between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"model.rope_scaling.rope_type={self.rope_type!r} is not one of {ROPE_SCALING_TYPES}")
        if not self.factor >= 1.0 or not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"model.rope_scaling needs factor >= 1 and 0 < low_freq_factor < high_freq_factor, got "
                             f"factor={self.factor}, low_freq_factor={self.low_freq_factor}, high_freq_factor="
                             f"{self.high_freq_factor}")
        if self.original_max_position_embeddings < 1:
            raise ValueError("model.rope_scaling.original_max_position_embeddings="
                             f"{self.original_max_position_embeddings} must be >= 1")


ROUTER_ORDERS = ("softmax_topk", "topk_softmax")
AUX_LOSS_SCOPES = ("micro_batch", "global_batch")
DROP_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward layers.

    layers: the MoE layer indices (null: every `layer_freq`-th layer, counting from the last of each
    group, so layer_freq=1 makes every layer MoE and 2 every second one). router_order: softmax over
    all experts then top-k (Mixtral, OLMoE) or top-k logits then softmax over them; normalize_topk
    rescales the k weights to sum to 1 (Mixtral, Qwen-MoE with norm_topk_prob). aux_loss_coeff: the
    Switch/GShard balancing loss E * sum_e f_e * P_e, z_loss_coeff: the router z-loss mean(lse^2), both
    over the tokens of one micro batch (scope "micro_batch": micro_batch_size sequences, whatever the
    layout), or of the whole global batch (scope "global_batch": exact for any split, which needs every
    forward of a step before its first backward: schedule gpipe, or one micro batch).
    capacity_factor: null: dropless; else each expert takes at most ceil(factor * tokens * top_k / E)
    of the assignments of one rank's micro batch (the rest are dropped: their output is 0), the ones
    with the highest router weight (drop_policy "probs") or the earliest tokens ("position"). As in
    Megatron and DeepSpeed, what is dropped depends on the tokens a rank routes at once (its micro batch
    and, under SP, its sequence slice). bias_update_rate: auxiliary-loss-free balancing (DeepSeek-V3): a
    per-expert bias added to the scores for the top-k choice only, moved by this rate towards balance
    once per step from the global batch's token counts (0: off)."""

    num_experts: int
    top_k: int = 2
    expert_ffn_hidden_size: int | None = None  # null: the model's ffn_hidden_size
    num_shared_experts: int = 0  # always-on experts of expert_ffn_hidden_size each (Qwen-MoE, DeepSeek)
    layer_freq: int = 1
    layers: tuple[int, ...] | None = None
    router_order: str = "softmax_topk"
    normalize_topk: bool = False
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    aux_loss_scope: str = "micro_batch"
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    bias_update_rate: float = 0.0
    grouped_mm: bool = True  # torch._grouped_mm for the experts (a per-expert loop otherwise)

    def __post_init__(self):
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.num_experts < 1:
            raise ValueError(f"model.moe.num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts="
                             f"{self.num_experts}")
        for name in ("expert_ffn_hidden_size",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"model.moe.{name}={getattr(self, name)} must be >= 1 (or null)")
        if self.num_shared_experts < 0 or self.layer_freq < 1:
            raise ValueError(f"model.moe.num_shared_experts={self.num_shared_experts} must be >= 0 and "
                             f"model.moe.layer_freq={self.layer_freq} >= 1")
        if self.router_order not in ROUTER_ORDERS:
            raise ValueError(f"model.moe.router_order={self.router_order!r} is not one of {ROUTER_ORDERS}")
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"model.moe.aux_loss_scope={self.aux_loss_scope!r} is not one of {AUX_LOSS_SCOPES}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"model.moe.capacity_factor={self.capacity_factor} must be > 0 (e.g. 1.25), or null "
                             "for dropless routing")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"model.moe.drop_policy={self.drop_policy!r} is not one of {DROP_POLICIES}")
        if not self.bias_update_rate >= 0:
            raise ValueError(f"model.moe.bias_update_rate={self.bias_update_rate} must be >= 0 (e.g. 0.001; 0: off)")
        if self.aux_loss_coeff < 0 or self.z_loss_coeff < 0:
            raise ValueError(f"model.moe.aux_loss_coeff={self.aux_loss_coeff} and z_loss_coeff={self.z_loss_coeff} "
                             "must be >= 0")

    def moe_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"model.moe.layers={list(self.layers)} names layer(s) {bad} outside the model's "
                                 f"{num_layers} layers (0..{num_layers - 1})")
            return tuple(sorted(set(self.layers)))
        return tuple(i for i in range(num_layers) if i % self.layer_freq == self.layer_freq - 1)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: multi-head attention (as many KV heads as query heads)
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    max_seq_len: int = 1024
    norm: str = "layernorm"
    activation: str = "gelu"
    position: str = "learned"
    tie_embeddings: bool = True
    bias: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # Llama 3.1/3.2 long-context frequencies; null: plain RoPE
    init_std: float = 0.02
    vocab_pad_multiple: int = 1  # vocabulary padded to a multiple of tp * this (Megatron uses 128)
    dropout: float = 0.0  # on attention probabilities and on each residual branch
    moe: MoEConfig | None = None  # mixture-of-experts feed-forward layers; null: dense

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from a YAML mapping or dataclasses.asdict
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        for name in ("num_kv_heads", "ffn_hidden_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1, or null for the default "
                                 f"({'as many as model.num_heads' if name == 'num_kv_heads' else '4 x hidden_size'})")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"model.{name}={value} must be a finite number > 0")
        if self.vocab_pad_multiple < 1:
            raise ValueError(f"model.vocab_pad_multiple={self.vocab_pad_multiple} must be >= 1 (1: no padding)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}; "
                "grouped-query attention needs whole groups of query heads per KV head"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got {self.head_dim}")
        if self.moe is not None:
            self.moe.moe_layers(self.num_layers)
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(f"model.rope_scaling is set but model.position={self.position!r}; it needs rope")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return 4 * self.hidden_size if self.ffn_hidden_size is None else self.ffn_hidden_size

    @property
    def expert_ffn_size(self) -> int:
        return self.moe.expert_ffn_hidden_size or self.ffn_size

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.moe_layers(self.num_layers)

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


RECOMPUTE = ("none", "full", "selective")


@dataclass(frozen=True)
class BuildOptions:
    """How this run builds and executes the model; none of it changes what the model computes.

    sequence_parallel: activations between TP blocks split along the sequence over TP ranks.
    recompute: "full" recomputes each layer in backward, "selective" only the attention core.
    dtype: parameter and compute dtype (bf16/fp16 keep fp32 master weights in the optimizer).
    """

    sequence_parallel: bool = False
    recompute: str = "none"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} is not one of {RECOMPUTE}")


def gpt2_config(**overrides) -> ModelConfig:
    base = dict(norm="layernorm", activation="gelu", position="learned", tie_embeddings=True, bias=True)
    return ModelConfig(**{**base, **overrides})


def llama_config(**overrides) -> ModelConfig:
    base = dict(norm="rmsnorm", activation="swiglu", position="rope", tie_embeddings=False, bias=False,
                norm_eps=1e-5)
    return ModelConfig(**{**base, **overrides})


def check_model_fits_layout(cfg: ModelConfig, sizes: ParallelSizes) -> None:
    """Raise ValueError (naming the value and the fix) when the model cannot be split over the layout."""
    tp, pp = sizes.tp, sizes.pp
    if cfg.num_heads % tp:
        raise ValueError(
            f"model.num_heads={cfg.num_heads} is not divisible by parallel.tp={tp}; "
            f"choose tp among {_divisors(cfg.num_heads)}"
        )
    if cfg.kv_heads % tp and tp % cfg.kv_heads:
        raise ValueError(
            f"parallel.tp={tp} neither divides nor is a multiple of model.num_kv_heads={cfg.kv_heads}; "
            f"KV heads are split when tp divides them and replicated when tp is a multiple of them"
        )
    if cfg.ffn_size % tp:
        raise ValueError(f"model.ffn_hidden_size={cfg.ffn_size} is not divisible by parallel.tp={tp}")
    if cfg.moe is not None and cfg.moe.num_experts % sizes.ep:
        raise ValueError(f"model.moe.num_experts={cfg.moe.num_experts} is not divisible by parallel.ep={sizes.ep}; "
                         f"choose ep among {_divisors(cfg.moe.num_experts)} (and dividing parallel.dp)")
    if cfg.moe is None and sizes.ep > 1:
        raise ValueError(f"parallel.ep={sizes.ep} needs a mixture-of-experts model (model.moe); use ep=1")
    if cfg.num_layers < pp:
        raise ValueError(
            f"model.num_layers={cfg.num_layers} is smaller than parallel.pp={pp}: every pipeline stage "
            f"needs at least one layer; use pp <= {cfg.num_layers}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
