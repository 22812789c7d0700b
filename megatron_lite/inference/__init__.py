"""Serving the model: KV caches, prefill/decode over TP x PP stages, sampling, the Generator API."""

from megatron_lite.inference.generator import GenerationResult, Generator
from megatron_lite.inference.sampling import SamplingParams

__all__ = ["GenerationResult", "Generator", "SamplingParams"]
