"""Generate text: `python scripts/generate.py prompt="ROMEO:" max_new_tokens=64 checkpoint.resume_from=DIR`.

Hydra composes conf/generate.yaml (the training config plus the generation keys): the same model and
layout options as training (`model=hf model.path=DIR`, `parallel.tp=2 parallel.pp=2 parallel.dp=2`).
With more than one rank the script starts tp*pp*dp local processes itself, or joins the job as one
rank under torchrun or srun. One prompt streams to the
console; many (prompts_file=...) are written as JSONL. Time to first token, time per output token,
tokens/s and the KV-cache memory of every rank are printed at the end. Exit codes: 0 done, 1 a rank
failed, 2 a bad configuration or input (nothing was started).
"""

import sys

import hydra
from omegaconf import DictConfig

from megatron_lite.checkpoint import CheckpointError
from megatron_lite.inference.cli import check, generate_rank, split_config
from megatron_lite.parallel.device import choose_device, visible_gpus
from megatron_lite.parallel.spawn import RankFailure, run_on_ranks
from megatron_lite.training.setup import resolve_data_parallel
from megatron_lite.training.launch import (distributed_env, init_from_env, leave_process_group, ranks_on_this_node,
                                           register_resolvers)


def _fail(message: str, code: int) -> None:
    print(f"error: {' '.join(message.split()) if code == 2 else message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="../conf", config_name="generate", version_base=None)
def main(composed: DictConfig) -> None:
    try:
        cfg, options = split_config(composed)
        env = distributed_env()
        cfg = resolve_data_parallel(cfg, env.world_size if env else None)
        prompts = check(cfg, options)
        world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
        if env and env.world_size != world:
            raise ValueError(f"the launcher started {env.world_size} processes but parallel.tp*pp*dp = {world}")
        device = choose_device(cfg.parallel.device, ranks_on_this_node(env) if env else world, visible_gpus())
        if world == 1:
            generate_rank(0, 1, cfg, options, prompts)
            return
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        _fail(str(err), 2)
    if env:  # torchrun / srun: this process is one rank of the job
        init_from_env(env, timeout_s=cfg.parallel.timeout_s, device=cfg.parallel.device)
        generate_rank(env.rank, env.world_size, cfg, options, prompts)
        leave_process_group()
        return
    try:
        run_on_ranks(generate_rank, world, cfg, options, prompts, timeout_s=None, backend=device.backend,
                     collective_timeout_s=cfg.parallel.timeout_s)
    except RankFailure as failure:
        _fail(str(failure), 1)


if __name__ == "__main__":
    register_resolvers()
    main()
