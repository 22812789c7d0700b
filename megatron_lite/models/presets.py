"""Named model configurations (the tiny ones run the tests and the CPU demo)."""

from __future__ import annotations

from megatron_lite.models.config import ModelConfig, gpt2_config, llama_config

BYTE_VOCAB = 257  # 256 byte values + end-of-document

PRESETS: dict[str, ModelConfig] = {
    "gpt2_tiny": gpt2_config(vocab_size=BYTE_VOCAB, hidden_size=128, num_layers=4, num_heads=4, max_seq_len=256),
    "llama_tiny": llama_config(vocab_size=BYTE_VOCAB, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                               ffn_hidden_size=352, max_seq_len=256),
    "gpt2_124m": gpt2_config(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, max_seq_len=1024,
                             vocab_pad_multiple=128),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].with_(**overrides) if overrides else PRESETS[name]
