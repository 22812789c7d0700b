"""Console lines, a progress bar and Weights & Biases for the metrics of the logging rank.

Only one rank logs (the trainer passes `enabled=True` there, see `holds_loss`); every other rank
gets a logger that does nothing and never imports or calls wandb. The resolved run config goes to
W&B with secrets masked (`scrub_secrets`); nothing here reads WANDB_API_KEY or any other credential.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

WANDB_MODES = ("online", "offline", "disabled")
REDACTED = "<redacted>"

# A key is secret when one of its words is one of these (words split at non-alphanumerics and at
# camelCase humps): "hf_token", "authToken", "client_secret", "db_password" are; "tokens_per_step",
# "tokenizer", "max_tokens" are not.
_SECRET_WORDS = frozenset({"token", "secret", "secrets", "password", "passwords", "passwd", "credential",
                           "credentials"})
# ... or when its words run together contain one of these ("api_key", "wandbApiKey", "API-KEY").
_SECRET_JOINED = ("apikey", "privatekey", "accesskey")
# user:password@ in URLs (a git remote or a data URL with credentials inside)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@")


def is_secret_key(name: Any) -> bool:
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    return any(word in _SECRET_WORDS for word in words) or any(j in "".join(words) for j in _SECRET_JOINED)


def scrub_secrets(value: Any) -> Any:
    """A copy of a plain config (dicts, lists, scalars) with the value of every secret-looking key
    replaced by "<redacted>" at any depth, and credentials inside URLs masked."""
    if isinstance(value, Mapping):
        return {key: REDACTED if is_secret_key(key) else scrub_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(item) for item in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(REDACTED + "@", value)
    return value


def scrub_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with secret values masked: `key=value` and `--key=value` where the key
    is secret, the argument after a bare secret `--key`, and credentials inside URLs."""
    out, mask_next = [], False
    for arg in argv:
        if mask_next:
            out.append(REDACTED)
            mask_next = False
            continue
        key, eq, _ = arg.partition("=")
        if eq and is_secret_key(key.split(".")[-1].lstrip("-+~")):
            out.append(f"{key}={REDACTED}")
        else:
            mask_next = arg.startswith("-") and not eq and is_secret_key(arg.lstrip("-"))
            out.append(scrub_secrets(arg))
    return out


@contextlib.contextmanager
def _scrubbed_sys_argv():
    """wandb records sys.argv[1:] in the run's metadata; a secret given as an override must not go
    there, so sys.argv is scrubbed while the run starts and restored afterwards."""
    original = sys.argv
    sys.argv = original[:1] + scrub_argv(original[1:])
    try:
        yield
    finally:
        sys.argv = original


def to_plain_config(config: Any) -> dict:
    """A resolved config (dict, dataclass or OmegaConf) as nested plain dicts, lists and scalars."""
    if config is None:
        return {}
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    plain = _plain(config)
    if not isinstance(plain, dict):
        raise TypeError(f"the run config must be a mapping, a dataclass or an OmegaConf config, got {type(config)}")
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # torch.dtype, Path, enums: logged by name


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """`logging.wandb.*`: mode online | offline | disabled (offline in tests and the demo)."""

    mode: str = "disabled"
    project: str = "megatron-lite"
    name: str | None = None
    tags: tuple[str, ...] = ()
    entity: str | None = None
    group: str | None = None
    dir: str | None = None
    id: str | None = None  # set: resume that run (a requeued job continues its own run), else a new one

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb.mode={self.mode!r} is not one of {WANDB_MODES}")
        object.__setattr__(self, "tags", tuple(self.tags or ()))

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> "WandbSettings":
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            known = [f.name for f in dataclasses.fields(cls)]
            raise ValueError(f"unknown logging.wandb keys {unknown}; known: {known}")
        return cls(**values)


def holds_loss(layout) -> bool:
    """The rank whose metrics are logged: the one that computes the loss (last pipeline stage) and is
    first in its TP and DP groups, so exactly one rank logs under every layout."""
    return layout.is_last_stage and layout.tp.rank == 0 and layout.dp.rank == 0


