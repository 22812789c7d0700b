"""Where a process sits in a job, from torchrun's or srun's environment (the variables as SLURM 22.05
sets them in a batch script and in an srun task, recorded on the local test cluster)."""

import re

from megatron_lite.training.launch import distributed_env, first_host, port_for_job, run_directory_name

SRUN_TASK = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "MASTER_ADDR": "gpu07"}
BATCH_SHELL = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_srun_task_is_a_rank_of_the_job():
    env = distributed_env(SRUN_TASK)
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.source) == (5, 8, 1, 1, "slurm")
    assert (env.master_addr, env.master_port) == ("gpu07", port_for_job("4242"))


def test_master_is_the_first_node_of_the_step_not_of_the_job():
    task = {k: v for k, v in SRUN_TASK.items() if k != "MASTER_ADDR"}
    assert distributed_env(task).master_addr == "gpu07"
    assert distributed_env({**task, "SLURM_STEP_NODELIST": "gpu08"}).master_addr == "gpu08"


def test_step_task_count_wins_over_the_job_task_count():
    env = distributed_env({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"})
    assert (env.rank, env.world_size) == (1, 2)


def test_batch_shell_and_single_task_are_not_ranks():
    assert distributed_env(BATCH_SHELL) is None  # python scripts/train.py in the batch script spawns its ranks
    assert distributed_env({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) is None
    assert distributed_env({}) is None


def test_torchrun_variables_take_precedence():
    env = distributed_env({**SRUN_TASK, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h",
                           "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.source) == (3, 4, "h", 1234, "torchrun")


def test_master_is_the_first_host_of_the_node_list():
    for nodelist, first in [("node[3-5,9],gpu1", "node3"), ("gpu07", "gpu07"), ("a1,b2", "a1"), ("n[010-012]", "n010")]:
        assert first_host(nodelist) == first


def test_port_is_the_same_for_a_job_and_differs_between_jobs():
    ports = {port_for_job(str(job), step) for job in range(1000, 1100) for step in ("0", "1")}
    assert len(ports) == 200 and all(20000 <= p < 60000 for p in ports)
    assert port_for_job("77_3") == port_for_job("77_3")


def test_a_slurm_job_keeps_its_output_directory_across_requeues():
    """hydra.run.dir names a SLURM job by its id (a requeue finds its own checkpoints there again) and
    a local run by its start time."""
    assert run_directory_name("%Y-%m-%d/%H-%M-%S", {"SLURM_JOB_ID": "4242"}) == "slurm-4242"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", run_directory_name("%Y-%m-%d/%H-%M-%S", {}))
