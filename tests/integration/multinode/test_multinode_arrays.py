"""Arrays spread over the nodes (issue 14): MRC and interpolation tables equal to the one-process ones, MLflow
on the controller's private address with one parent and one run per job/task, and a submitting shell that dies.

The debug partition is ``LLN=YES`` (least loaded node first), so a 4-task array runs on more than one node;
each test checks where its tasks ran (sacct's NodeList).  Slow: a few minutes each on 2 shared cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from rift_dist import cluster
from rift_dist.config import load_config
from rift_dist.pipeline import run_pipeline
from tests.integration.multinode.conftest import diagnostics, wait_run
from tests.integration.pipeline_helpers import ROOT, shared_data, tiny_config
from tests.integration.slurm.test_submit import AT_TRAIN, PROFILE
from tests.integration.test_mlflow_tracking import MlflowServer

pytestmark = [
    pytest.mark.slurm, pytest.mark.slow,
    pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                       reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)"),
]


def _nodes_of(mn, job_id: str) -> dict[str, str]:
    """{array task id or job id: node list} of a job's allocations (sacct -X)."""
    out = mn.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,NodeList"]).stdout
    return dict(line.split("|", 1) for line in out.strip().splitlines() if line)


def test_shell_dies_after_submit_mrc_array_over_nodes_equals_local_mlflow_on_private_address(healthy_nodes,
                                                                                             tmp_path):
    """`rift submit` (train as 2 nodes x 1 task, then the MRC array of 4 tasks) from a shell that is SIGKILLed
    right after the submission: every job was already queued with its dependency and all complete; the array
    ran on >= 2 nodes; the gathered mrc.csv equals the one-process MRC of the same trained model; the compute
    nodes logged to an MLflow server bound to the controller's private address only: one parent run, and
    adversarial_training, mrc, mrc-prepare, mrc-task-0..3 once each (none per rank or per node)."""
    from mlflow.tracking import MlflowClient

    mn = healthy_nodes
    server = MlflowServer(tmp_path / "server", host=mn.controller_addr).start()
    try:
        cfg_path = tiny_config(tmp_path, train=AT_TRAIN, tracking={"uri": server.uri, "experiment": "rift-mn"})
        run_dir = tmp_path / "run"
        sets = ["stages.train.nodes=2", "stages.train.tasks_per_node=1", "stages.mrc.array_size=4"]
        cmd = [sys.executable, "-m", "rift_dist.cli", "submit", str(cfg_path), "--profile", str(PROFILE),
               "--run-dir", str(run_dir), "--stages", "train,mrc", *[a for s in sets for a in ("--profile-set", s)],
               "--no-progress"]
        shell = subprocess.Popen(["bash", "-c", f'{" ".join(map(repr, cmd))} && echo SUBMITTED && sleep 600'],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                 start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = []
        for line in shell.stdout:
            lines.append(line)
            if line.strip() == "SUBMITTED":
                break
        assert lines and lines[-1].strip() == "SUBMITTED", "".join(lines)
        os.killpg(shell.pid, signal.SIGKILL)  # the login shell dies (and rift submit's whole session with it)
        shell.wait(timeout=10)
        record = cluster.read_submission(run_dir)
        jobs = record["submissions"][-1]["jobs"]
        assert [j["name"] for j in jobs] == ["train", "mrc-prepare", "mrc", "mrc-gather"]
        queued = mn.job_ids()  # pending array tasks show as <id>_[0-3]
        assert all(any(q.split("_")[0] == j["job_id"] for q in queued) for j in jobs), (queued, jobs)
        assert all(j["dependency"] for j in jobs[1:])  # afterok chains, held by slurmctld, not by the shell

        states = wait_run(run_dir, mn, 600)
        assert set(states.values()) == {"COMPLETED"}, diagnostics(run_dir, mn)
        train_nodes = _nodes_of(mn, jobs[0]["job_id"])[jobs[0]["job_id"]]
        assert "[" in train_nodes or "," in train_nodes, train_nodes  # two nodes
        array_nodes = _nodes_of(mn, jobs[2]["job_id"])
        assert len(array_nodes) == 4 and len(set(array_nodes.values())) >= 2, array_nodes

        # the one-process MRC of the same model and adversarial set
        ref = tmp_path / "ref"
        shutil.copytree(run_dir / "train", ref / "train")
        (ref / "mrc").mkdir()
        shutil.copy(run_dir / "mrc" / "adversarial_set.pt", ref / "mrc" / "adversarial_set.pt")
        (tmp_path / "refcfg").mkdir()
        ref_cfg = load_config(tiny_config(tmp_path / "refcfg", train=AT_TRAIN, tracking={"enabled": False}))
        run_pipeline(ref_cfg, ref, ["mrc"], progress=False, print_table=False)
        assert (run_dir / "mrc.csv").read_text() == (ref / "mrc.csv").read_text()

        client = MlflowClient(tracking_uri=server.uri)
        runs = client.search_runs([client.get_experiment_by_name("rift-mn").experiment_id], max_results=500)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert [p.info.run_id for p in parents] == [record["tracking"]["parent_run_id"]]
        names = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId"))
        assert names == sorted(["adversarial_training", "mrc", "mrc-prepare", *[f"mrc-task-{i}" for i in range(4)]]), \
            names
        by = {r.info.run_name: r for r in runs}
        assert by["adversarial_training"].data.tags.get("rift.world_size") in (None, "2")
        assert "val_robust_accuracy" in by["adversarial_training"].data.metrics  # sent from node1 over the link
        assert {by[f"mrc-task-{i}"].data.tags.get("slurm.node") for i in range(4)} == set(
            _expand_all(array_nodes.values()))
        assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
        # the server is on the private link only: loopback does not answer
        assert not MlflowServer(tmp_path / "x", port=server.port).healthy()
        print(f"\nshell SIGKILLed after submit; train on {train_nodes}, MRC array on {sorted(array_nodes.values())}; "
              f"mrc.csv = local; MLflow at {server.uri}: 1 parent + {len(names)} children")
    finally:
        server.stop()


def _expand_all(nodelists) -> set[str]:
    from tests.integration.multinode.test_multinode import _expand

    return {n for nl in nodelists for n in _expand(nl)}


def test_interpolation_array_over_nodes_equals_local(healthy_nodes, tmp_path):
    """The interpolation stage as an array (one task per alpha) over the nodes: the gathered interpolation.csv
    equals the one-process stage on the same fine-tuned models."""
    mn = healthy_nodes
    sections = {"train": AT_TRAIN, "finetune": {"epochs": 1, "milestones": [1], "max_steps_per_epoch": 2},
                "interpolation": {"alphas": [0.0, 0.25, 0.5, 0.75, 1.0]}, "tracking": {"enabled": False}}
    cfg = load_config(tiny_config(tmp_path, **sections))
    base = tmp_path / "base"
    run_pipeline(cfg, base, ["train", "mrc", "finetune"], progress=False, print_table=False)
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(base, ref)
    shutil.copytree(base, run_dir)
    run_pipeline(load_config(tiny_config(tmp_path, **sections)), ref, ["interpolate"], progress=False,
                 print_table=False)
    profile = cluster.load_profile(PROFILE, ["stages.interpolate.array_size=0"])
    record = cluster.submit(load_config(tiny_config(tmp_path, **sections)), profile, run_dir, stages=["interpolate"],
                            log=lambda _: None)
    jobs = record["submissions"][-1]["jobs"]
    assert [j["name"] for j in jobs] == ["interpolate", "interpolate-gather"]
    states = wait_run(run_dir, mn, 600)
    assert set(states.values()) == {"COMPLETED"}, diagnostics(run_dir, mn)
    nodes = _nodes_of(mn, jobs[0]["job_id"])
    assert len(nodes) == len(jobs[0]["tasks"]) >= 5 and len(set(nodes.values())) >= 2, nodes
    assert (run_dir / "interpolation.csv").read_text() == (ref / "interpolation.csv").read_text()
    print(f"\ninterpolation array: {len(nodes)} tasks on {sorted(set(nodes.values()))}; interpolation.csv = local")
