"""The planner's inputs as plain data: a cluster, a workload and a layout (the model is a ModelConfig).

Presets live in conf/cluster/*.yaml and conf/workload/*.yaml; `load_cluster`, `load_workload` and
`load_model` read them by name and list the valid names when one is unknown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_lite.models.config import RECOMPUTE, ModelConfig
from megatron_lite.pipeline.schedules import SCHEDULE_NAMES, check_virtual_stages

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GB, GIB = 1e9, 2**30
PLANNED_SCHEDULES = SCHEDULE_NAMES  # all the framework runs, zero-bubble ones (zb_h1, zb_h2, zbv) included


@dataclass(frozen=True)
class Link:
    """One kind of link: bandwidth each rank can send at (bytes/s, one direction) and the latency of one
    message or collective step (s): a transfer of n bytes takes latency + n / bandwidth.

    measured: optionally, (bytes, seconds) of one step at several sizes, as a fit on the machine gives
    them; a step then takes the curve through them (linear between points, the smallest point's time
    below it, 1 / bandwidth per byte beyond the largest). A transport's cost is not one straight line:
    gloo on a CPU moves 1 MiB at half the bytes per second it reaches at 4 MiB, and a line fitted through
    both misses the middle sizes by 20%, where a TP all-reduce of activations sits."""

    bandwidth: float
    latency: float
    measured: tuple = ()

    def __post_init__(self):
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise ValueError(f"a link needs bandwidth > 0 and latency >= 0, got bandwidth={self.bandwidth}, "
                             f"latency={self.latency}")
        points = tuple((float(b), float(t)) for b, t in self.measured)
        if any(not (b > 0 and t > 0) for b, t in points) or [b for b, _ in points] != sorted({b for b, _ in points}):
            raise ValueError(f"link.measured needs (bytes > 0, seconds > 0) points at increasing sizes, got {self.measured}")
        object.__setattr__(self, "measured", points)

    def step_time(self, nbytes: float) -> float:
        """Seconds of one step moving `nbytes`."""
        if not self.measured:
            return self.latency + nbytes / self.bandwidth
        points = self.measured
        if nbytes <= points[0][0]:
            return points[0][1]
        for (b0, t0), (b1, t1) in zip(points, points[1:]):
            if nbytes <= b1:
                return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
        return points[-1][1] + (nbytes - points[-1][0]) / self.bandwidth


@dataclass(frozen=True)
class Cluster:
    """GPUs (or CPU processes) per node, nodes, memory and peak speed per device, and the two links.

    peak_flops: per dtype, FLOP/s of one device for dense matmuls; mfu_ceiling: the share of that peak
    a large matmul reaches (what the planner's compute times divide by: peak * mfu_ceiling).
    layer_overhead: fixed seconds per layer and micro batch in forward (twice that in backward) that
    do not scale with FLOPs: kernel launches, Python and autograd bookkeeping (fitted on the CPU).
    memory_bandwidth: bytes/s one device reads from its memory (decode reads every weight per token).
    elementwise_bandwidth: bytes/s the norms and residual adds move at (cost.replicated_time), the work
    every TP rank repeats unless SP splits it; 0: not modelled apart (the GPU presets' mfu_ceiling holds it).
    """

    name: str
    gpus_per_node: int
    num_nodes: int
    memory_bytes: float
    peak_flops: dict
    memory_bandwidth: float
    intra_node: Link
    inter_node: Link
    mfu_ceiling: float = 0.7
    layer_overhead: float = 0.0  # seconds per layer forward and micro batch besides its FLOPs (x2 backward)
    elementwise_bandwidth: float = 0.0
    description: str = ""

    def __post_init__(self):
        for key in ("gpus_per_node", "num_nodes"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"cluster.{key}={getattr(self, key)!r} must be a positive integer")
        for key in ("memory_bytes", "memory_bandwidth"):
            if not getattr(self, key) > 0:
                raise ValueError(f"cluster.{key}={getattr(self, key)!r} must be > 0")
        if not self.elementwise_bandwidth >= 0:
            raise ValueError(f"cluster.elementwise_bandwidth_gbs must be >= 0, got {self.elementwise_bandwidth / GB}")
        if not self.layer_overhead >= 0:
            raise ValueError(f"cluster.layer_overhead_us must be >= 0, got {self.layer_overhead * 1e6}")
        if not 0 < self.mfu_ceiling <= 1:
            raise ValueError(f"cluster.mfu_ceiling={self.mfu_ceiling} must be in (0, 1]")
        if not self.peak_flops or any(not v > 0 for v in self.peak_flops.values()):
            raise ValueError(f"cluster.peak_flops={self.peak_flops} needs a positive FLOP/s per dtype")

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"cluster {self.name!r} gives no peak FLOP/s for dtype {dtype!r}; it has "
                             f"{sorted(self.peak_flops)}")
        return self.peak_flops[dtype]

    def with_nodes(self, num_nodes: int) -> "Cluster":
        return dataclasses.replace(self, num_nodes=num_nodes)


@dataclass(frozen=True)
class Workload:
    """training: sequences of seq_length, global_batch of them per step. inference: batch requests of
    prompt_length tokens each generating output_length tokens. dtype: parameters and activations."""

    kind: str = "training"
    dtype: str = "bf16"
    seq_length: int = 2048
    global_batch: int = 512
    prompt_length: int = 512
    output_length: int = 128
    batch: int = 1
    name: str = ""

    def __post_init__(self):
        if self.kind not in ("training", "inference"):
            raise ValueError(f"workload.kind={self.kind!r} is not one of ('training', 'inference')")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"workload.dtype={self.dtype!r} is not one of {tuple(DTYPE_BYTES)}")
        for key in ("seq_length", "global_batch", "prompt_length", "output_length", "batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"workload.{key}={value!r} must be a positive integer")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def context_length(self) -> int:
        """Tokens a sequence reaches (the KV cache holds them all at the end of generation)."""
        return self.prompt_length + self.output_length


@dataclass(frozen=True)
class Layout:
    """One way to run the model: sizes, pipeline schedule and the per-run options that change memory,
    communication and time but not the result."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    zero1: bool = False
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self):
        for key in ("tp", "pp", "dp", "ep", "micro_batch", "virtual_stages"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layout.{key}={value!r} must be a positive integer")
        if self.dp % self.ep:
            raise ValueError(f"layout.ep={self.ep} must divide layout.dp={self.dp} (experts are split over DP ranks)")
        if self.schedule not in PLANNED_SCHEDULES:
            raise ValueError(f"layout.schedule={self.schedule!r} is not one of {PLANNED_SCHEDULES}")
        try:  # the framework's own rule: zbv runs exactly 2 chunks per rank, interleaved_1f1b >= 2, others 1
            check_virtual_stages(self.schedule, self.virtual_stages)
        except ValueError as err:
            raise ValueError(f"layout.schedule={self.schedule}: {err}") from None
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"layout.recompute={self.recompute!r} is not one of {RECOMPUTE}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        text = f"TP{self.tp} PP{self.pp} DP{self.dp}" + (f" EP{self.ep}" if self.ep > 1 else "")
        if self.virtual_stages > 1:
            text += f" v{self.virtual_stages}"
        if self.schedule != "1f1b":
            text += f" {self.schedule}"
        if self.micro_batch > 1:
            text += f" mb{self.micro_batch}"
        flags = [f for f, on in (("SP", self.sequence_parallel), ("ZeRO-1", self.zero1)) if on]
        if self.recompute != "none":
            flags.append(f"recompute={self.recompute}")
        return text + (" " + " ".join(flags) if flags else "")


# ----------------------------------------------------------------------------- presets


def preset_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _read_preset(group: str, name: str) -> dict:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown {group} {name!r}; valid names: {', '.join(preset_names(group))}")
    return yaml.safe_load(path.read_text()) or {}


def cluster_from_dict(values: dict) -> Cluster:
    """From conf/cluster's units: memory_gib, peak_tflops, memory_bandwidth_gbs, link bandwidth_gbs
    (GB/s = 1e9 bytes/s), latency_us and, optionally, measured_bytes_us ([bytes, us] of one step)."""
    values = dict(values)
    links = {key: Link(float(values[key]["bandwidth_gbs"]) * GB, float(values[key]["latency_us"]) * 1e-6,
                       tuple((b, us * 1e-6) for b, us in values[key].get("measured_bytes_us", ())))
             for key in ("intra_node", "inter_node")}
    return Cluster(name=values["name"], gpus_per_node=values["gpus_per_node"], num_nodes=values.get("num_nodes", 1),
                   memory_bytes=float(values["memory_gib"]) * GIB,
                   peak_flops={k: float(v) * 1e12 for k, v in values["peak_tflops"].items()},
                   memory_bandwidth=float(values["memory_bandwidth_gbs"]) * GB,
                   mfu_ceiling=float(values.get("mfu_ceiling", 0.7)), description=values.get("description", ""),
                   layer_overhead=float(values.get("layer_overhead_us", 0.0)) * 1e-6,
                   elementwise_bandwidth=float(values.get("elementwise_bandwidth_gbs", 0.0)) * GB,
                   **links)


def load_cluster(name: str) -> Cluster:
    return cluster_from_dict(_read_preset("cluster", name))


def workload_from_dict(values: dict) -> Workload:
    known = {f.name for f in dataclasses.fields(Workload)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"workload has unknown keys {unknown}; valid keys: {sorted(known)}")
    return Workload(**values)


def load_workload(name: str) -> Workload:
    return workload_from_dict(_read_preset("workload", name))


def model_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig from a composed conf/model section (its `name`, `path` and Hydra keys dropped)."""
    values = {k: v for k, v in dict(values).items() if k not in ("name", "path", "defaults")}
    return ModelConfig(**values)


def load_model(name: str) -> ModelConfig:
    """conf/model/NAME.yaml with its `defaults` base presets merged first (no Hydra: a few ms)."""
    merged = _compose_model(name, seen=())
    return model_from_dict(merged)


def _compose_model(name: str, seen: tuple) -> dict:
    if name in seen:
        raise ValueError(f"conf/model defaults loop through {name!r}")
    if name == "hf":
        raise ValueError("model=hf reads a Hugging Face directory; the planner needs a preset with the shape in it")
    values = _read_preset("model", name)
    merged: dict = {}
    for entry in values.get("defaults", []):
        if entry != "_self_":
            merged.update(_compose_model(entry, seen + (name,)))
    merged.update({k: v for k, v in values.items() if k != "defaults"})
    return merged