class MetricsLogger:
    """Per-step metrics of the logging rank to a progress bar, the console and W&B.

        logger = MetricsLogger(enabled, WandbSettings(mode="offline", dir=...), config,
                               total_steps=cfg.trainer.max_steps, log_interval=cfg.trainer.log_interval)
        logger.log(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": g, **perf.as_dict()})
        logger.finish()

    `step` counts the steps done (1 after the first). Every step goes to W&B and moves the bar; the
    console gets one `console_line` on every `log_interval`-th step, the first and the last step of
    the run, and when forced. Disabled: no output, no wandb.
    """

    def __init__(self, enabled: bool, wandb_settings: WandbSettings | Mapping | None = None, config: Any = None, *,
                 total_steps: int | None = None, log_interval: int = 1, start_step: int = 0, progress: bool = True,
                 stream: TextIO | None = None):
        if not isinstance(wandb_settings, WandbSettings):
            wandb_settings = WandbSettings.from_mapping(wandb_settings)  # validated on every rank
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        self.enabled, self.settings = enabled, wandb_settings
        self.total_steps, self.log_interval, self.start_step = total_steps, log_interval, start_step
        self.stream = stream if stream is not None else sys.stdout
        self.run = None
        self.bar = None
        if not enabled:
            return
        if wandb_settings.mode != "disabled":
            self.run = self._init_wandb(wandb_settings, scrub_secrets(to_plain_config(config)))
        bar_stream = sys.stderr
        show_bar = progress and hasattr(bar_stream, "isatty") and bar_stream.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=bar_stream, dynamic_ncols=True,
                        disable=not show_bar, leave=True)

    @staticmethod
    def _init_wandb(settings: WandbSettings, config: dict):
        import wandb

        if settings.dir is not None:
            os.makedirs(settings.dir, exist_ok=True)
        # console="off": wandb would otherwise wrap stdout/stderr (and copy every line into the run);
        # the run's own console lines already reach the job's log.
        with _scrubbed_sys_argv():
            return wandb.init(mode=settings.mode, project=settings.project, name=scrub_secrets(settings.name),
                              tags=scrub_secrets(list(settings.tags)) or None, entity=settings.entity, group=settings.group,
                              config=config, dir=settings.dir, id=settings.id,
                              resume="allow" if settings.id else None, settings=wandb.Settings(console="off"))

    @property
    def run_dir(self) -> Path | None:
        """The W&B run directory (offline: .../wandb/offline-run-<time>-<id>), None without a run."""
        return Path(self.run.dir).parent if self.run is not None else None

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based) gets a console line; the same answer on every rank."""
        last = self.total_steps is not None and step >= self.total_steps
        return step % self.log_interval == 0 or last or step == self.start_step + 1

    def log(self, step: int, metrics: Mapping[str, Any], *, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.update(max(0, step - self.bar.n))
            self.bar.set_postfix_str(format_metrics(metrics, brief=True), refresh=False)
        if self.run is not None:
            self.run.log({key: value for key, value in metrics.items() if _loggable(value)}, step=step)
        if force or self.due(step):
            self.message(console_line(step, self.total_steps, metrics))
        validation = validation_line(step, self.total_steps, metrics)
        if validation:
            self.message(validation)

    def summarize(self, values: Mapping[str, Any]) -> None:
        """Run-level figures (parameter count, per-group communication) in the W&B run's summary."""
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def message(self, text: str) -> None:
        """A console line from the logging rank that does not tear the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def finish(self, exit_code: int = 0) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


_ALWAYS_SHOWN = ("loss", "grad_norm", "perplexity")


def _fmt(name: str, value: float, brief: bool) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    if name == "loss":
        return f"{value:.4f}"
    if name == "lr":
        return f"{value:.2e}"
    if name in ("mfu", "hfu"):
        return f"{100 * value:.2f}%"
    if name == "tokens_per_s":
        return f"{value:,.0f}"
    if name == "step_time_s":
        return f"{1000 * value:.1f}ms"
    if name.endswith("_gib"):
        return f"{value:.2f}GiB"
    return f"{value:.3g}" if brief else f"{value:.4g}"


_LABELS = {"tokens_per_s": "tok/s", "tflops_per_rank": "TFLOP/s/rank", "step_time_s": "time",
           "grad_norm": "gnorm", "mfu": "MFU", "hfu": "HFU"}
_BRIEF = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")


def format_metrics(metrics: Mapping[str, Any], brief: bool = False) -> str:
    """'loss 2.3456 | lr 3.00e-03 | gnorm 0.512 | tok/s 12,345 | ...' from the scalar metrics; the
    train/ and perf/ prefixes are dropped, others (val/) kept; non-scalars (dicts) are skipped, and so
    are NaNs (metrics not measured) except those of the model (loss, grad norm), shown as nan/inf."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key.split("/")[-1]
        if isinstance(value, float) and math.isnan(value) and name not in _ALWAYS_SHOWN:
            continue
        if brief and (name not in _BRIEF or key.startswith("val/")):
            continue
        label = key.removeprefix("train/").removeprefix("perf/")
        label = _LABELS.get(label, label)
        parts.append(f"{label}={_fmt(name, value, True)}" if brief else f"{label} {_fmt(name, value, False)}")
    return (", " if brief else " | ").join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _loggable(value: Any) -> bool:
    return _is_number(value) or isinstance(value, str)


def _step_label(step: int, total_steps: int | None) -> str:
    """'step  10/300', right-aligned to the width of the total so the columns line up."""
    if total_steps is None:
        return f"step {step}"
    return f"step {step:>{len(str(total_steps))}d}/{total_steps}"


# The memory a console line shows, first match: the CUDA allocator's peak, else the host's resident set.
_CONSOLE_MEMORY = (("memory/cuda_max_allocated_gib", "alloc"), ("memory/host_rss_gib", "rss"))


