"""The training script end to end: bad overrides fail fast, a small 3D run learns."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.training.config import parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,message", [
    ("parallel.tpp=2", "Key 'tpp' not in 'ParallelConfig'"),
    ("parallel.tp=two", "Value 'two' of type 'str' could not be converted to Integer"),
    ("parallel.tp=3", "model.num_heads=4 is not divisible by parallel.tp=3"),
    ("model=gpt5", "unknown model 'gpt5'"),
    ("parallel.schedule=zigzag", "parallel.schedule='zigzag'"),
    ("parallel.pp=2 parallel.schedule=interleaved_1f1b parallel.virtual_stages=2 parallel.microbatches=3",
     "multiple of pp=2, got 3"),
])
def test_bad_overrides_fail_fast_with_a_clear_message(override, message):
    result = run_train(*override.split(), timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_parse_overrides_types():
    cfg = parse_overrides(["parallel.tp=2", "optim.lr=1e-3", "trainer.max_steps=7"])
    assert (cfg.parallel.tp, cfg.optim.lr, cfg.trainer.max_steps) == (2, 1e-3, 7)


def test_3d_training_run_learns(tmp_path):
    result = run_train("parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.microbatches=2",
                       "trainer.max_steps=12", "trainer.seq_length=64", "trainer.eval_interval=6",
                       "trainer.log_interval=1", f"data.cache_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.split("loss")[1].split("|")[0]) for line in result.stdout.splitlines()
              if line.startswith("step") and "| loss" in line]
    val = [float(line.split("validation loss")[1].split("|")[0]) for line in result.stdout.splitlines()
           if "validation loss" in line]
    assert len(losses) == 12 and len(val) == 2
    assert losses[-1] < losses[0] - 1.0  # from ~ln(257) = 5.5 towards the byte entropy of English
    assert val[1] < val[0]
