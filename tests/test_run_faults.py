"""Faults a researcher's run meets, injected into real launches of scripts/train.py: nothing is lost,
nothing is mixed up, no process outlives the job, and a resumed run continues with exactly the losses
of an uninterrupted one.

The runs are small (llama_tiny, 32-token sequences, 2 CPU processes at most except the README's main
job) so that the whole file takes about two minutes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")
FAST = ["trainer.seq_length=32", "trainer.log_interval=1", "trainer.eval_interval=1000", "trainer.eval_batches=1",
        "trainer.sample_tokens=0", "optim.warmup_steps=2", "logging.wandb.mode=disabled"]
RUN = [*FAST, "parallel.dp=2", "trainer.max_steps=12", "checkpoint.interval=2"]


def _env(token: str | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    if token:
        env["FAULT_TEST_TOKEN"] = token
    return env


def _train(cwd: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *overrides], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _start(cwd: Path, token: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN, *overrides], cwd=cwd, env=_env(token), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _read_until(proc: subprocess.Popen, pattern: str, timeout_s: float = 120) -> str:
    seen, deadline = [], time.monotonic() + timeout_s
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"the run ended before {pattern!r}:\n{''.join(seen)}\n{proc.stderr.read()[-3000:]}")


def _losses(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"step\s+(\d+)/\d+ \| loss (\S+)", text)}


def _processes_with(token: str) -> list[int]:
    """Live processes started with FAULT_TEST_TOKEN=token in their environment (zombies excluded)."""
    needle = f"FAULT_TEST_TOKEN={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _ranks_of(launcher: int, token: str) -> list[int]:
    """The rank processes: the forkserver's children (the launcher's own children are the forkserver
    and multiprocessing's resource tracker)."""
    procs = [pid for pid in _processes_with(token) if pid != launcher]
    return [pid for pid in procs if _parent(pid) != launcher]


def _wait_gone(token: str, timeout_s: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := _processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpt.glob("step_*") if re.fullmatch(r"step_\d{8}", p.name))


def _snapshot(directory: Path) -> dict[str, int]:
    """Every file and its modification time, but the lock file (each launch takes the lock)."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.name != ".lock"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"data.cache_dir={tmp_path_factory.mktemp('data_cache')}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> dict[int, str]:
    """The losses of the uninterrupted run every resumed one must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("reference")
    done = _train(tmp, *RUN, cache, f"hydra.run.dir={tmp / 'out'}")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _losses(done.stdout)
    assert sorted(losses) == list(range(1, 13))  # logged as steps 1..12
    return losses


def test_readme_commands_in_order_each_train_from_step_zero_in_their_own_directory(tmp_path, cache):
    """The README's main job, then its model=gpt2_tiny example, then its two-point sweep, all with the
    shipped checkpoint defaults, from one launch directory: none resumes another."""
    short = [*FAST, "trainer.max_steps=2", cache]
    commands = [["parallel=3d_cpu", *short], ["model=gpt2_tiny", "parallel.tp=4", *short],
                ["-m", "optim.lr=1e-3,3e-3", *short]]
    seen_dirs = []
    for command in commands:
        done = _train(tmp_path, *command)
        assert done.returncode == 0, (command, done.stderr[-3000:])
        assert "resumed" not in done.stdout, done.stdout
        points = 2 if command[0] == "-m" else 1
        assert len(re.findall(r"step\s+1/2 \| loss", done.stdout)) == points, done.stdout
        dirs = re.findall(r"checkpoints: (\S+)", done.stdout)
        assert len(dirs) == points, done.stdout
        seen_dirs += dirs
    assert len(set(seen_dirs)) == 4, seen_dirs
    for directory in seen_dirs:
        assert Path(directory).is_relative_to(tmp_path) and _steps(Path(directory)) == [2], directory