def console_line(step: int, total_steps: int | None, metrics: Mapping[str, Any]) -> str:
    """'step  10/300 | loss 2.3456 | lr 3.0e-03 | gnorm 0.512 | tok/s 12,345 | MFU 41.2% | rss 0.31G'.

    A fixed set of short fields, each shown when measured: MFU needs trainer.peak_tflops; an MoE model
    adds its balancing loss (1.0: balanced) and the busiest expert's load over the mean; the loss
    scale appears under fp16 (when train/loss_scale is there), skipped steps once there are any.
    Validation gets its own line (`validation_line`); other metrics go to W&B only."""
    parts = [_step_label(step, total_steps)]

    def add(key: str, label: str, fmt) -> None:
        value = metrics.get(key)
        if _is_number(value):
            parts.append(f"{label} {value if isinstance(value, float) and not math.isfinite(value) else fmt(value)}")

    add("train/loss", "loss", lambda v: f"{v:.4f}")
    add("train/lr", "lr", lambda v: f"{v:.1e}")
    add("train/grad_norm", "gnorm", lambda v: f"{v:.3g}")
    add("perf/tokens_per_s", "tok/s", lambda v: f"{v:,.0f}" if v < 1e6 else f"{v / 1e6:.2f}M")
    add("perf/mfu", "MFU", lambda v: f"{100 * v:.1f}%")
    key, label = next(((k, l) for k, l in _CONSOLE_MEMORY if k in metrics), (None, None))
    if key:
        add(key, label, lambda v: f"{v:.2f}G")
    add("moe/balance_loss", "balance", lambda v: f"{v:.3f}")
    add("moe/max_over_mean", "load", lambda v: f"{v:.2f}")
    add("moe/dropped_fraction", "dropped", lambda v: f"{100 * v:.1f}%")
    add("train/loss_scale", "scale", lambda v: f"{v:g}")
    if metrics.get("train/skipped_total"):
        add("train/skipped_total", "skipped", lambda v: f"{v:g}")
    return " | ".join(parts)


def validation_line(step: int, total_steps: int | None, metrics: Mapping[str, Any]) -> str | None:
    """'step 300/300 | val loss 2.3456 | val ppl 10.45' when the step has a validation loss."""
    if "val/loss" not in metrics:
        return None
    ppl = metrics.get("val/perplexity")
    return f"{_step_label(step, total_steps)} | val loss {metrics['val/loss']:.4f}" + (f" | val ppl {ppl:.4g}" if ppl is not None else "")


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def largest_comm(per_rank: list[Mapping[str, int]]) -> dict[str, tuple[int, int]]:
    """{"group/op": (the largest rank's bytes, how many ranks moved any)} from every rank's counters
    (comm.CommStats.report)."""
    keys = sorted(set().union(*per_rank)) if per_rank else []
    return {key: (max(c.get(key, 0) for c in per_rank), sum(c.get(key, 0) > 0 for c in per_rank)) for key in keys}


def describe_comm(per_rank: list[Mapping[str, int]]) -> str:
    """One step's communication per process group and operation: the largest rank's payload and the
    ranks that moved it, e.g. 'tp all_reduce 1.5 MiB x8 | pp send 96.0 KiB x4'."""
    parts = [f"{key.replace('/', ' ', 1)} {_size(n)} x{ranks}" for key, (n, ranks) in largest_comm(per_rank).items()
             if n]
    return " | ".join(parts) if parts else "none (one process)"


# ---------------------------------------------------------------------------------------------------
# Reading an offline run back (tests, the demo): wandb 0.31 has no Python reader for its `.wandb`
# files any more. The file is a 7-byte header (":W&B", magic 0xBEE1, version) followed by LevelDB-log
# framing (32 KiB blocks; records with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)
# whose payloads are `wandb_internal_pb2.Record` protobufs. Checksums are not verified.

_BLOCK, _HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path):
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:
            pos += room  # zero-filled rest of the block
            continue
        payload = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""


def read_offline_run(run_dir: str | Path, timeout_s: float = 30.0) -> dict:
    """{"id", "name", "project", "tags", "config", "history", "summary", "complete"} of an offline run.

    config holds the logged config (without W&B's own "_wandb" entry); history one dict per logged
    step (with "_step"; nested keys joined with "/"); summary the last value of each metric. wandb's
    service writes the file asynchronously and `finish()` can return before it has, so this waits
    up to `timeout_s` for the run's exit record; `complete` says whether it came.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted(Path(run_dir).glob("*.wandb"))
        records = [pb.Record.FromString(payload) for payload in _wandb_records(files[0])] if files else []
        complete = any(r.WhichOneof("record_type") == "exit" for r in records)
        if complete or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    out: dict = {"id": None, "name": None, "project": None, "tags": [], "config": {}, "history": [], "summary": {},
                 "complete": complete}

    def key_of(item) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    def update_config(items) -> None:
        for item in items:
            if key_of(item) != "_wandb":
                out["config"][key_of(item)] = json.loads(item.value_json)

    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["name"], out["project"] = record.run.run_id, record.run.display_name, record.run.project
            out["tags"] = list(record.run.tags)
            update_config(record.run.config.update)
        elif kind == "config":
            update_config(record.config.update)
        elif kind == "history":
            row = {key_of(item): json.loads(item.value_json) for item in record.history.item}
            row.setdefault("_step", record.history.step.num)
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][key_of(item)] = json.loads(item.value_json)
    return out
