"""The project's sbatch templates on a real SLURM cluster started on this machine (tests/slurm_cluster.py):
a 3D job over 2 nodes x 4 tasks, preemption with requeue and exact resume, a crashing rank, and a
Hydra sweep through the submitit launcher. Skipped, with the reason, where SLURM cannot run."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lite.training.logging import read_offline_run
from slurm_cluster import LocalSlurmCluster, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
CPU_TEMPLATE = ROOT / "slurm" / "train_cpu.sbatch"
SHORT_RUN = ["trainer.seq_length=64", "trainer.log_interval=1", "trainer.eval_interval=100", "trainer.sample_tokens=0",
             "optim.warmup_steps=2"]

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=4) as running:
        yield running


def _job_env() -> dict[str, str]:
    # The job runs this interpreter; gloo talks over loopback like the emulated nodes.
    return {"PYTHON": sys.executable, "PROJECT": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}


def _run_args(tmp_path: Path, ckpt: str = "ckpt") -> list[str]:
    return [f"data.cache_dir={tmp_path / 'data'}", f"checkpoint.dir={tmp_path / ckpt}",
            f"hydra.run.dir={tmp_path / 'out'}", *SHORT_RUN]


def _losses(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"step\s+(\d+)/\d+ \| loss (\S+)", text)}


def _submit(cluster, tmp_path, *overrides, options=(), env=None) -> tuple[str, Path]:
    log = tmp_path / "job.out"
    job_id = cluster.submit(CPU_TEMPLATE, *overrides, sbatch_options=("--output", str(log), *options),
                            cwd=ROOT, env={**_job_env(), **(env or {})})
    return job_id, log


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _wait_for_log(log: Path, pattern: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, _read(log)):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log after {timeout_s:.0f} s:\n{_read(log)[-4000:]}"
        time.sleep(0.5)


def test_3d_job_on_two_nodes_trains_and_checkpoints(cluster, tmp_path):
    job_id, log = _submit(cluster, tmp_path, *_run_args(tmp_path), "trainer.max_steps=4")
    job = cluster.wait(job_id, timeout_s=240)
    out = _read(log)
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), f"{job.fields}\n{out[-4000:]}"

    # Each node line lists its ranks with their coordinates: "node NAME: 0[pp0 dp0 tp0] 1[...] ...".
    placement = {}
    for node, ranks in re.findall(r"node (\S+): ((?:\d+\[pp\d+ dp\d+ tp\d+\] ?)+)", out):
        for rank, pp, dp, tp in re.findall(r"(\d+)\[pp(\d+) dp(\d+) tp(\d+)\]", ranks):
            placement[int(rank)] = (node, int(pp), int(dp), int(tp))
    assert sorted(placement) == list(range(8)), out[-4000:]
    assert {node for node, *_ in placement.values()} == set(cluster.node_names)
    assert sum(node == cluster.node_names[0] for node, *_ in placement.values()) == 4
    # TP neighbours (same pp and dp coordinates) share a node.
    for rank, (node, pp, dp, tp) in placement.items():
        partners = [n for r, (n, p, d, _) in placement.items() if (p, d) == (pp, dp) and r != rank]
        assert partners == [node], (rank, placement)
    assert "every tp group is within one node" in out
    assert "tp=2 pp=2 dp=2" in out
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    assert (tmp_path / "ckpt" / "latest").exists()


def test_preempted_job_checkpoints_requeues_and_ends_with_the_uninterrupted_loss(cluster, tmp_path):
    # The CPU template starts from parallel=3d_cpu; the global batch (16) stays what it is.
    overrides = ["parallel.tp=1", "parallel.pp=1", "parallel.dp=2", "trainer.max_steps=14"]
    two_nodes = ("--nodes=2", "--ntasks-per-node=1")
    reference = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *_run_args(tmp_path, "ckpt_ref"),
                                *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _losses(reference.stdout)
    assert sorted(expected) == list(range(1, 15))

    wandb_dir = tmp_path / "wandb"
    job_id, log = _submit(cluster, tmp_path, *_run_args(tmp_path), *overrides, "logging.wandb.mode=offline",
                          f"logging.wandb.dir={wandb_dir}", options=two_nodes)
    _wait_for_log(log, r"step\s+3/14", timeout_s=90)
    cluster.signal(job_id, "USR1")
    # A job that completes without a restart (its requeue failed) ends the wait too, and the log says why.
    # The wait is well inside pytest's timeout, so a stuck requeue shows the job, its log and the daemons'.
    try:
        job = cluster.wait(job_id, timeout_s=120, until=lambda j: j.state in {"COMPLETED", "FAILED", "CANCELLED",
                                                                              "TIMEOUT", "NODE_FAIL"})
    except TimeoutError as stuck:
        pytest.fail(f"{stuck}\n--- job log\n{_read(log)[-4000:]}\n{cluster.daemon_logs()}")
    out = _read(log)
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", "0:0", 1), f"{job.fields}\n{out[-4000:]}"
    assert "restart 1" in out, out[-4000:]
    stopped = re.search(r"stop signal: stopped after step (\d+), checkpoint saved, requeueing job (\d+)", out)
    assert stopped and stopped.group(2) == job_id, out[-4000:]
    stopped_after = int(stopped.group(1))
    assert 3 <= stopped_after < 14, "the signal must stop the run early"
    assert f"resumed after step {stopped_after}" in out
    second_run = out[out.index("restart 1"):]
    losses = _losses(second_run)
    assert sorted(losses) == list(range(stopped_after + 1, 15))
    assert losses[14] == expected[14], (losses, expected)
    for step, loss in {**_losses(out[:out.index("restart 1")]), **losses}.items():
        assert loss == expected[step], (step, loss, expected[step])

    # The requeued job resumed its own W&B run: two offline pieces of one run id, every step once.
    runs = [read_offline_run(d) for d in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] and runs[0]["id"], [r["id"] for r in runs]
    steps = [[row["_step"] for row in run["history"]] for run in runs]
    assert steps == [list(range(1, stopped_after + 1)), list(range(stopped_after + 1, 15))], steps
    assert [f"{runs[1]['history'][-1]['train/loss']:.4f}"] == [expected[14]]


def test_a_crashing_rank_ends_the_job_with_its_traceback(cluster, tmp_path):
    # sbatch exports the submitting environment to every task: rank 5 raises once step 2 is done.
    job_id, log = _submit(cluster, tmp_path, *_run_args(tmp_path), "trainer.max_steps=50", "checkpoint.dir=null",
                          env={"MEGATRON_LITE_CRASH_RANK": "5", "MEGATRON_LITE_CRASH_AFTER_STEP": "2"})
    _wait_for_log(log, r"step\s+1/50", timeout_s=240)
    job = cluster.wait(job_id, timeout_s=60)  # the crash comes one step later; the job must end soon after
    out = _read(log)
    assert job.state == "FAILED" and job.exit_code != "0:0", f"{job.fields}\n{out[-4000:]}"
    assert "Traceback (most recent call last)" in out, out[-4000:]
    assert "MEGATRON_LITE_CRASH_RANK=5: crashing after step 2" in out, out[-4000:]
    assert not re.search(r"step\s+50/50", out)


def test_hydra_sweep_runs_each_point_as_a_slurm_job(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "hydra/launcher=submitit_slurm",
         "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1", "hydra.launcher.timeout_min=10",
         f"hydra.sweep.dir={sweep_dir}", f"data.cache_dir={tmp_path / 'data'}", "checkpoint.dir=null",
         "parallel.dp=null", "trainer.max_steps=3", *SHORT_RUN, "optim.lr=1e-3,3e-3"],
        cwd=tmp_path, env={**cluster.env, **_job_env()}, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = sorted((sweep_dir / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2, sorted(p.name for p in (sweep_dir / ".submitit").rglob("*"))
    lrs = set()
    for path in logs:
        text = path.read_text()
        assert "tp=1 pp=1 dp=2" in text and sorted(_losses(text)) == [1, 2, 3], text[-3000:]
        lrs.update(re.findall(r"lr (\S+)", text)[-1:])
    assert len(lrs) == 2, "each sweep point trains with its own learning rate"
