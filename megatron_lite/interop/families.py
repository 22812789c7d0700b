"""One declarative mapping per Hugging Face model family: config fields and tensors, both directions.

A `Rule` says how one Hugging Face tensor is made of our serial tensors: ours are concatenated along
their dim 0 (a fused tensor such as GPT-2's `c_attn` = [q; k; v]) and, for GPT-2's Conv1D layers,
transposed (HF stores [in, out]); or it is one expert of our stacked [experts, out, in] weight
(Mixtral's `experts.{e}.w1`). That is all import, export and the coverage check read:
- TP split dims and vocabulary padding are not in the table: they are our parameters' placements
  (`ShardSpec`), so a rule maps *full* tensors and any layout follows.
- RoPE: HF LLaMA checkpoints already use our rotate-half convention, so no permutation is needed
  (Meta's original `consolidated.*.pth` files would need one; they are not read here).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.models.config import MoEConfig, ModelConfig, RopeScaling, gpt2_config, llama_config


class UnsupportedModel(ValueError):
    """A Hugging Face config (model_type or option) this code cannot represent exactly."""


@dataclass(frozen=True)
class Rule:
    """HF tensor `hf` = transpose?(cat(ours, dim=0)); `ours` in the order they are concatenated. With
    `expert` set, `ours` is one stacked tensor and `hf` = transpose?(ours[expert])."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False
    expert: int | None = None


# Tensors some HF files carry that are no parameters: old GPT-2 causal-mask buffers, old LLaMA RoPE tables.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _llama_mlp_rules(cfg: ModelConfig, layer: int) -> list[Rule]:
    return [Rule(f"model.layers.{layer}.mlp.{p}.weight", (f"layers.{layer}.mlp.{p}.weight",))
            for p in ("gate_proj", "up_proj", "down_proj")]


def _mixtral_moe_rules(cfg: ModelConfig, layer: int) -> list[Rule]:
    """The router and each expert's w1 (gate), w2 (down), w3 (up) as rows of our stacked expert weights."""
    hf, ours = f"model.layers.{layer}.block_sparse_moe.", f"layers.{layer}.mlp."
    rules = [Rule(hf + "gate.weight", (ours + "router.weight",))]
    for e in range(cfg.moe.num_experts):
        rules += [Rule(hf + f"experts.{e}.{w}.weight", (ours + f"experts.{p}",), expert=e)
                  for w, p in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))]
    return rules


def _llama_rules(cfg: ModelConfig, mlp_rules=_llama_mlp_rules) -> list[Rule]:
    rules = [Rule("model.embed_tokens.weight", ("embedding.word.weight",)),
             Rule("model.norm.weight", ("head.norm.weight",))]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("head.weight",)))
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        rules += [Rule(hf + "input_layernorm.weight", (ours + "attn_norm.weight",)),
                  Rule(hf + "post_attention_layernorm.weight", (ours + "mlp_norm.weight",))]
        rules += [Rule(hf + f"self_attn.{p}.weight", (ours + f"attention.{p}.weight",))
                  for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        rules += mlp_rules(cfg, i)
    return rules


def _mixtral_rules(cfg: ModelConfig) -> list[Rule]:
    return _llama_rules(cfg, _mixtral_moe_rules)


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("transformer.wte.weight", ("embedding.word.weight",)),
             Rule("transformer.wpe.weight", ("embedding.position",)),
             Rule("transformer.ln_f.weight", ("head.norm.weight",)),
             Rule("transformer.ln_f.bias", ("head.norm.bias",))]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("head.weight",)))
    for i in range(cfg.num_layers):
        hf, ours = f"transformer.h.{i}.", f"layers.{i}."
        attention = [ours + f"attention.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        rules += [Rule(hf + f"{norm}.{w}", (ours + f"{mine}.{w}",))
                  for norm, mine in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")) for w in ("weight", "bias")]
        rules += [Rule(hf + "attn.c_attn.weight", tuple(a + ".weight" for a in attention), transpose=True),
                  Rule(hf + "attn.c_attn.bias", tuple(a + ".bias" for a in attention)),
                  Rule(hf + "attn.c_proj.weight", (ours + "attention.o_proj.weight",), transpose=True),
                  Rule(hf + "attn.c_proj.bias", (ours + "attention.o_proj.bias",)),
                  Rule(hf + "mlp.c_fc.weight", (ours + "mlp.up_proj.weight",), transpose=True),
                  Rule(hf + "mlp.c_fc.bias", (ours + "mlp.up_proj.bias",)),
                  Rule(hf + "mlp.c_proj.weight", (ours + "mlp.down_proj.weight",), transpose=True),
                  Rule(hf + "mlp.c_proj.bias", (ours + "mlp.down_proj.bias",))]
    return rules


def _require(hf: dict, key: str, allowed, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise UnsupportedModel(f"config.json {key}={value!r} is not supported (supported: "
                               f"{', '.join(map(repr, allowed))})")


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UnsupportedModel(f"config.json rope type {kind!r} is not supported (supported: 'default', 'llama3')")
    return float(theta), RopeScaling(factor=float(merged["factor"]), low_freq_factor=float(merged["low_freq_factor"]),
                                     high_freq_factor=float(merged["high_freq_factor"]),
                                     original_max_position_embeddings=int(merged["original_max_position_embeddings"]))


def _llama_config(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "attention_bias", (False,), False)
    _require(hf, "mlp_bias", (False,), False)
    _require(hf, "pretraining_tp", (1,), 1)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise UnsupportedModel(f"config.json head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads "
                               f"= {hidden // heads}; only the derived head size is supported")
    theta, scaling = _rope_from_hf(hf)
    max_seq_len = hf.get("max_position_embeddings", 2048)
    if hf.get("sliding_window") is not None:  # Mistral: full attention is exact up to the window
        max_seq_len = min(max_seq_len, int(hf["sliding_window"]))
    return llama_config(vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"],
                        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                        ffn_hidden_size=hf["intermediate_size"], max_seq_len=max_seq_len,
                        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                        init_std=float(hf.get("initializer_range", 0.02)))


def _mixtral_config(hf: dict) -> ModelConfig:
    """Mixtral: LLaMA attention, every layer a mixture of experts routed softmax -> top-k -> renormalised.
    The balancing-loss coefficient is taken over as it is; our loss is the per-layer Switch form summed
    over layers (HF's pools all layers' tokens and counts each of the k choices), so it is a starting point
    to tune, not the same number."""
    _require(hf, "router_jitter_noise", (0, 0.0), 0.0)
    moe = MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                    expert_ffn_hidden_size=hf["intermediate_size"], router_order="softmax_topk", normalize_topk=True, aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.02)), z_loss_coeff=0.0)
    return _llama_config(hf).with_(moe=moe)


