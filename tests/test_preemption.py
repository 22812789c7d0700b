"""A stop signal mid-run: every rank stops after the same step, checkpoints and exits 0; the resumed
run ends with exactly the losses of an uninterrupted run. Ranks are launched the way torchrun and
srun launch them (environment variables), and the signal reaches one non-logging rank only."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["parallel.dp=2", "trainer.max_steps=16", "trainer.seq_length=64", "trainer.log_interval=1",
          "trainer.eval_interval=100", "trainer.sample_tokens=0", "optim.warmup_steps=4"]


def _args(tmp_path, ckpt):
    return [sys.executable, str(ROOT / "scripts" / "train.py"), f"data.cache_dir={tmp_path / 'data'}",
            f"checkpoint.dir={tmp_path / ckpt}", f"hydra.run.dir={tmp_path / 'out'}", *COMMON]


def _losses(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"step\s+(\d+)/\d+ \| loss (\S+)", text)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_signal_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    reference = subprocess.run(_args(tmp_path, "ckpt_ref"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _losses(reference.stdout)
    assert len(expected) == 16

    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen(_args(tmp_path, "ckpt"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logged = []
    deadline = time.monotonic() + 240
    for line in procs[0].stdout:  # rank 0 logs; wait until training is under way
        logged.append(line)
        if re.search(r"step\s+3/16", line):
            procs[1].send_signal(signal.SIGUSR1)
            break
        assert time.monotonic() < deadline, "".join(logged)
    outputs = ["".join(logged) + procs[0].stdout.read()]
    outputs.append(procs[1].stdout.read())
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], outputs
    assert "stop signal: stopped after step" in outputs[0] and "checkpoint saved" in outputs[0]
    stopped_at = max(_losses(outputs[0]))
    assert 3 <= stopped_at < 16, "the run must stop early, after the step where the signal arrived"

    resumed = subprocess.run(_args(tmp_path, "ckpt"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after step {stopped_at}" in resumed.stdout
    after = _losses(resumed.stdout)
    assert sorted(after) == list(range(stopped_at + 1, 17))
    for step, loss in {**_losses(outputs[0]), **after}.items():
        assert loss == expected[step], (step, loss, expected[step])
