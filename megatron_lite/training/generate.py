"""A short text sample from the trained model, run through the same pipeline as training."""

from __future__ import annotations

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.pipeline.executor import PipelineExecutor
from megatron_lite.pipeline.schedules import PipelinePlan


@torch.no_grad()
def sample_tokens(chunks, plan: PipelinePlan, layout: ParallelLayout, prompt: list[int], num_tokens: int,
                  seed: int, temperature: float = 0.8, top_k: int = 20) -> list[int]:
    """Extend `prompt` (exactly one training window long) by `num_tokens` sampled tokens.

    The window slides so every forward has the training shape (static pipeline shapes, and sequence
    parallelism keeps its divisibility). Every microbatch carries the same window because the
    schedule needs `plan.num_microbatches` of them. The last stage gathers the vocabulary over TP
    and samples; TP ranks there agree because they share the logits and the generator seed; one
    broadcast over the pipeline hands the token to the other stages.
    """
    for chunk in chunks:
        chunk.eval()
    cfg = chunks[0].cfg
    window = torch.tensor(prompt, dtype=torch.long, device=layout.device).unsqueeze(0)
    shape = chunks[0].activation_shape(1, window.shape[1])
    executor = PipelineExecutor(plan, chunks, layout, shape, chunks[0].dtype)
    generator = torch.Generator().manual_seed(seed)
    produced = []
    for _ in range(num_tokens):
        executor.run([window] * plan.num_microbatches, None, forward_only=True)
        token = torch.zeros(1, dtype=torch.long, device=layout.device)
        if 0 in executor.outputs:
            logits = comm.all_gather(executor.outputs[0][0, -1].float(), layout.tp, dim=-1)[: cfg.vocab_size]
            values, indices = torch.topk(logits / temperature, min(top_k, cfg.vocab_size))
            choice = torch.multinomial(torch.softmax(values, dim=-1).cpu(), 1, generator=generator)
            token[0] = indices[choice.to(indices.device)]
        comm.broadcast(token, layout.pp, src_group_rank=plan.location(plan.num_virtual_stages - 1)[0])
        produced.append(int(token))
        window = torch.cat([window[:, 1:], token.view(1, 1)], dim=1)
    for chunk in chunks:
        chunk.train()
    return produced
