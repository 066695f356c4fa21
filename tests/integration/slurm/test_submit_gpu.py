"""GPU job scripts against a real SLURM controller (issues 14 and 15).

The suite's cluster (tests/integration/slurm/conftest.py) declares 4 fake GPUs on its one node
(``Gres=gpu:4``, gres.conf devices linked to /dev/null), so slurmctld checks GPU requests as a GPU cluster
does: every script ``rift submit`` generates for a GPU profile passes ``sbatch --test-only``; asking for
more GPUs than a node has is refused (the check can fail); a real GPU-profile job is scheduled with its
GPUs (sacct's AllocTRES), sees them in CUDA_VISIBLE_DEVICES and the profile's NCCL variables, and trains
on the CPU with gloo.  Two nodes: this cluster has one, so a 2-node script is refused only for its node
count here (tests/integration/multinode/ has several nodes).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from rift_dist import cluster
from rift_dist.cluster import submission as cluster_submission
from rift_dist.config import load_config
from tests.integration.pipeline_helpers import shared_data, tiny_config

pytestmark = [pytest.mark.slurm]

GPU_PROFILE = {
    "executor": "slurm", "partition": "debug", "cpu_partition": "high", "gpus_per_node": 4, "cpus_per_task": 1,
    "time_min": 30, "signal_delay_s": 20, "constraint": "", "sbatch": {"gpu-bind": "none"},
    "env": {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": 1, "NCCL_DEBUG": "WARN"},
    "stages": {"mrc": {"gpus_per_node": 1, "array_size": 4}, "finetune": {"gpus_per_node": 1},
               "interpolate": {"gpus_per_node": 1}, "gather": {"time_min": 10}},
}
"""launch/example_cluster.yaml's shape on the test cluster: 4 GPUs per node in `debug`, gathers in `high`."""


def _profile(tmp_path: Path, **top) -> cluster.Profile:
    path = tmp_path / "gpu_profile.yaml"
    path.write_text(yaml.safe_dump({**GPU_PROFILE, **top}))
    return cluster.load_profile(path)


def _planner_cfg(tmp_path: Path):
    return load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]", "tracking.enabled=false",
                              f"data.root={tmp_path}"])


def _test_only(slurm_cluster, script: str, path: Path, *args: str):
    path.write_text(script)
    return slurm_cluster.run(["sbatch", "--test-only", *args, str(path)], check=False)


def every_script_accepted(cluster_under_test, cfg, profile, tmp_path: Path) -> dict:
    """Plan ``cfg`` with ``profile``, write every job's sbatch script and assert ``sbatch --test-only`` on
    ``cluster_under_test`` (``.run(argv)``) accepts it -- GPU jobs in ``debug``, gathers in ``high`` -- asking for
    the job's GPUs.  Returns {job name: (job, script, sbatch's answer)}."""
    run_dir = tmp_path / "run"
    jobs = cluster.plan_jobs(cfg, profile, run_dir)
    assert [j.name for j in jobs] == ["train", "mrc-prepare", "mrc", "mrc-gather", "finetune", "interpolate",
                                      "interpolate-gather", "evaluate"]
    out = {}
    for job in jobs:
        folder = run_dir / "jobs" / job.name
        folder.mkdir(parents=True)
        script = cluster_submission.sbatch_script(job.resources, job.name, folder, sys.executable, [],
                                                  len(job.tasks) if job.array and len(job.tasks) > 1 else None,
                                                  cluster_submission.script_header(job, run_dir, "tiny.yaml"))
        proc = _test_only(cluster_under_test, script, tmp_path / f"{job.name}.sh")
        text = proc.stdout + proc.stderr
        partition = "high" if job.part.endswith("gather") else "debug"
        assert proc.returncode == 0 and "to start at" in text and f"in partition {partition}" in text, (job.name, text)
        gpus = re.search(r"--gpus-per-node=(\d+)", script)
        assert (int(gpus.group(1)) if gpus else 0) == job.resources.gpus_per_node, job.name
        out[job.name] = (job, script, text)
    return out


