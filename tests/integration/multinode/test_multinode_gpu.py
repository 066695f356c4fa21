"""GPU job scripts on several nodes (issue 14): what a 2-node GPU profile generates is accepted by a cluster whose
nodes declare GPUs, and such a job really runs across two nodes.

The multi-node cluster's nodes declare ``Gres=gpu:2`` (fake device files), so slurmctld checks GPU requests as
a GPU cluster does.  A profile of 2 nodes x 2 GPUs per node (the largest this cluster has; the same code path as
2 x 4 on a real cluster, where only the count differs): every generated script passes ``sbatch --test-only``
(GPU jobs in ``debug``, gathers without GPUs in ``high``), 3 GPUs per node and 4 nodes are refused (the checks
can fail), and the training job, submitted for real, gets 2 GPUs on each of 2 nodes (sacct's AllocTRES), one
rank per GPU (4 ranks, CUDA_VISIBLE_DEVICES per node from SLURM's binding, the profile's NCCL variables), trains
on the CPU with gloo across the namespaces, and ends with the weights of the one-process run of the same global
batch (the DDP tolerances).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from rift_dist import cluster
from rift_dist.cluster import submission as cluster_submission
from rift_dist.config import load_config
from tests.integration.multinode.conftest import diagnostics, wait_run
from tests.integration.multinode.test_multinode import _compare, one_process  # noqa: F401 - fixture
from tests.integration.pipeline_helpers import shared_data
from tests.integration.slurm.test_submit import DDP_SECTIONS, _cfg
from tests.integration.slurm.test_submit_gpu import _test_only, every_script_accepted
from tests.integration.test_distributed_ddp import LOSS_RTOL, WEIGHT_ATOL

pytestmark = [pytest.mark.slurm]

GPU_PROFILE = {
    "executor": "slurm", "partition": "debug", "cpu_partition": "high", "gpus_per_node": 2, "cpus_per_task": 1,
    "time_min": 30, "signal_delay_s": 20, "constraint": "",
    "env": {"NCCL_SOCKET_IFNAME": "veth0", "NCCL_IB_DISABLE": 1, "NCCL_DEBUG": "WARN"},
    "stages": {"train": {"nodes": 2}, "mrc": {"gpus_per_node": 1, "array_size": 3},
               "finetune": {"gpus_per_node": 1}, "interpolate": {"gpus_per_node": 1}, "gather": {"time_min": 10}},
}
"""2 nodes x 2 GPUs for training, one GPU per MRC / fine-tuning / sweep task, gathers on the CPU partition."""


def _profile(tmp_path: Path, **top) -> cluster.Profile:
    path = tmp_path / "gpu_profile.yaml"
    merged = {**GPU_PROFILE, **top}
    path.write_text(yaml.safe_dump(merged))
    return cluster.load_profile(path)


def test_two_node_gpu_scripts_pass_sbatch_test_only(healthy_nodes, tmp_path):
    mn = healthy_nodes
    cfg = load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]", "tracking.enabled=false",
                             f"data.root={tmp_path}"])
    run_dir = tmp_path / "run"
    for job, script, text in every_script_accepted(mn, cfg, _profile(tmp_path), tmp_path).values():
        if job.name == "train":
            for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                         "#SBATCH --cpus-per-task=1", "export NCCL_SOCKET_IFNAME=veth0"):
                assert line in script, line
            # the test cluster's scheduler places it on two nodes (squeue's plan of --test-only names them)
            assert re.search(r"on nodes? node\[\d-\d\]|on nodes? node\d,node\d", text), text

    # the controller really checks: 3 GPUs per node (nodes have 2) and 4 nodes (there are 3) are refused
    three = _profile(tmp_path, gpus_per_node=3).resources("train")
    proc = _test_only(mn, cluster_submission.sbatch_script(three, "train", run_dir / "jobs" / "train", sys.executable),
                      tmp_path / "three.sh")
    assert proc.returncode != 0 and "node configuration is not available" in proc.stderr, proc.stderr
    four = _profile(tmp_path, stages={**GPU_PROFILE["stages"], "train": {"nodes": 4}}).resources("train")
    proc = _test_only(mn, cluster_submission.sbatch_script(four, "train", run_dir / "jobs" / "train", sys.executable),
                      tmp_path / "four.sh")
    assert proc.returncode != 0 and "node configuration is not available" in proc.stderr, proc.stderr


@pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                    reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")
def test_two_node_gpu_job_runs_one_rank_per_gpu_and_trains_like_one_process(healthy_nodes, tmp_path, one_process):
    mn = healthy_nodes
    sections = {**DDP_SECTIONS, "tracking": {"enabled": False}}
    cfg = _cfg(tmp_path, **sections)
    run_dir = tmp_path / "run"
    record = cluster.submit(cfg, _profile(tmp_path), run_dir, stages=["train"], log=lambda _: None,
                            config_path="tiny.yaml")
    states = wait_run(run_dir, mn, 300)
    job_id = record["submissions"][0]["jobs"][0]["job_id"]
    assert states[job_id] == "COMPLETED", diagnostics(run_dir, mn)
    submitted = (run_dir / "jobs" / "train" / f"{job_id}_submission.sh").read_text().splitlines()
    assert "#SBATCH --nodes=2" in submitted and "#SBATCH --gpus-per-node=2" in submitted
    alloc = mn.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "AllocTRES,NodeList"]).stdout
    assert "gres/gpu=4" in alloc and "node=2" in alloc, alloc
    starts = [e for e in cluster.read_events(run_dir) if e["event"] == "start"]
    start = starts[0]
    assert start["world_size"] == 4 and start["device"] == "cpu"  # no CUDA here: gloo on the CPU
    assert start["nccl_env"] == {"NCCL_DEBUG": "WARN", "NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "veth0"}
    assert start["visible_gpus"] == "0,1"  # SLURM's binding on the node, seen by the ranks
    diff, loss = _compare(run_dir, one_process)
    assert diff < WEIGHT_ATOL and loss < LOSS_RTOL, (diff, loss)
