"""Launch-environment parsing, backend choice and failure classification (no process group needed)."""

import pytest
import torch

from rift_dist.config import RunConfig
from rift_dist.parallel.batchnorm import AllReduceBatchNorm, convert_sync_batchnorm
from rift_dist.parallel.runtime import DistributedError, first_slurm_host, is_comm_failure, read_launch_env, Runtime


def test_single_process_without_variables():
    le = read_launch_env({})
    assert (le.rank, le.world_size, le.source) == (0, 1, "single")


def test_torchrun_variables():
    le = read_launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (le.rank, le.local_rank, le.world_size, le.master_addr, le.master_port, le.source) == (3, 1, 4, "n1", 1234, "torchrun")


def test_slurm_variables_and_first_host():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "12345",
           "SLURM_JOB_NODELIST": "gpu[07-10,12],cpu1"}
    le = read_launch_env(env)
    assert (le.rank, le.local_rank, le.world_size, le.master_addr, le.source) == (5, 1, 8, "gpu07", "slurm")
    assert le.master_port == 20000 + 12345 % 20000
    # an srun step narrower than the allocation; torchrun variables win over SLURM's
    assert read_launch_env({**env, "SLURM_STEP_NUM_TASKS": "6"}).world_size == 6
    assert read_launch_env({**env, "RANK": "0", "WORLD_SIZE": "2"}).source == "torchrun"
    # one task: a single process
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("a1,b2", "a1"), ("gpu[01-04,07],cpu1", "gpu01"), ("n[3-4]-ib", "n3-ib"),
    ("rack1-[0003-0005]", "rack1-0003"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_inconsistent_variables_are_errors():
    with pytest.raises(DistributedError, match="outside world size"):
        read_launch_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="not an integer"):
        read_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_backend_choice():
    cfg = RunConfig()
    rt = Runtime(cfg, environ={})
    assert rt.backend == ("nccl" if rt.device.type == "cuda" else "gloo")
    cfg.distributed.backend = "nccl"
    if rt.device.type == "cpu":
        with pytest.raises(DistributedError, match="nccl but the device is the CPU"):
            _ = rt.backend
    rt.close()


def test_comm_failures_are_recognised():
    assert is_comm_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1"))
    assert is_comm_failure(RuntimeError("Timed out waiting 10000ms for recv operation to complete"))
    assert not is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_comm_failure(ValueError("gloo"))


def test_sync_batchnorm_conversion_keeps_parameters_and_is_plain_in_one_process():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    weight, mean = model[1].weight, model[1].running_mean
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    bn = converted[1]
    assert isinstance(bn, AllReduceBatchNorm)
    assert bn.weight is weight and bn.running_mean is mean and not bn.weight.requires_grad
    assert list(converted.state_dict()) == list(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict())
    x = torch.randn(4, 3, 8, 8)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ref.load_state_dict(converted.state_dict())
    # no process group: BatchNorm's function, computed with two-pass float32 sums (to rounding, not bitwise:
    # the same arithmetic as on several ranks; see AllReduceBatchNorm)
    torch.testing.assert_close(converted(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref[1].running_var, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean, rtol=1e-6, atol=1e-6)
