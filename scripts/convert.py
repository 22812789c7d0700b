"""Convert between megatron-lite checkpoints and Hugging Face directories.

    python scripts/convert.py to_hf checkpoint=outputs/<run>/checkpoints out=my_model_hf
        [step=N] [like=HF_DIR] [dtype=bf16] [max_shard_size=5GB]
    python scripts/convert.py from_hf hf=HF_DIR out=checkpoints_from_hf [precision=fp32]

to_hf reads a checkpoint written by any layout (ZeRO-1 included) in one process, one output shard at
a time; `like` (default: the directory the run imported with model=hf, if it still exists) gives
the file layout, dtypes, config.json extras and tokenizer files to mirror. from_hf writes a step-0
checkpoint to start runs from with checkpoint.resume_from=...; training can also import online:
scripts/train.py model=hf model.path=HF_DIR. Exit codes: 0 done, 2 bad input (nothing written).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

try:
    import megatron_lite  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.checkpoint import CheckpointError
from megatron_lite.training.config import PRECISIONS

DIRECTIONS = ("to_hf", "from_hf")


@dataclass
class ConvertConfig:
    checkpoint: Optional[str] = None  # to_hf: a checkpoint directory (its step_* subdirectories)
    step: Optional[int] = None  # to_hf: this step instead of the newest usable one
    like: Optional[str] = None  # to_hf: a Hugging Face directory whose files to mirror
    dtype: Optional[str] = None  # to_hf: fp32 | bf16 | fp16 for every tensor (default: like's, else the saved one)
    max_shard_size: str = "5GB"  # to_hf without `like`: largest safetensors file
    hf: Optional[str] = None  # from_hf: the Hugging Face directory
    precision: str = "fp32"  # from_hf: the checkpoint's model dtype
    out: Optional[str] = None  # a new (or empty) directory


def main(argv: list[str]) -> int:
    from megatron_lite.interop import HFCheckpointError, UnsupportedModel, export_checkpoint
    from megatron_lite.interop.hf_dir import parse_size
    from megatron_lite.interop.to_checkpoint import hf_to_checkpoint

    try:
        if not argv or argv[0] not in DIRECTIONS:
            raise ValueError(f"the first argument is the direction, one of {DIRECTIONS}; got {argv[:1]}")
        direction = argv[0]
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ConvertConfig), OmegaConf.from_dotlist(argv[1:])))
        for name in ("dtype", "precision"):
            if getattr(cfg, name) is not None and getattr(cfg, name) not in PRECISIONS:
                raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {tuple(PRECISIONS)}")
        needed = ("checkpoint", "out") if direction == "to_hf" else ("hf", "out")
        missing = [n for n in needed if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"{direction} needs {' and '.join(f'{n}=...' for n in missing)}")
        if direction == "to_hf":
            path = export_checkpoint(cfg.checkpoint, cfg.out, cfg.step, cfg.like,
                                     PRECISIONS[cfg.dtype] if cfg.dtype else None, parse_size(cfg.max_shard_size))
        else:
            path = hf_to_checkpoint(cfg.hf, cfg.out, PRECISIONS[cfg.precision])
    except (OmegaConfBaseException, ValueError, FileNotFoundError, CheckpointError, HFCheckpointError,
            UnsupportedModel) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