def test_sigterm_to_the_launcher_saves_exits_0_and_leaves_no_process(tmp_path, cache, reference):
    """SIGTERM reaches the ranks through the local launcher, which waits for their save; the resumed run,
    and the runs that must fall back from a corrupt newest step or a garbage `latest`, all continue with
    the uninterrupted losses."""
    token, out, ckpt = uuid.uuid4().hex, tmp_path / "out", tmp_path / "ckpt"
    args = [*RUN, cache, f"hydra.run.dir={out}"]
    proc = _start(tmp_path, token, *args, f"checkpoint.dir={ckpt}")
    head = _read_until(proc, r"step\s+5/12")
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "checkpoint saved" in rest, rest
    assert _wait_gone(token) == [], "processes left behind after the launcher exited"
    first = _losses(head + rest)
    saved = max(first)  # the last step shown (1-based) is the number of steps the checkpoint holds
    assert 5 <= saved < 12 and saved in _steps(ckpt), (saved, _steps(ckpt))
    assert all(first[step] == reference[step] for step in first)

    # Three copies of the stopped run's checkpoints: intact, newest step corrupted, `latest` garbage.
    corrupt, garbage = tmp_path / "corrupt", tmp_path / "garbage"
    shutil.copytree(ckpt, corrupt)
    shutil.copytree(ckpt, garbage)
    data_file = sorted((corrupt / f"step_{saved:08d}").glob("*.distcp"))[0]
    payload = bytearray(data_file.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    data_file.write_bytes(bytes(payload))
    (garbage / "latest").write_bytes(os.urandom(64))
    previous = max(s for s in _steps(corrupt) if s < saved)

    for directory, resumed_at in ((ckpt, saved), (corrupt, previous), (garbage, saved)):
        done = _train(tmp_path, *args, f"checkpoint.dir={directory}")
        assert done.returncode == 0, (directory, done.stderr[-3000:])
        assert f"resumed after step {resumed_at}" in done.stdout, (directory, done.stdout, done.stderr[-2000:])
        after = _losses(done.stdout)
        assert sorted(after) == list(range(resumed_at + 1, 13)), directory
        assert all(after[step] == reference[step] for step in after), directory
    kept = [p.name for p in corrupt.iterdir() if p.name.startswith(f"step_{saved:08d}")]
    assert kept, "the corrupt step was deleted: nothing recoverable may be"


def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(tmp_path, cache):
    token = uuid.uuid4().hex
    proc = _start(tmp_path, token, *FAST, cache, "parallel.dp=2", "trainer.max_steps=100000", "checkpoint.dir=null",
                  "parallel.timeout_s=5", f"hydra.run.dir={tmp_path / 'out'}")
    _read_until(proc, r"step\s+3/")
    ranks = _ranks_of(proc.pid, token)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    took = time.monotonic() - stopped_at
    assert proc.returncode == 1, err[-3000:]
    assert re.search(r"error: rank \d stopped responding", err), err[-3000:]
    assert "stopped (SIGSTOP" in err and "parallel.timeout_s=5" in err, err[-3000:]
    assert took < 5 + 15, f"the job took {took:.0f} s to end after a rank stopped"
    assert _wait_gone(token) == []


def test_ranks_die_with_a_killed_launcher(tmp_path, cache):
    token = uuid.uuid4().hex
    proc = _start(tmp_path, token, *FAST, cache, "parallel.dp=2", "trainer.max_steps=100000", "checkpoint.dir=null",
                  f"hydra.run.dir={tmp_path / 'out'}")
    _read_until(proc, r"step\s+2/")
    assert len(_ranks_of(proc.pid, token)) == 2
    proc.kill()
    proc.wait(timeout=10)
    assert _wait_gone(token, timeout_s=10) == [], "ranks outlived a kill -9 of their launcher"


def test_a_diverged_run_stops_after_max_skipped_steps_and_saves_nothing_non_finite(tmp_path, cache):
    ckpt = tmp_path / "ckpt"
    done = _train(tmp_path, *FAST, cache, "optim.lr=1e30", "optim.min_lr=0", "optim.warmup_steps=0",
                  "trainer.max_steps=50", "trainer.max_skipped_steps=3", "checkpoint.interval=1",
                  f"checkpoint.dir={ckpt}", f"hydra.run.dir={tmp_path / 'out'}")
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 steps in a row" in errors[0] and "max_skipped_steps=3" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    losses = _losses(done.stdout)
    shown = re.findall(r"step\s+(\d+)/\d+ \| loss (\S+) .*?\| gnorm (\S+)", done.stdout)
    non_finite = sorted(int(step) for step, *values in shown if {"nan", "inf", "-inf"} & set(values))
    assert len(non_finite) == 3, f"the non-finite loss or grad norm must be shown on the console:\n{done.stdout}"
    assert max(losses) < 49
    assert all(saved <= non_finite[0] for saved in _steps(ckpt)), (_steps(ckpt), non_finite)


def test_concurrent_and_later_runs_cannot_touch_another_runs_checkpoints(tmp_path, cache):
    token, shared = uuid.uuid4().hex, tmp_path / "shared"
    first = _start(tmp_path, token, *FAST, cache, "trainer.max_steps=100000", "checkpoint.interval=2",
                   f"checkpoint.dir={shared}", f"hydra.run.dir={tmp_path / 'first'}")
    _read_until(first, r"step\s+3/")
    second = _train(tmp_path, *FAST, cache, "trainer.max_steps=4", f"checkpoint.dir={shared}",
                    f"hydra.run.dir={tmp_path / 'second'}", timeout=60)
    assert second.returncode == 2 and "in use by a live job" in second.stderr, second.stderr[-2000:]
    first.send_signal(signal.SIGTERM)
    rest, err = first.communicate(timeout=60)
    assert first.returncode == 0 and "checkpoint saved" in rest, err[-3000:]
    saved = _snapshot(shared)

    later = _train(tmp_path, *FAST, cache, "trainer.max_steps=4", f"checkpoint.dir={shared}",
                   f"hydra.run.dir={tmp_path / 'later'}", timeout=60)
    assert later.returncode == 2 and "holds the checkpoints of run" in later.stderr, later.stderr[-2000:]
    assert "checkpoint.resume_from" in later.stderr
    fresh_over_own = _train(tmp_path, *FAST, cache, "trainer.max_steps=4", "checkpoint.resume=false",
                            f"checkpoint.dir={shared}", f"hydra.run.dir={tmp_path / 'first'}", timeout=60)
    assert fresh_over_own.returncode == 2 and "would write over them" in fresh_over_own.stderr
    assert _snapshot(shared) == saved, "the refused runs changed files"

    # Continuing it is explicit, writes into the new run's own directory and leaves the source alone.
    newest = max(_steps(shared))
    cont = _train(tmp_path, *FAST, cache, f"trainer.max_steps={newest + 2}", f"checkpoint.resume_from={shared}",
                  f"hydra.run.dir={tmp_path / 'continued'}", timeout=120)
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert f"resumed after step {newest} of checkpoint.resume_from={shared}" in cont.stdout, cont.stdout
    assert _steps(tmp_path / "continued" / "checkpoints") == [newest + 2]
    assert _snapshot(shared) == saved


def test_resuming_with_another_model_says_what_differs(tmp_path, cache):
    out, common = tmp_path / "out", [*FAST, cache, "trainer.max_steps=2"]
    assert _train(tmp_path, *common, f"hydra.run.dir={out}").returncode == 0
    for override, difference in (("model.num_layers=2", "model.num_layers: checkpoint 4, this run 2"),
                                 ("model.rope_theta=500.0", "model.rope_theta: checkpoint 10000.0, this run 500.0")):
        done = _train(tmp_path, *common, override, f"hydra.run.dir={out}", timeout=60)
        assert done.returncode == 2, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and difference in errors[0], done.stderr
        assert "Traceback" not in done.stderr
    owner = json.loads((out / "checkpoints" / "run.json").read_text())
    assert owner["run_id"] == f"run-dir:{out}"


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: room for one llama_tiny checkpoint (about 10 MB with Adam's state), not two."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_save_on_a_full_disk_leaves_no_temp_directory_and_the_previous_checkpoint_intact(tmp_path, cache,
                                                                                          small_disk):
    from megatron_lite.checkpoint import select_checkpoint, verify_checkpoint

    ckpt = small_disk / "ckpt"
    done = _train(tmp_path, *FAST, cache, "trainer.max_steps=4", "checkpoint.interval=2", f"checkpoint.dir={ckpt}",
                  f"hydra.run.dir={tmp_path / 'out'}")
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "saving checkpoint step 4" in errors[0], done.stderr
    assert "No space left on device" in errors[0] or "the disk is full" in errors[0], errors[0]
    assert "MiB free on" in errors[0] and "the previous checkpoint (step 2) is intact" in errors[0], errors[0]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    assert verify_checkpoint(str(ckpt / "step_00000002")) is None
    assert select_checkpoint(str(ckpt)) == 2
