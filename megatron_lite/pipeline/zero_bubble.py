"""Compute orders of the zero-bubble schedules (Qi et al. 2024, "Zero Bubble Pipeline Parallelism").

Each backward is split into I (the input gradient, sent to the previous stage at once) and W (the
weight gradients, which nothing downstream waits for). `schedules.build_schedule` adds the
communication and returns the plan; these functions only order the computes of one rank.

- ZB-H1: 1F1B's warmup and order with I in place of B; rank r postpones its W's by r steady steps,
  so the W's fill the slots where 1F1B waits for gradients. With equal F/I/W costs the idle time is
  a third of 1F1B's, and no rank holds more forwards without their I than under 1F1B (the same
  construction as torch.distributed.pipelining's ScheduleInterleavedZeroBubble with one stage per
  rank, the paper's ZB-H1).
- ZBV: two chunks per rank in a V (chunk 0 = stage r, chunk 1 = stage 2p-1-r, so the last rank turns
  the V around locally); the paper's Section 6 order (as torch's ScheduleZBVZeroBubble builds it): a
  warmup of chunk-0 forwards, then F/I/W of both chunks in turn, then the remaining I's and W's.
  Built for max(m, 2p-1) microbatches and cut to m, so any m >= 1 works.
- ZB-H2: the paper's zero-bubble schedule with twice 1F1B's memory: rank r runs up to 2(p-r)-1
  forwards ahead of their I, and at most 2p-1 microbatches wait for their W, so the first ranks fill the
  start-up with extra forwards and every rank defers W's into the tail. Ordered by list scheduling with
  equal unit costs (an I as soon as its gradient is there, else a forward within those limits, else a
  W): for m >= 2p-1 the ranks form a parallelogram, each busy from its first forward to its end.
"""

from __future__ import annotations

import functools

from megatron_lite.pipeline.schedules import Action, ActionKind

F, I, W = ActionKind.FORWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT


def zb_h1_compute_order(p: int, m: int, rank: int) -> list[Action]:
    warmup = min(p - rank - 1, m)
    order = [Action(F, mb) for mb in range(warmup)]
    weights = 0
    for k in range(m):  # the k-th I; in the steady phase it follows the forward warmup + k
        if warmup + k < m:
            order.append(Action(F, warmup + k))
        order.append(Action(I, k))
        if k >= rank:
            order.append(Action(W, weights))
            weights += 1
    order += [Action(W, mb) for mb in range(weights, m)]
    return order


def zbv_compute_order(p: int, m: int, rank: int) -> list[Action]:
    n = max(2 * p - 1, m)
    order: list[Action] = []
    counts = {(kind, chunk): 0 for kind in (F, I, W) for chunk in (0, 1)}

    def emit(kind: ActionKind, chunk: int) -> None:
        order.append(Action(kind, counts[(kind, chunk)], chunk))
        counts[(kind, chunk)] += 1

    for _ in range(2 * (p - rank) - 1):
        emit(F, 0)
    for _ in range(rank):
        emit(F, 1)
        emit(F, 0)
    for _ in range(p - rank):
        emit(F, 1)
        emit(I, 1)
        emit(W, 1)
    while counts[(F, 1)] < counts[(F, 0)] or counts[(F, 0)] < n:
        if counts[(F, 0)] < n:
            emit(F, 0)
        emit(I, 0)
        emit(W, 0)
        emit(F, 1)
        emit(I, 1)
        emit(W, 1)
    for _ in range(rank):
        emit(I, 0)
        emit(I, 1)
    for _ in range(p - rank):
        emit(I, 0)
        emit(W, 0)
    while counts[(W, 1)] < counts[(I, 1)]:
        emit(W, 1)
    while counts[(W, 0)] < counts[(I, 0)]:
        emit(W, 0)
    return [a for a in order if a.microbatch < m]


def zb_h2_compute_order(p: int, m: int, rank: int) -> list[Action]:
    return list(_zb_h2_orders(p, m)[rank])


@functools.lru_cache(maxsize=64)
def _zb_h2_orders(p: int, m: int) -> tuple[tuple[Action, ...], ...]:
    forwards, inputs, weights = [0] * p, [0] * p, [0] * p
    forward_done: set[tuple[int, int]] = set()  # (rank, microbatch) finished before the current tick
    input_done: set[tuple[int, int]] = set()
    orders: list[list[Action]] = [[] for _ in range(p)]
    while any(n < m for n in weights):
        new_forwards, new_inputs = [], []
        for r in range(p):
            if inputs[r] < forwards[r] and (r == p - 1 or (r + 1, inputs[r]) in input_done):
                orders[r].append(Action(I, inputs[r]))
                new_inputs.append((r, inputs[r]))
                inputs[r] += 1
            elif (forwards[r] < m and (r == 0 or (r - 1, forwards[r]) in forward_done)
                  and forwards[r] - inputs[r] < 2 * (p - r) - 1 and forwards[r] - weights[r] < 2 * p - 1):
                orders[r].append(Action(F, forwards[r]))
                new_forwards.append((r, forwards[r]))
                forwards[r] += 1
            elif weights[r] < inputs[r]:
                orders[r].append(Action(W, weights[r]))
                weights[r] += 1
        forward_done.update(new_forwards)
        input_done.update(new_inputs)
    return tuple(tuple(order) for order in orders)