def _gpt2_config(hf: dict) -> ModelConfig:
    _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    _require(hf, "scale_attn_weights", (True,), True)
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    _require(hf, "add_cross_attention", (False,), False)
    return gpt2_config(vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
                       num_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner"), max_seq_len=hf["n_positions"],
                       norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                       init_std=float(hf.get("initializer_range", 0.02)))


def _llama_hf_config(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std}


def _mixtral_hf_config(cfg: ModelConfig) -> dict:
    config = {k: v for k, v in _llama_hf_config(cfg).items() if k not in ("attention_bias", "mlp_bias")}
    config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                   "intermediate_size": cfg.expert_ffn_size, "num_local_experts": cfg.moe.num_experts,
                   "num_experts_per_tok": cfg.moe.top_k, "router_aux_loss_coef": cfg.moe.aux_loss_coeff,
                   "router_jitter_noise": 0.0})
    return config


def _gpt2_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": cfg.ffn_hidden_size, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std, "scale_attn_weights": True}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    to_model_config: object  # (HF config dict) -> ModelConfig
    to_hf_config: object  # (ModelConfig) -> HF config fields we own
    rules: object  # (ModelConfig) -> list[Rule]
    matches: object  # (ModelConfig) -> bool: our architecture is this family's


def _is_llama(c: ModelConfig) -> bool:
    return (c.norm, c.activation, c.position, c.bias) == ("rmsnorm", "swiglu", "rope", False)


def mixtral_mismatch(c: ModelConfig) -> str | None:
    """What keeps an MoE model from being a Mixtral (None: nothing)."""
    moe = c.moe
    if moe.moe_layers(c.num_layers) != tuple(range(c.num_layers)):
        return f"MoE layers {list(moe.moe_layers(c.num_layers))} (Mixtral: every layer)"
    if moe.num_shared_experts:
        return f"num_shared_experts={moe.num_shared_experts} (Mixtral: none)"
    if moe.router_order == "softmax_topk" and not moe.normalize_topk:
        return "router_order=softmax_topk without normalize_topk (Mixtral renormalises the top-k weights)"
    if moe.bias_update_rate:
        return f"bias_update_rate={moe.bias_update_rate}: a routing bias Mixtral does not have"
    if moe.capacity_factor is not None:
        return f"capacity_factor={moe.capacity_factor}: token dropping (Mixtral is dropless; set model.moe.capacity_factor=null)"
    return None


LLAMA = Family("llama", ("llama", "mistral"), _llama_config, _llama_hf_config, _llama_rules,
               lambda c: _is_llama(c) and c.moe is None)
MIXTRAL = Family("mixtral", ("mixtral",), _mixtral_config, _mixtral_hf_config, _mixtral_rules,
                 lambda c: _is_llama(c) and c.moe is not None and mixtral_mismatch(c) is None)
GPT2 = Family("gpt2", ("gpt2",), _gpt2_config, _gpt2_hf_config, _gpt2_rules,
              lambda c: (c.norm, c.activation, c.position, c.bias) == ("layernorm", "gelu", "learned", True)
              and c.rope_scaling is None and c.moe is None)
FAMILIES = (LLAMA, MIXTRAL, GPT2)


def family_of_hf(hf: dict) -> Family:
    model_type = hf.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModel(f"config.json model_type={model_type!r} is not supported (supported: {', '.join(supported)})")


def family_of(cfg: ModelConfig) -> Family:
    for family in FAMILIES:
        if family.matches(cfg):
            return family
    if cfg.moe is not None:
        reason = mixtral_mismatch(cfg) if _is_llama(cfg) else "a GPT-2-style architecture"
        raise UnsupportedModel(f"this mixture of experts has no Hugging Face family: {reason}; exportable are "
                               "Mixtral-style models (LLaMA attention, every layer MoE, no shared experts, softmax "
                               "then top-k renormalised, no routing bias, dropless)")
    raise UnsupportedModel(f"no Hugging Face family has this architecture (norm={cfg.norm}, activation={cfg.activation}, "
                           f"position={cfg.position}, bias={cfg.bias}): exportable are LLaMA (rmsnorm, swiglu, rope, "
                           "no bias) and GPT-2 (layernorm, gelu, learned, bias)")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our config for a Hugging Face config.json; UnsupportedModel naming any option we cannot represent."""
    family = family_of_hf(hf)
    try:
        return family.to_model_config(hf)
    except KeyError as err:
        raise UnsupportedModel(f"config.json of a {hf.get('model_type')} model has no {err.args[0]!r}") from None
