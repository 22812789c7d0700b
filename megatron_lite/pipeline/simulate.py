"""Simulate a PipelinePlan in time: bubble, peak in-flight activations, text and PNG timelines.

Costs are per action, i.e. per model chunk: with interleaving each chunk holds 1/v of a rank's
layers, so pass ``forward_cost / v`` to compare wall time with a non-interleaved plan. The bubble
fraction does not depend on that scale. A zero-bubble plan's I and W cost ``input_cost`` and
``weight_cost`` (default: half the backward each, so B = I + W).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.pipeline.schedules import Action, ActionKind, PipelinePlan
from megatron_lite.pipeline.transport import Message, message_of
from megatron_lite.pipeline.validate import PlanError

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
I, W = ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT


@dataclass(frozen=True)
class ComputeSpan:
    rank: int
    kind: ActionKind
    microbatch: int
    chunk: int
    start: float
    end: float


@dataclass(frozen=True)
class SimulationResult:
    plan: PipelinePlan
    spans: tuple[tuple[ComputeSpan, ...], ...]  # spans[rank], in execution order
    makespan: float
    busy: tuple[float, ...]
    idle: tuple[float, ...]
    bubble_fraction: float  # total idle / (p * makespan)
    peak_in_flight: tuple[int, ...]  # per rank, (microbatch, chunk) pairs with live activations
    # Idle time between a rank's first compute start and its last compute end: the bubble the zero-bubble
    # paper's figures count (a parallelogram schedule, whose ranks start one forward apart and stay busy
    # to their end, has none; the start-up ramp every schedule shares is left out).
    inner_idle: tuple[float, ...] = ()

    @property
    def inner_bubble_fraction(self) -> float:
        return sum(self.inner_idle) / (self.plan.num_stages * self.makespan) if self.makespan > 0 else 0.0


def analytic_bubble_fraction(
    num_stages: int, num_microbatches: int, virtual_stages: int = 1
) -> float:
    """(p-1)/(v*m+p-1): the idle share of the step for 1F1B/GPipe (v=1) and interleaved 1F1B."""
    p, m, v = num_stages, num_microbatches, virtual_stages
    return (p - 1) / (v * m + p - 1)


def peak_in_flight(plan: PipelinePlan) -> tuple[int, ...]:
    """Most (microbatch, chunk) activations held at once per rank: forward done, backward not (for a
    zero-bubble plan: W not, since W still reads the layers' inputs)."""
    peaks = []
    for actions in plan.actions:
        live = peak = 0
        for action in actions:
            live += {F: 1, B: -1, W: -1}.get(action.kind, 0)
            peak = max(peak, live)
        peaks.append(peak)
    return tuple(peaks)


def peak_activation_memory(plan: PipelinePlan) -> float:
    """The largest per-rank peak of in-flight activations, in microbatches of a whole rank's layers (a
    chunk holds 1/v of them): what the job's activation memory is sized by."""
    return max(peak_in_flight(plan)) / plan.virtual_stages


class _Clock:
    """Timing state of one simulation run; lives only inside ``simulate``."""

    def __init__(self, plan: PipelinePlan, costs: dict[ActionKind, float], comm_cost: float):
        self.plan, self.costs, self.comm_cost = plan, costs, comm_cost
        p = plan.num_stages
        self.position = [0] * p
        self.free_at = [0.0] * p
        self.compute_end: list[dict[tuple, float]] = [{} for _ in range(p)]
        self.arrived: list[dict[tuple, float]] = [{} for _ in range(p)]
        self.sent: dict[Message, float] = {}  # arrival time of each message sent so far
        self.spans: list[list[ComputeSpan]] = [[] for _ in range(p)]

    def step(self, rank: int) -> bool:
        """Execute the next action of ``rank`` if it can run; False if it waits on a receive."""
        action = self.plan.actions[rank][self.position[rank]]
        if action.kind.is_recv:
            if not self._receive(rank, action):
                return False
        elif action.kind.is_send:
            self._send(rank, action)
        else:
            self._compute(rank, action)
        self.position[rank] += 1
        return True

    def _send(self, rank: int, action: Action) -> None:
        producer = F if action.kind is ActionKind.SEND_ACTIVATION else B  # B stands for I as well
        produced = self.compute_end[rank][(producer, action.microbatch, action.chunk)]
        self.sent[message_of(self.plan, rank, action)] = produced + self.comm_cost

    def _receive(self, rank: int, action: Action) -> bool:
        arrival = self.sent.get(message_of(self.plan, rank, action))
        if arrival is None:
            return False
        self.arrived[rank][(action.kind, action.microbatch, action.chunk)] = arrival
        return True

    def _inputs_ready_at(self, rank: int, action: Action) -> float:
        mb = action.microbatch
        stage = self.plan.stage_of(rank, action.chunk)
        if action.kind is W:
            return self.compute_end[rank][(I, mb, action.chunk)]
        if action.kind is F:
            source, recv_kind, ready = stage - 1, ActionKind.RECV_ACTIVATION, 0.0
        else:
            source, recv_kind = stage + 1, ActionKind.RECV_GRAD
            ready = self.compute_end[rank][(F, mb, action.chunk)]
        if not 0 <= source < self.plan.num_virtual_stages:
            return ready
        source_rank, source_chunk = self.plan.location(source)
        if source_rank == rank:  # neighbour chunk on this rank (p == 1, the turn of a V): no message
            return max(ready, self.compute_end[rank][(F if action.kind is F else B, mb, source_chunk)])
        return max(ready, self.arrived[rank][(recv_kind, mb, action.chunk)])

    def _compute(self, rank: int, action: Action) -> None:
        start = max(self.free_at[rank], self._inputs_ready_at(rank, action))
        cost = self.costs.get((rank, action.kind.value, action.microbatch, action.chunk))  # a measured action
        end = start + (self.costs[action.kind] if cost is None else cost)
        self.free_at[rank] = end
        self.compute_end[rank][(action.kind, action.microbatch, action.chunk)] = end
        if action.kind is I:  # the input gradient exists, as after a B
            self.compute_end[rank][(B, action.microbatch, action.chunk)] = end
        self.spans[rank].append(
            ComputeSpan(rank, action.kind, action.microbatch, action.chunk, start, end)
        )


def simulate(
    plan: PipelinePlan,
    forward_cost: float = 1.0,
    backward_cost: float = 2.0,
    comm_cost: float = 0.0,
    input_cost: float | None = None,
    weight_cost: float | None = None,
    action_costs: dict[tuple[int, str, int, int], float] | None = None,
) -> SimulationResult:
    """Start/end of every compute action, assuming a compute starts once the rank is free and
    its inputs have arrived (a send lands ``comm_cost`` after its producer ends). action_costs: the
    cost of individual actions by (rank, kind, microbatch, chunk) (`measured_costs`), over the per-kind
    ones."""
    costs: dict = {F: forward_cost, B: backward_cost,
                   I: backward_cost / 2 if input_cost is None else input_cost,
                   W: backward_cost / 2 if weight_cost is None else weight_cost}
    costs.update(action_costs or {})
    clock = _Clock(plan, costs, comm_cost)
    try:
        _run_until_stuck(clock)
    except KeyError as missing:
        raise PlanError(f"plan uses {missing} before producing it; run validate_plan") from None
    stuck = [r for r, acts in enumerate(plan.actions) if clock.position[r] < len(acts)]
    if stuck:
        raise PlanError(f"plan deadlocks on ranks {stuck}; run validate_plan for details")
    makespan = max((rank_spans[-1].end for rank_spans in clock.spans if rank_spans), default=0.0)
    busy = tuple(sum(s.end - s.start for s in rank_spans) for rank_spans in clock.spans)
    idle = tuple(makespan - b for b in busy)
    bubble = sum(idle) / (plan.num_stages * makespan) if makespan > 0 else 0.0
    inner = tuple((spans[-1].end - spans[0].start - b) if spans else 0.0 for spans, b in zip(clock.spans, busy))
    return SimulationResult(
        plan=plan,
        spans=tuple(tuple(rank_spans) for rank_spans in clock.spans),
        makespan=makespan,
        busy=busy,
        idle=idle,
        bubble_fraction=bubble,
        peak_in_flight=peak_in_flight(plan),
        inner_idle=inner,
    )


def measured(plan: PipelinePlan, timelines: list[list[tuple]]) -> SimulationResult:
    """The same figures for a measured run: `timelines[rank]` is what the executor recorded (kind,
    microbatch, chunk, start, end) for one step, in seconds of a clock shared by the ranks (perf_counter
    on one machine); time 0 is the earliest start."""
    origin = min(t[3] for timeline in timelines for t in timeline)
    spans = tuple(tuple(ComputeSpan(rank, ActionKind(kind), mb, chunk, start - origin, end - origin)
                        for kind, mb, chunk, start, end in timeline) for rank, timeline in enumerate(timelines))
    makespan = max(s[-1].end for s in spans if s)
    busy = tuple(sum(x.end - x.start for x in s) for s in spans)
    return SimulationResult(
        plan=plan, spans=spans, makespan=makespan, busy=busy, idle=tuple(makespan - b for b in busy),
        bubble_fraction=sum(makespan - b for b in busy) / (plan.num_stages * makespan),
        peak_in_flight=peak_in_flight(plan),
        inner_idle=tuple((s[-1].end - s[0].start - b) if s else 0.0 for s, b in zip(spans, busy)),
    )


def measured_costs(timelines: list[list[tuple]]) -> dict[tuple[int, str, int, int], float]:
    """Each recorded action's duration by (rank, kind, microbatch, chunk), for `simulate(action_costs=)`."""
    return {(rank, kind, mb, chunk): end - start for rank, timeline in enumerate(timelines)
            for kind, mb, chunk, start, end in timeline}


def measured_comm_cost(plan: PipelinePlan, timelines: list[list[tuple]]) -> float:
    """Median time from a message's producing compute ending on one rank to its consuming compute starting
    on the next, over the computes that waited for it (started after their rank's previous compute ended):
    the transfer latency to give `simulate` as comm_cost. 0.0 when no compute waited."""
    end = {(rank, "B" if kind in ("B", "I") else kind, mb, chunk): e
           for rank, timeline in enumerate(timelines) for kind, mb, chunk, _, e in timeline}
    latencies = []
    for rank, timeline in enumerate(timelines):
        previous_end = None
        for kind, mb, chunk, start, stop in timeline:
            if kind != "W" and previous_end is not None and start > previous_end:
                source = plan.stage_of(rank, chunk) + (-1 if kind == "F" else 1)
                if 0 <= source < plan.num_virtual_stages:
                    source_rank, source_chunk = plan.location(source)
                    produced = end.get((source_rank, "F" if kind == "F" else "B", mb, source_chunk))
                    if source_rank != rank and produced is not None and start > produced:
                        latencies.append(start - produced)
            previous_end = stop
    latencies.sort()
    return latencies[len(latencies) // 2] if latencies else 0.0


def mean_costs(timelines: list[list[tuple]]) -> dict[str, float]:
    """Mean measured duration per compute kind ("F", "B", "I", "W") over all ranks and microbatches."""
    durations: dict[str, list[float]] = {}
    for timeline in timelines:
        for kind, _, _, start, end in timeline:
            durations.setdefault(kind, []).append(end - start)
    return {kind: sum(d) / len(d) for kind, d in durations.items()}


def _run_until_stuck(clock: _Clock) -> None:
    # Times depend only on data, not on the order ranks are visited, so a round-robin sweep that
    # advances each rank until it waits on a receive reaches the same answer as an event queue.
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(clock.plan.actions):
            while clock.position[rank] < len(actions) and clock.step(rank):
                progress = True


def _label(span: ComputeSpan, interleaved: bool) -> str:
    suffix = chr(ord("a") + span.chunk) if interleaved else ""
    return f"{span.microbatch}{suffix}"


def render_text(result: SimulationResult, width: int | None = None) -> str:
    """Timeline like the GPipe/Megatron figures: one row per rank, time flowing right.

    ``width`` caps the number of time columns; below the width that fits every label, short
    actions are drawn without their number.
    """
    plan = result.plan
    interleaved = plan.virtual_stages > 1
    all_spans = [s for rank_spans in result.spans for s in rank_spans]
    label_width = max((len(_label(s, interleaved)) for s in all_spans), default=1)
    shortest = min((s.end - s.start for s in all_spans if s.end > s.start), default=1.0)
    # One shortest action gets room for its label plus one fill character, unless squeezed.
    scale = (label_width + 1) / shortest
    squeezed = False
    if width is not None and result.makespan > 0 and width / result.makespan < scale:
        scale, squeezed = max(width, 1) / result.makespan, True
    columns = max(1, round(result.makespan * scale))
    lines = [
        f"{plan.name}  p={plan.num_stages} m={plan.num_microbatches} v={plan.virtual_stages}"
        f"  makespan={result.makespan:g}  bubble={result.bubble_fraction:.1%}",
        "legend: '3  ' forward of microbatch 3, '3==' backward of microbatch 3"
        + (" (input gradient only), '3ww' its weight gradients" if plan.split_backward else "") + ", '.' idle"
        + ("; suffix a/b/... = model chunk 0/1/..." if interleaved else "")
        + ("; '-'/'=' forward/backward too narrow for a label" if squeezed else ""),
    ]
    for rank, rank_spans in enumerate(result.spans):
        row = ["."] * columns
        for span in rank_spans:
            _paint(row, span, scale, _label(span, interleaved))
        lines.append(f"rank {rank:>2} |{''.join(row)}|")
    return "\n".join(lines)


def _paint(row: list[str], span: ComputeSpan, scale: float, label: str) -> None:
    first = round(span.start * scale)
    last = max(first + 1, round(span.end * scale))
    length = last - first
    if span.kind is F:
        # A forward is its number padded with blanks; squeezed below that, a run of '-'.
        text = label.ljust(length) if len(label) < length else "-" * length
    else:
        fill = "w" if span.kind is W else "="
        text = (label + fill * length)[:length] if len(label) < length else fill * length
    row[first:last] = list(text)


def render_png(result: SimulationResult, path: str) -> None:
    """Coloured timeline boxes, one lane per rank; matplotlib is only needed here."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    plan = result.plan
    interleaved = plan.virtual_stages > 1
    forward_colours = ["#4C72B0", "#64B5CD", "#2A9D8F", "#8172B2"]
    backward_colours = ["#DD8452", "#C44E52", "#E9C46A", "#937860"]
    weight_colours = ["#55A868", "#8C8C8C", "#A1C181", "#6B8E23"]
    figure = Figure(figsize=(min(4 + result.makespan * 0.3, 40), 1 + 0.6 * plan.num_stages))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for rank, rank_spans in enumerate(result.spans):
        for span in rank_spans:
            palette = {F: forward_colours, W: weight_colours}.get(span.kind, backward_colours)
            colour = palette[span.chunk % len(palette)]
            axes.broken_barh(
                [(span.start, span.end - span.start)], (rank - 0.4, 0.8),
                facecolors=colour, edgecolors="black", linewidth=0.5,
            )
            axes.text(
                (span.start + span.end) / 2, rank, _label(span, interleaved),
                ha="center", va="center", fontsize=7, color="white",
            )
    axes.set_xlim(0, result.makespan)
    axes.set_ylim(plan.num_stages - 0.5, -0.5)  # rank 0 on top, as in the papers
    axes.set_yticks(range(plan.num_stages), [f"rank {r}" for r in range(plan.num_stages)])
    axes.set_xlabel("time")
    chunks = range(min(plan.virtual_stages, len(forward_colours)))
    suffix = (lambda c: f" chunk {c}") if interleaved else (lambda c: "")
    handles = [Patch(color=forward_colours[c], label=f"forward{suffix(c)}") for c in chunks]
    handles += [Patch(color=backward_colours[c], label=f"backward{suffix(c)}") for c in chunks]
    if plan.split_backward:
        handles += [Patch(color=weight_colours[c], label=f"weight grads{suffix(c)}") for c in chunks]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    axes.set_title(
        f"{plan.name}: p={plan.num_stages}, m={plan.num_microbatches}, "
        f"v={plan.virtual_stages}, bubble={result.bubble_fraction:.1%}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
