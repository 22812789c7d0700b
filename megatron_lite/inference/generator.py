"""The generation API: `Generator(cfg).generate(prompts, max_new_tokens=..., temperature=...)`.

Single-process by default (the serial layout). Under a multi-rank layout every rank builds its own
model stage (TP/PP shards of the same weights) and calls `generate` with the same prompts: the
data-parallel replicas serve disjoint, contiguous slices of the requests and the results are
gathered, so every rank returns all of them. Weights come from a megatron-lite checkpoint
(`checkpoint.resume_from`, any layout it was saved with), a Hugging Face directory (`model.path`), or
the serial initialisation from `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from megatron_lite.inference.engine import Engine, EngineOutput
from megatron_lite.inference.sampling import SamplingParams
from megatron_lite.models.config import ModelConfig, check_model_fits_layout
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (ending with EOS where it stopped there)
    texts: list[str] | None  # decoded, for prompts given as text
    ttft_s: float  # time to first token (mean over this replica's groups)
    tpot_s: float  # time per output token after the first, per sequence (mean over this replica's groups,
    # each from its first tokens to its last: what its requests saw)
    tokens_per_s: float  # generated tokens of every replica per second of the slowest replica
    kv_cache_bytes: int  # this rank's KV caches
    logits: list | None = None  # per prompt and step [vocab] fp32, with keep_logits, on the last stage


class Generator:
    """cfg: a RunConfig (scripts' config: model, layout, dtype, checkpoint, tokenizer) or a bare
    ModelConfig. layout: this rank's; default the single process. chunks: this rank's model stage,
    already loaded (skips building and loading). tp_overlap: hide TP all-reduces behind the compute of
    another micro-batch (see Engine)."""

    def __init__(self, cfg, layout: ParallelLayout | None = None, chunks=None, seed: int | None = None,
                 tp_overlap: bool = False):
        self.layout = layout or ParallelLayout.serial()
        run = None if isinstance(cfg, ModelConfig) else cfg
        self.model_cfg = cfg if run is None else run.model_config()
        self.tokenizer = None
        if run is not None:
            from megatron_lite.data.tokenizer import build_tokenizer

            self.tokenizer = build_tokenizer(run.data.tokenizer, run.data.tokenizer_path)
        check_model_fits_layout(self.model_cfg, self.layout.sizes)
        if chunks is None:
            chunks = self._build(run, seed)
        self.chunks = chunks
        self.engine = Engine(chunks, self.layout, tp_overlap=tp_overlap)

    def _build(self, run, seed: int | None):
        if run is None:
            return build_model_chunks(self.model_cfg, self.layout, seed or 0)
        if run.parallel.virtual_stages != 1:
            raise ValueError("generation runs one model chunk per pipeline rank: set parallel.virtual_stages=1 "
                             "(a checkpoint saved with any layout loads)")
        options = replace(run.build_options(), sequence_parallel=False, recompute="none")
        from_hf = run.model.path is not None
        resume = run.checkpoint.resume_from
        if from_hf and resume:
            raise ValueError("give either model.path (a Hugging Face directory) or checkpoint.resume_from "
                             "(a megatron-lite checkpoint), not both")
        chunks = build_model_chunks(self.model_cfg, self.layout, run.seed if seed is None else seed,
                                    layers_per_stage=run.parallel.layers_per_stage, options=options,
                                    initialize=not (from_hf or resume))
        if from_hf:
            from megatron_lite.interop.load import load_hf_weights

            load_hf_weights(chunks, run.model.path, self.model_cfg)
        elif resume:
            from megatron_lite.checkpoint import load_checkpoint

            load_checkpoint(resume, chunks, None, self.layout, step=run.checkpoint.step)
        return chunks

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eod_id if self.tokenizer is not None else None

    def encode(self, prompts) -> tuple[list[list[int]], bool]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list (of strings or of token-id lists), got one string")
        texts = bool(prompts) and all(isinstance(p, str) for p in prompts)
        if texts:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: build the Generator from a run config, or give "
                                 "token ids")
            return [self.tokenizer.encode(p) for p in prompts], True
        return [list(map(int, p)) for p in prompts], False

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int | None = -1, groups: int = 1,
                 max_length: int | None = None, keep_logits: bool = False,
                 on_tokens: Callable[[list[int], list[int]], None] | None = None) -> GenerationResult:
        """prompts: strings (with a tokenizer) or token-id lists. eos_id: -1 the tokenizer's end of
        document (none without a tokenizer), None never stop early. groups: request groups in flight
        together on this replica (the pipeline rotates them through its stages)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids, texts = self.encode(prompts)
        eos = self.eos_id if eos_id == -1 else eos_id
        dp = self.layout.dp
        if not ids:
            raise ValueError("no prompts: give at least one")
        if len(ids) < dp.size:
            raise ValueError(f"{len(ids)} prompts for {dp.size} data-parallel replicas: give at least one each")
        lo, hi = (round(i * len(ids) / dp.size) for i in (dp.rank, dp.rank + 1))
        # The same number of groups on every replica (MoE under EP runs the replicas' steps together).
        out = self.engine.generate(ids[lo:hi], max_new_tokens, params, eos, groups=min(groups, len(ids) // dp.size),
                                   max_length=max_length, request_ids=range(lo, hi), keep_logits=keep_logits,
                                   on_tokens=None if on_tokens is None else
                                   (lambda rows, toks: on_tokens([lo + i for i in rows], toks)))
        return self._result(out, texts)

    def _result(self, out: EngineOutput, texts: bool) -> GenerationResult:
        # Logits too (on the last stage, if kept), so that result.logits[i] is the logits of result.tokens[i].
        kept = None if out.logits is None else [[step.cpu() for step in request] for request in out.logits]
        parts = comm.all_gather_object((out.tokens, out.total_s, kept), self.layout.dp)
        tokens = [t for part, _, _ in parts for t in part]
        logits = None if kept is None else [request for _, _, part in parts for request in part]
        slowest = max(total for _, total, _ in parts)
        produced = sum(len(t) for t in tokens)
        decoded = [self.tokenizer.decode([i for i in t if i != self.eos_id]) for t in tokens] if texts else None
        return GenerationResult(tokens, decoded, out.ttft_s, out.tpot_s,
                                produced / slowest if slowest > 0 else 0.0, out.kv_cache_bytes, logits)
