"""Train a model: `python scripts/train.py parallel.tp=2 parallel.dp=2 trainer.max_steps=100`.

Under torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR) each process joins the job;
run directly, it starts tp*pp*dp local processes itself.
"""

import os
import sys

from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.training.config import parse_overrides
from megatron_lite.training.trainer import check_run_config, train


def _rank_main(rank, world_size, cfg):
    return train(cfg)


def main(argv: list[str]) -> int:
    try:
        cfg = parse_overrides(argv)
        world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
        check_run_config(cfg, int(os.environ.get("WORLD_SIZE", world)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("nccl" if os.environ.get("LOCAL_RANK") and _cuda() else "gloo")
        train(cfg)
        dist.destroy_process_group()
    elif world == 1:
        train(cfg)
    else:
        run_on_ranks(_rank_main, world, cfg, timeout_s=24 * 3600)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
