"""Prefill and decode over this rank's model stage, under TP x PP, with m groups of requests in flight.

Every unit of work is (step k, group g): step 0 is the prefill of the group's prompts (the whole
prompt, causal), step k >= 1 the decode of the token step k-1 chose. Pipeline ranks run in ticks; unit
(k, g) enters stage 0 at tick k*c + g, with c = max(m, p), and stage r at tick k*c + g + r. With m >= p
groups every stage works at every tick, each on another group (the groups rotate through the stages);
with m = 1 one group walks the stages one after the other. At the end of a tick the hidden states move
one stage on (one P2P per stage boundary, through comm.py), and the last stage sends the tokens of the
group it finished to every other stage, all in one batch of transfers: stage 0 embeds them at tick
k*c + g + c, which c >= p makes after they are known.

The last stage gathers the vocabulary over TP and samples; its TP ranks agree because they hold the
same logits and per-request generators (sampling.py). Every rank keeps the same bookkeeping (tokens,
which sequences ended), so all of them take the same decisions without further messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_lite.inference.kv_cache import KVCache
from megatron_lite.inference.sampling import SamplingParams, request_generators, sample
from megatron_lite.models.overlap import overlapped_forward
from megatron_lite.parallel import comm
from megatron_lite.parallel.layout import ParallelLayout

ACTIVATION_TAG, TOKEN_TAG = 0, 1


@dataclass
class Group:
    """A group of requests that travel through the pipeline together, with their caches on this stage."""

    ids: list[int]  # request indices
    prompts: list[list[int]]
    cache: KVCache
    generators: list[torch.Generator] | None
    tokens: list[list[int]] = field(init=False)  # generated, per request (up to and with EOS)
    done: list[bool] = field(init=False)
    logits: list[list[torch.Tensor]] = field(init=False)  # per request and step (last stage, if kept)
    finished_at: float = float("inf")  # the step from which every request of the group has ended
    first_token_s: float | None = None
    last_token_s: float | None = None
    last_step: int = 0  # the step of the group's latest tokens (0: the prefill's)
    last_tokens: list[int] = field(default_factory=list)  # the tokens the next decode step embeds

    def __post_init__(self):
        n = len(self.ids)
        self.tokens, self.done, self.logits = [[] for _ in range(n)], [False] * n, [[] for _ in range(n)]
        self.lengths = torch.tensor([len(p) for p in self.prompts])  # prompt lengths (host)
        self.aligned = len(set(map(len, self.prompts))) == 1  # equal lengths: attention needs no mask


@dataclass
class EngineOutput:
    tokens: list[list[int]]  # per request, in request order
    logits: list[list[torch.Tensor]] | None  # per request and step, [vocab] fp32 (last stage only, if kept)
    ttft_s: float  # mean over groups: start to the group's first tokens
    total_s: float
    tpot_s: float  # mean over groups that decoded: from their first tokens to their last, per step
    kv_cache_bytes: int  # this rank's caches


def check_requests(prompts: list[list[int]], max_new_tokens: int, max_length: int, vocab_size: int) -> None:
    """Clear errors for requests that cannot run, before any cache is allocated."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not prompts:
        raise ValueError("no prompts: give at least one")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")
        if len(prompt) > max_length:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, longer than the maximum length {max_length}")
        if len(prompt) + max_new_tokens > max_length:
            raise ValueError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} = "
                             f"{len(prompt) + max_new_tokens} overflows the KV cache of {max_length} positions; "
                             "lower max_new_tokens or raise the maximum length")


def unit_at(tick: int, rank: int, groups: int, stages: int, steps: int, finished_at=None) -> tuple[int, int] | None:
    """(step k, group g) that pipeline rank `rank` works on at `tick`, or None: unit (k, g) enters stage 0
    at tick k*c + g, c = max(groups, stages), and stage r r ticks later; `finished_at[g]`: the step from
    which group g has nothing left to do."""
    j = tick - rank
    if j < 0:
        return None
    k, g = divmod(j, max(groups, stages))
    if g >= groups or k >= steps or (finished_at is not None and k >= finished_at[g]):
        return None
    return k, g


def schedule_ticks(groups: int, stages: int, steps: int) -> int:
    """Ticks until the last stage has finished every group's last step (no request ending early)."""
    return (steps - 1) * max(groups, stages) + groups + stages - 1


