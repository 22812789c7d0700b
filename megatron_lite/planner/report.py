"""A plan as a ranked text table, as JSON-ready data, and as a picture (memory per GPU against time)."""

from __future__ import annotations

import dataclasses

from megatron_lite.planner.search import Plan
from megatron_lite.planner.spec import GIB, Cluster, Workload
from megatron_lite.planner.training_time import Estimate


def estimate_dict(e: Estimate) -> dict:
    return {"layout": {k: v for k, v in dataclasses.asdict(e.layout).items()}, "name": e.layout.describe(),
            "kind": e.kind, "memory_per_gpu_gib": e.memory_per_gpu / GIB,
            "stages": [{"stage": s.stage, "layers": s.layers, **{f"{k}_gib": v / GIB for k, v in s.memory.items()},
                        "total_gib": s.total / GIB} for s in e.stages],
            "comm_bytes": e.comm_bytes, "comm_time_s": e.comm_time, "metrics": e.metrics}


def plan_dict(plan: Plan, question: dict) -> dict:
    return {"question": question, "chosen": plan.best.layout.describe(),
            "ranked": [estimate_dict(e) for e in plan.ranked],
            "rejected": [{"layout": r.layout.describe(), "reason": r.reason} for r in plan.rejected]}


def _row(rank: int, e: Estimate) -> list[str]:
    worst = max(e.stages, key=lambda s: s.total)
    keys = ("parameters", "kv_cache") if e.kind == "inference" else ("parameters", "gradients", "optimizer",
                                                                     "activations")
    terms = "/".join(f"{worst.memory.get(k, 0) / GIB:.1f}" for k in keys)
    m = e.metrics
    if e.kind == "inference":
        timing = [f"{m['ttft_s'] * 1e3:.1f}", f"{m['tpot_s'] * 1e3:.2f}", f"{m['tokens_per_s']:.1f}",
                  f"{m['decode_bytes_per_token'] / 1e6:.2f}"]
    else:
        timing = [f"{m['step_s']:.2f}", f"{m['tokens_per_s']:.0f}", f"{m['mfu'] * 100:.1f}", f"{m['bubble'] * 100:.1f}"]
    return [str(rank), e.layout.describe(), f"{e.memory_per_gpu / GIB:.1f}", terms] + timing


def table(plan: Plan, workload: Workload, top: int = 10) -> str:
    if workload.kind == "inference":
        head = ["#", "layout", "GiB/GPU", "weights/KV", "TTFT ms", "TPOT ms", "tokens/s", "MB/token"]
    else:
        head = ["#", "layout", "GiB/GPU", "param/grad/opt/act", "step s", "tokens/s", "MFU %", "bubble %"]
    rows = [head] + [_row(i + 1, e) for i, e in enumerate(plan.ranked[:top])]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if c not in (1,) else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rejected_summary(plan: Plan, most: int = 8) -> str:
    if not plan.rejected:
        return "rejected: none"
    lines = [f"rejected: {len(plan.rejected)} layouts, e.g."]
    seen = set()
    for r in sorted(plan.rejected, key=lambda r: r.memory_per_gpu is None):
        kind = r.reason.split(" ")[0] + str(r.memory_per_gpu is None)
        if len(lines) > most or (kind in seen and len(plan.rejected) > most):
            continue
        seen.add(kind)
        lines.append(f"  {r.layout.describe()}: {r.reason}")
    return "\n".join(lines)


def draw(plan: Plan, cluster: Cluster, workload: Workload, path: str, title: str = "") -> None:
    """Memory per GPU against predicted time, one point per valid layout, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (1e3, "time per output token (ms)") if workload.kind == "inference" else (1.0, "step time (s)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [e.time_s * scale for e in plan.ranked]
    ys = [e.memory_per_gpu / GIB for e in plan.ranked]
    ax.scatter(xs, ys, s=18, color="tab:blue", label="valid layouts")
    for e, x, y in list(zip(plan.ranked, xs, ys))[:8]:
        ax.annotate(e.layout.describe(), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([xs[0]], [ys[0]], s=120, facecolors="none", edgecolors="tab:red", linewidths=2,
               label=f"chosen: {plan.best.layout.describe()}")
    ax.axhline(cluster.memory_bytes / GIB, color="gray", linestyle="--", linewidth=1, label="GPU memory")
    ax.set_xlabel(unit)
    ax.set_ylabel("memory per GPU (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
