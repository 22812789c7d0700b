"""Train a model: `python scripts/train.py parallel=3d_cpu trainer.max_steps=100 logging=offline`.

Hydra composes conf/config.yaml with the overrides (sweeps with `-m`). Under torchrun or srun (RANK
and WORLD_SIZE set) each process joins the job; run directly, the script starts tp*pp*dp local
processes itself. Only one process writes Hydra's output folder.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from megatron_lite.parallel.spawn import RankFailure, run_on_ranks
from megatron_lite.training.config import to_run_config
from megatron_lite.training.launch import distributed_env, init_from_env, leave_process_group
from megatron_lite.training.preflight import check_inputs, check_overrides
from megatron_lite.training.setup import check_run_config, resolve_data_parallel
from megatron_lite.training.trainer import run_rank, train

# Hydra writes its folder and logs from every process it runs in; under a multi-process launcher
# only global rank 0 may, so the others compose the same config without any output.
_QUIET_HYDRA = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                "hydra.run.dir=."]


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(composed: DictConfig) -> None:
    env = distributed_env()
    try:
        check_overrides(list(HydraConfig.get().overrides.task))
        cfg = resolve_data_parallel(to_run_config(composed), env.world_size if env else None)
        check_run_config(cfg, env.world_size if env else cfg.world_size)
        check_inputs(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    output_dir = HydraConfig.get().runtime.output_dir if not env or env.rank == 0 else None
    if env:
        init_from_env(env)
        train(cfg, output_dir)
        leave_process_group()
    elif cfg.world_size == 1:
        train(cfg, output_dir)
    else:
        try:
            run_on_ranks(run_rank, cfg.world_size, cfg, output_dir, timeout_s=7 * 24 * 3600)
        except RankFailure as failure:
            print(f"error: {failure}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    launched = distributed_env()
    if launched and launched.rank > 0:
        sys.argv += _QUIET_HYDRA
    main()
