"""Train a model: `python scripts/train.py parallel=3d_cpu trainer.max_steps=100 logging=offline`.

Hydra composes conf/config.yaml with the overrides (sweeps with `-m`). Under torchrun or srun (RANK
and WORLD_SIZE set) each process joins the job; run directly, the script starts tp*pp*dp local
processes itself, supervises them (signals forwarded, no rank outlives it) and decides what they
resume from. Only one process writes Hydra's output folder. Exit codes: 0 done (or stopped by a
signal after saving), 1 the run failed, 2 a bad configuration or input (nothing was started).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from megatron_lite.checkpoint import CheckpointError
from megatron_lite.parallel.device import choose_device, visible_gpus
from megatron_lite.parallel.spawn import RankFailure, run_on_ranks
from megatron_lite.training.config import to_run_config
from megatron_lite.training.launch import (distributed_env, init_from_env, leave_process_group, ranks_on_this_node,
                                           register_resolvers)
from megatron_lite.training.preflight import check_inputs, check_overrides, scrub_hydra_output
from megatron_lite.training.resume import plan_resume
from megatron_lite.training.setup import check_run_config, resolve_data_parallel
from megatron_lite.training.trainer import RunStopped, run_rank, train

# Hydra writes its folder and logs from every process it runs in; under a multi-process launcher
# only global rank 0 may, so the others compose the same config without any output.
_QUIET_HYDRA = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                "hydra.run.dir=."]


def _fail(message: str, code: int) -> None:
    """code 2 (bad input): one line, whatever the message; a failed run keeps its rank's traceback."""
    print(f"error: {' '.join(message.split()) if code == 2 else message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(composed: DictConfig) -> None:
    env = distributed_env()
    try:
        check_overrides(list(HydraConfig.get().overrides.task))
        cfg = resolve_data_parallel(to_run_config(composed), env.world_size if env else None)
        check_run_config(cfg, env.world_size if env else cfg.world_size)
        check_inputs(cfg)
        ranks_here = ranks_on_this_node(env) if env else cfg.world_size
        device = choose_device(cfg.parallel.device, ranks_here, visible_gpus())
    except ValueError as err:
        _fail(str(err), 2)
    if device.note and (not env or env.local_rank == 0):
        print(f"warning: {device.note}", file=sys.stderr)
    output_dir = HydraConfig.get().runtime.output_dir if not env or env.rank == 0 else None
    if output_dir:
        scrub_hydra_output(output_dir)
    if env:  # torchrun / srun: rank 0 decides what every rank resumes from (trainer.decide_resume)
        init_from_env(env, timeout_s=cfg.parallel.timeout_s, device=cfg.parallel.device)
        try:
            train(cfg, output_dir)
        except RunStopped as err:
            if env.rank == 0:
                print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        leave_process_group()
        return
    try:
        plan, lock = plan_resume(cfg, output_dir)
    except (ValueError, CheckpointError, OSError) as err:
        _fail(str(err), 2)
    try:
        if cfg.world_size == 1:
            train(cfg, output_dir, plan)
        else:
            run_on_ranks(run_rank, cfg.world_size, cfg, output_dir, plan, timeout_s=None, backend=device.backend,
                         collective_timeout_s=cfg.parallel.timeout_s, forward_signals=True)
    except RunStopped as err:
        _fail(str(err), 1)
    except RankFailure as failure:
        _fail(f"{failure}" + (f"\n(parallel.timeout_s={cfg.parallel.timeout_s:g})"
                              if "stopped responding" in str(failure) else ""), 1)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    register_resolvers()
    launched = distributed_env()
    if launched and launched.rank > 0:
        sys.argv += _QUIET_HYDRA
    main()
