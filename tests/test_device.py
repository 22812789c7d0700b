"""Device selection (`parallel.device`) for every case a launch can meet, decided from the node's GPU
count and the ranks on the node; and how the launcher counts the ranks on a node."""

import pytest

from megatron_lite.parallel.device import DeviceChoice, choose_device
from megatron_lite.training.config import compose
from megatron_lite.training.launch import DistributedEnv, ranks_on_this_node

CPU, CUDA = DeviceChoice("cpu", "gloo"), DeviceChoice("cuda", "nccl")


@pytest.mark.parametrize("requested, ranks, gpus, expected", [
    ("auto", 1, 0, CPU),  # a laptop, a CPU node
    ("auto", 8, 0, CPU),  # the CPU demo
    ("auto", 1, 1, CUDA),  # one GPU, one process
    ("auto", 8, 8, CUDA),  # a full node
    ("auto", 4, 8, CUDA),  # fewer ranks than GPUs: the first four
    ("cpu", 8, 8, CPU),  # forced
    ("cpu", 1, 1, CPU),
    ("cuda", 8, 8, CUDA),
    ("cuda", 1, 2, CUDA),
])
def test_device_choice(requested, ranks, gpus, expected):
    assert choose_device(requested, ranks, gpus) == expected


def test_auto_with_too_few_gpus_stays_on_cpu_and_says_why():
    choice = choose_device("auto", 8, 1)
    assert (choice.type, choice.backend) == ("cpu", "gloo")
    assert "8 ranks on this node but only 1 GPU" in choice.note and "parallel.device=cpu" in choice.note


def test_forced_cuda_without_enough_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match=r"parallel.device=cuda needs a GPU for each of the 8 ranks on this node but "
                                         r"2 are visible"):
        choose_device("cuda", 8, 2)
    with pytest.raises(ValueError, match="0 are visible"):
        choose_device("cuda", 1, 0)
    with pytest.raises(ValueError, match=r"parallel.device='tpu' is not allowed"):
        choose_device("tpu", 1, 0)


def test_config_key_is_checked_before_anything_starts():
    from megatron_lite.training.config import check_values

    assert compose([]).parallel.device == "auto"
    with pytest.raises(ValueError, match=r"parallel.device='gpu' is not allowed; choose one of \['auto', 'cpu', "
                                         r"'cuda'\]"):
        check_values(compose(["parallel.device=gpu"]))


def _env(local_rank=0):
    return DistributedEnv(rank=local_rank, world_size=16, local_rank=local_rank, node_rank=0, master_addr="h",
                          master_port=1, source="slurm")


@pytest.mark.parametrize("environ, expected", [
    ({"LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 8),  # srun: 8 tasks on each of 2 nodes
    ({"SLURM_TASKS_PER_NODE": "2,1"}, 2),
    ({"SLURM_NTASKS_PER_NODE": "4"}, 4),
    ({}, 3),  # nothing said: at least local_rank + 1
])
def test_ranks_on_this_node(environ, expected):
    assert ranks_on_this_node(_env(local_rank=2), environ) == expected