def test_every_generated_gpu_script_passes_sbatch_test_only(slurm_cluster, tmp_path):
    profile = _profile(tmp_path)
    run_dir = tmp_path / "run"
    scripts = every_script_accepted(slurm_cluster, _planner_cfg(tmp_path), profile, tmp_path)
    jobs = [job for job, _, _ in scripts.values()]
    for job, script, _ in scripts.values():
        assert ("gpu-bind" in script) == bool(job.resources.gpus_per_node), job.name  # CPU jobs drop GPU options

    train = next(j for j in jobs if j.name == "train")
    # --gres=gpu:4 (clusters without cons_tres) is accepted the same way
    gres = _profile(tmp_path, gpu_request="gres").resources("train")
    script = cluster_submission.sbatch_script(gres, "train", run_dir / "jobs" / "train", sys.executable)
    assert "#SBATCH --gres=gpu:4" in script and "gpus-per-node" not in script
    proc = _test_only(slurm_cluster, script, tmp_path / "gres.sh")
    assert proc.returncode == 0 and "to start at" in proc.stderr + proc.stdout, proc.stderr

    # the controller really checks the GPUs: 5 per node is refused (the node has 4)
    five = _profile(tmp_path, gpus_per_node=5).resources("train")
    proc = _test_only(slurm_cluster, cluster_submission.sbatch_script(five, "train", run_dir / "jobs" / "train",
                                                           sys.executable), tmp_path / "five.sh")
    assert proc.returncode != 0 and "Requested node configuration is not available" in proc.stderr

    # 2 nodes x 4 GPUs: refused here only for the node count (one node); with --nodes=1 on the command line
    # (which overrides #SBATCH) every other option of the same script is accepted
    two = _profile(tmp_path, stages={**GPU_PROFILE["stages"], "train": {"nodes": 2}}).resources("train")
    script = cluster_submission.sbatch_script(two, "train", run_dir / "jobs" / "train", sys.executable, [], None,
                                   cluster_submission.script_header(train, run_dir, "tiny.yaml"))
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
    proc = _test_only(slurm_cluster, script, tmp_path / "two.sh")
    assert proc.returncode != 0 and "node configuration is not available" in proc.stderr
    proc = _test_only(slurm_cluster, script, tmp_path / "two.sh", "--nodes=1")
    assert proc.returncode == 0 and "to start at" in proc.stderr + proc.stdout, proc.stderr


def test_dry_run_prints_the_gpu_scripts_and_writes_nothing(slurm_cluster, tmp_path, capsys):
    from rift_dist.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"width": 4}, "interpolation": {"alphas": [0.0, 1.0]},
                                      "data": {"root": str(tmp_path)}, "tracking": {"enabled": False}}))
    profile = tmp_path / "gpu_profile.yaml"
    profile.write_text(yaml.safe_dump(GPU_PROFILE))
    run_dir = tmp_path / "run"
    assert main(["submit", str(config), "--profile", str(profile), "--run-dir", str(run_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    scripts = out.split("      | #!/bin/bash")[1:]
    assert len(scripts) == 8  # one per job
    train, gather = scripts[0], scripts[3]
    for line in ("# rift train: job train - the whole stage", f"# config:  {config.resolve()}",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --job-name=rift-train", "export NCCL_SOCKET_IFNAME=lo", "export NCCL_IB_DISABLE=1",
                 "on cuda:LOCAL_RANK"):
        assert line in train, line
    assert "# rift mrc: job mrc-gather" in gather and "#SBATCH --partition=high" in gather
    assert "gpus-per-node" not in gather and "no GPU" in gather
    assert not run_dir.exists()


@pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                    reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")
def test_gpu_profile_job_gets_its_gpus_and_nccl_env_and_trains_on_the_cpu(slurm_cluster, tmp_path):
    sections = {"data": {"loader": "torch", "val_size": 50},
                "train": {"epochs": 1, "max_steps_per_epoch": 1, "milestones": [10], "attack": {"num_steps": 1},
                          "eval_attack_steps": 1},
                "precision": {"threads": 1}, "distributed": {"timeout_s": 60}, "tracking": {"enabled": False}}
    cfg = load_config(tiny_config(tmp_path, **sections))
    # without gpu-bind (--gpu-bind=none leaves CUDA_VISIBLE_DEVICES unset)
    profile = _profile(tmp_path, sbatch={}, stages={**GPU_PROFILE["stages"], "train": {"gpus_per_node": 2}})
    run_dir = tmp_path / "run"
    record = cluster.submit(cfg, profile, run_dir, stages=["train"], log=lambda _: None, config_path="tiny.yaml")
    states = cluster.wait(run_dir, timeout_s=300, poll_s=1.0, log=lambda _: None)
    job_id = record["submissions"][0]["jobs"][0]["job_id"]
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((run_dir / "jobs" / "train").glob("*.err")))
    assert states[job_id] == "COMPLETED", logs
    # the script SLURM ran carries the header and asks for the GPUs
    submitted = (run_dir / "jobs" / "train" / f"{job_id}_submission.sh").read_text().splitlines()
    assert submitted[1] == "# rift train: job train - the whole stage" and "# config:  tiny.yaml" in submitted
    assert "#SBATCH --gpus-per-node=2" in submitted and "#SBATCH --ntasks-per-node=2" in submitted
    alloc = slurm_cluster.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "AllocTRES"]).stdout
    assert "gres/gpu=2" in alloc, alloc
    start = next(e for e in cluster.read_events(run_dir) if e["event"] == "start")
    assert start["world_size"] == 2 and start["device"] == "cpu"  # no CUDA here: gloo on the CPU
    assert start["visible_gpus"] == "0,1"  # SLURM's binding of the allocated GPUs, seen by the ranks
    assert start["nccl_env"] == {"NCCL_DEBUG": "WARN", "NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "lo"}
    assert json.loads((run_dir / "train" / "done.json").read_text())["outputs"]
