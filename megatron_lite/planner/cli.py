"""scripts/plan.py: compose conf/plan.yaml with the overrides, plan, print, write JSON and PNG."""

from __future__ import annotations

import json
import sys

from megatron_lite.planner.report import draw, plan_dict, rejected_summary, table
from megatron_lite.planner.search import Plan, memory_reason, search, structural_reason
from megatron_lite.planner.spec import (CONF_DIR, GIB, Layout, cluster_from_dict, model_from_dict, preset_names,
                                        workload_from_dict)
from megatron_lite.planner.training_time import estimate_training
from megatron_lite.planner.inference_time import estimate_inference

GROUPS = ("model", "cluster", "workload")


def compose(argv: list[str]):
    """The composed plan config; unknown presets name the valid ones."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") in GROUPS and value not in preset_names(key.lstrip("+~")):
            raise ValueError(f"unknown {key.lstrip('+~')} {value!r}; valid names: "
                             f"{', '.join(n for n in preset_names(key.lstrip('+~')) if n != 'hf')}")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="plan", overrides=list(argv))
    except HydraException as err:
        raise ValueError(f"bad override: {err}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def run(cfg: dict) -> tuple[Plan, dict]:
    model = model_from_dict(cfg["model"])
    cluster = cluster_from_dict(cfg["cluster"])
    workload = workload_from_dict(cfg["workload"])
    question = {"model": cfg["model"]["name"], "cluster": cluster.name, "num_gpus": cluster.num_gpus,
                "workload": {k: v for k, v in cfg["workload"].items()}}
    fixed = cfg["layout"]
    if fixed.get("tp") is not None:
        layout = Layout(**{k: v for k, v in fixed.items() if v is not None})
        reason = structural_reason(model, cluster, workload, layout)
        if reason:
            raise ValueError(f"layout {layout.describe()} cannot run: {reason}")
        estimate = (estimate_training(model, cluster, workload, layout) if workload.kind == "training" else
                    estimate_inference(model, cluster, workload, layout, with_latency=cfg["with_latency"]))
        question["memory_check"] = memory_reason(estimate, cluster) or "fits"
        return Plan([estimate], []), question
    if not cfg["with_latency"] and workload.kind == "inference":
        raise ValueError("with_latency=false is for one layout (layout.tp=.. layout.pp=.. layout.dp=..)")
    schedules = tuple(cfg.get("schedules") or ("1f1b",))
    return search(model, cluster, workload, objective=cfg["objective"], schedules=schedules), question


def main(argv: list[str]) -> int:
    try:
        cfg = compose(argv)
        plan, question = run(cfg)
    except (ValueError, TypeError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    workload = workload_from_dict(cfg["workload"])
    cluster = cluster_from_dict(cfg["cluster"])
    print(f"{question['model']} on {cluster.name} ({cluster.num_gpus} GPUs, "
          f"{cluster.memory_bytes / GIB:.0f} GiB each), "
          f"{workload.kind} {workload.dtype}")
    print(table(plan, workload, cfg["top"]))
    if "memory_check" in question:
        print(f"memory: {question['memory_check']}")
    else:
        print(rejected_summary(plan))
    print(f"chosen: {plan.best.layout.describe()}")
    if cfg["json"]:
        with open(cfg["json"], "w") as f:
            json.dump(plan_dict(plan, question), f, indent=1)
    if cfg["png"]:
        draw(plan, cluster, workload, cfg["png"], f"{question['model']} on {cluster.name}, {workload.kind}")
    return 0