class Engine:
    """Generation over this rank's model chunk (one per pipeline rank) and its layout."""

    def __init__(self, chunks, layout: ParallelLayout, tp_overlap: bool = False):
        """tp_overlap: under TP, cut each forward's batch in two micro-batches whose TP all-reduces run
        while the other computes (models/overlap.py); same results."""
        if len(chunks) != 1:
            raise ValueError(f"generation runs one model chunk per pipeline rank, got {len(chunks)} "
                             "(parallel.virtual_stages must be 1)")
        self.stage, self.layout = chunks[0], layout
        self.cfg = self.stage.cfg
        # MoE layers under EP exchange tokens with the other replicas of the EP group at every forward: those
        # replicas run every step, all of them, even for requests that have ended (no early stop).
        self.lockstep = layout.group("ep").size > 1 and self.cfg.moe is not None
        # The overlap cuts a batch in two only when it has two rows; replicas with different batch sizes
        # would then run different numbers of EP exchanges: never under lockstep.
        self.tp_overlap = tp_overlap and layout.tp.size > 1 and not self.lockstep
        self._p2p_started = False
        if self.stage.options.sequence_parallel and layout.tp.size > 1:
            raise ValueError("generation does not run with sequence parallelism; set parallel.sequence_parallel=false")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 eos_id: int | None = None, groups: int = 1, max_length: int | None = None, request_ids=None,
                 keep_logits: bool = False, on_tokens: Callable[[list[int], list[int]], None] | None = None
                 ) -> EngineOutput:
        """Generate up to `max_new_tokens` per prompt (stopping a request at `eos_id`), the prompts split
        into `groups` groups that are in flight together. `max_length`: KV-cache positions per request
        (None: the longest prompt + max_new_tokens; at most model.max_seq_len). `request_ids` (default
        0..n-1) seed sampling. `on_tokens(request ids, tokens)` hears each step's new tokens (of requests
        still running)."""
        if max_length is not None and max_length > self.cfg.max_seq_len:
            raise ValueError(f"max_length={max_length} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        check_requests(prompts, max_new_tokens, max_length or self.cfg.max_seq_len, self.cfg.vocab_size)
        if max_length is None:  # the smallest cache these requests fit in (not a 128k one per sequence)
            max_length = max(map(len, prompts)) + max_new_tokens
        if not isinstance(groups, int) or not 1 <= groups <= len(prompts):
            raise ValueError(f"groups={groups!r} must be between 1 and the number of prompts ({len(prompts)})")
        was_training = self.stage.training
        self.stage.eval()
        try:
            return self._run(prompts, max_new_tokens, params, eos_id, groups, max_length,
                             list(range(len(prompts))) if request_ids is None else list(request_ids),
                             keep_logits, on_tokens)
        finally:
            self.stage.train(was_training)

    def _groups(self, prompts, m, max_length, params, request_ids) -> list[Group]:
        bounds = [round(i * len(prompts) / m) for i in range(m + 1)]
        out = []
        for g in range(m):
            rows = list(range(bounds[g], bounds[g + 1]))
            cache = KVCache.for_stage(self.stage, len(rows), max_length)
            ids = [request_ids[i] for i in rows]
            out.append(Group(rows, [prompts[i] for i in rows], cache, request_generators(params, ids)))
        return out

    def _run(self, prompts, max_new_tokens, params, eos_id, m, max_length, request_ids, keep_logits, on_tokens):
        layout, p, r = self.layout, self.layout.pp.size, self.layout.pp.rank
        device, dtype = layout.device, self.stage.dtype
        groups = self._groups(prompts, m, max_length, params, request_ids)
        if p > 1 and not self._p2p_started:
            # NCCL wants every rank of a group in its first batched P2P call; at tick 0 only the first two
            # stages transfer. One barrier first makes the later ticks' partial calls safe.
            comm.barrier()
            self._p2p_started = True
        start = time.perf_counter()

        def unit(tick: int, rank: int):
            finished = None if self.lockstep else [g.finished_at for g in groups]
            return unit_at(tick, rank, m, p, max_new_tokens, finished)

        def input_shape(k, g):
            group = groups[g]
            return (len(group.ids), int(group.lengths.max()) if k == 0 else 1, self.cfg.hidden_size)

        received = None
        tick = 0
        running = (lambda: True) if self.lockstep else (lambda: any(g.finished_at == float("inf") for g in groups))
        while running() and tick < schedule_ticks(m, p, max_new_tokens):
            mine = unit(tick, r)
            sending = mine is not None and r < p - 1
            receiving = r > 0 and unit(tick, r - 1) is not None
            output = self._compute(groups, mine, received, device) if mine is not None else None
            last = unit(tick, p - 1)
            tokens = None
            if last is not None:  # the group the last stage finished: its tokens, sampled there
                b = len(groups[last[1]].ids)
                tokens = (self._sample(groups[last[1]], params, output, keep_logits) if r == p - 1
                          else torch.empty(b, dtype=torch.long, device=device))
            # One batch of transfers per tick: hidden states one stage on, the tokens from the last stage
            # to every other (at most one message per ordered pair of ranks, so tags and order never clash).
            ops = []
            if sending:
                ops.append(comm.P2POp(True, output.contiguous(), r + 1, ACTIVATION_TAG))
            if receiving:
                received = torch.empty(input_shape(*unit(tick, r - 1)), dtype=dtype, device=device)
                ops.append(comm.P2POp(False, received, r - 1, ACTIVATION_TAG))
            if tokens is not None and p > 1:
                ops += ([comm.P2POp(True, tokens, peer, TOKEN_TAG) for peer in range(p - 1)] if r == p - 1
                        else [comm.P2POp(False, tokens, p - 1, TOKEN_TAG)])
            for work in comm.start_p2p(ops, layout.pp):
                work.wait()
            if tokens is not None:
                self._record(groups[last[1]], last[0], tokens.tolist(), eos_id, start, on_tokens)
            tick += 1
        total = time.perf_counter() - start
        tokens, logits = [None] * len(prompts), [None] * len(prompts)
        for group in groups:
            for row, generated, kept in zip(group.ids, group.tokens, group.logits):
                tokens[row], logits[row] = generated, kept
        decoded = [(g.last_token_s - g.first_token_s) / g.last_step for g in groups if g.last_step > 0]
        return EngineOutput(tokens, logits if keep_logits and r == p - 1 else None,
                            sum(g.first_token_s for g in groups) / m, total,
                            sum(decoded) / len(decoded) if decoded else 0.0, sum(g.cache.nbytes for g in groups))

    def _compute(self, groups, unit, received, device):
        """This stage's forward of unit (k, g): hidden states out, or [b, vocab slice] logits on the last stage."""
        k, g = unit
        group = groups[g]
        b = len(group.ids)
        if k == 0:
            width = used = int(group.lengths.max())
            positions, logit_rows = torch.arange(width, device=device).expand(b, width), (group.lengths - 1).to(device)
            if self.stage.embedding is not None:
                received = torch.tensor([q + [0] * (width - len(q)) for q in group.prompts], device=device)
        else:
            positions, logit_rows = (group.lengths + k - 1).to(device)[:, None], None
            used = int(group.lengths.max()) + k  # known here: no device sync to find it
            if self.stage.embedding is not None:
                received = torch.tensor(group.last_tokens, device=device)[:, None]
        aligned = group.aligned
        if not self.tp_overlap or b < 2:
            return self.stage(received, cache=group.cache.step(positions, logit_rows, used, aligned))
        parts = [group.cache.rows(lo, hi).step(positions[lo:hi], None if logit_rows is None else logit_rows[lo:hi],
                                               used, aligned) for lo, hi in ((0, b // 2), (b // 2, b))]
        return overlapped_forward(self.stage, received, parts)

    def _sample(self, group: Group, params: SamplingParams, local_logits: torch.Tensor, keep: bool) -> torch.Tensor:
        logits = comm.all_gather(local_logits[:, -1].float().contiguous(), self.layout.tp, dim=-1)
        logits = logits[:, : self.cfg.vocab_size]
        if keep:
            for row, done in enumerate(group.done):
                if not done:
                    group.logits[row].append(logits[row].cpu())
        return sample(logits, params, group.generators).to(torch.long).contiguous()

    @staticmethod
    def _record(group: Group, k: int, tokens: list[int], eos_id, start: float, on_tokens) -> None:
        group.last_token_s, group.last_step = time.perf_counter() - start, k
        if k == 0:
            group.first_token_s = group.last_token_s
        running = [i for i, done in enumerate(group.done) if not done]
        for i in running:
            group.tokens[i].append(tokens[i])
            group.done[i] = tokens[i] == eos_id
        group.last_tokens = tokens
        if on_tokens is not None and running:
            on_tokens([group.ids[i] for i in running], [tokens[i] for i in running])
        if all(group.done):
            group.finished_at = k + 1
