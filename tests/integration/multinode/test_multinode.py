"""Several nodes (issue 14): the namespaced cluster itself, and adversarial training across node boundaries.

Every rank of a 2-node job runs in another network namespace than its peers: a rendezvous at 127.0.0.1 cannot
work there (test_nodes_are_separate_hosts shows it), so a job that trains proves that ``MASTER_ADDR`` (the first
host of ``SLURM_JOB_NODELIST``, ``rift_dist.parallel.runtime.first_slurm_host``) and gloo's own addresses are the
nodes' private ones.  Parity with the one-process run of the same global batch uses the one-node DDP tests'
tolerances (tests/integration/test_distributed_ddp.py: float summation order, amplified by PGD's sign steps).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rift_dist import cluster
from rift_dist.pipeline import run_pipeline
from tests.integration.multinode.conftest import diagnostics, mn_env, wait_run
from tests.integration.pipeline_helpers import shared_data
from tests.integration.slurm.test_submit import DDP_SECTIONS, PROFILE, _cfg
from tests.integration.test_distributed_ddp import LOSS_RTOL, WEIGHT_ATOL

pytestmark = [pytest.mark.slurm]
needs_data = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def test_nodes_are_separate_hosts_on_a_private_link(healthy_nodes):
    """One srun step over the 3 nodes: each task's hostname is its node's name and its address its own; every node
    resolves node1 to node1's address; a port open on node1's loopback is unreachable from node2 while node1's
    private address is; 2 fake GPUs per node are allocated (3 refused)."""
    mn = healthy_nodes
    out = mn.run(["srun", "-N3", "--ntasks-per-node=1", "-l", "sh", "-c",
                  'echo "$(hostname) $SLURMD_NODENAME $(getent hosts node1 | cut -d" " -f1) '
                  '$(ip -4 -o addr show eth0 | tr -s " " | cut -d" " -f4)"'], timeout=60).stdout
    rows = sorted(line.split(": ", 1)[1].split() for line in out.strip().splitlines())
    assert [r[0] for r in rows] == mn.node_names and all(r[0] == r[1] for r in rows), out
    assert {r[2] for r in rows} == {mn.node_addrs["node1"]}, out
    assert [r[3].split("/")[0] for r in rows] == [mn.node_addrs[n] for n in mn.node_names], out

    server = ("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
              "s.bind(('0.0.0.0',0));s.listen();print(s.getsockname()[1],flush=True);"
              "[s.accept()[0].close() for _ in range(9)]")
    import subprocess

    listener = subprocess.Popen(mn._enter("node1") + ["python3", "-c", server], stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5);"
                 "print('ok')\nexcept OSError as e:\n print(type(e).__name__)")
        seen = {host: mn.in_node("node2", ["python3", "-c", probe, host, str(port)]).stdout.strip()
                for host in ("node1", mn.node_addrs["node1"], "127.0.0.1")}
        same = mn.in_node("node1", ["python3", "-c", probe, "127.0.0.1", str(port)]).stdout.strip()
    finally:
        listener.kill()
        listener.wait()
    assert seen == {"node1": "ok", mn.node_addrs["node1"]: "ok", "127.0.0.1": "ConnectionRefusedError"}, seen
    assert same == "ok"

    gpus = mn.run(["srun", "-N2", "--gpus-per-node=2", "-l", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).stdout
    assert sorted(gpus.split()) == ["0,1", "0,1", "0:", "1:"], gpus
    refused = mn.run(["sbatch", "--test-only", "-N1", "--gpus-per-node=3", "--wrap", "true"], check=False)
    assert refused.returncode != 0 and "node configuration is not available" in refused.stderr, refused.stderr


def _train(tmp: Path, mn, name: str, nodes: int, tasks: int, sections: dict = DDP_SECTIONS, extra=()) -> Path:
    """Submit the train stage as one job of ``nodes`` x ``tasks`` ranks; wait; return its run dir."""
    run_dir = tmp / name
    profile = cluster.load_profile(PROFILE, [f"stages.train.nodes={nodes}", f"stages.train.tasks_per_node={tasks}",
                                             *extra])
    record = cluster.submit(_cfg(tmp, **sections), profile, run_dir, stages=["train"], log=lambda _: None)
    states = wait_run(run_dir, mn, 300)
    assert set(states.values()) == {"COMPLETED"}, diagnostics(run_dir, mn)
    job_id = record["submissions"][-1]["jobs"][0]["job_id"]
    # the job's one step ran nodes x tasks ranks over `nodes` distinct nodes
    steps = mn.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,NodeList,NTasks"]).stdout.splitlines()
    step0 = next(s.split("|") for s in steps if s.split("|")[0] == f"{job_id}.0")
    assert int(step0[2]) == nodes * tasks, steps
    assert len(_expand(step0[1])) == nodes, steps
    start = next(e for e in cluster.read_events(run_dir) if e["event"] == "start")
    assert start["world_size"] == nodes * tasks
    # every rank saw its node's own hostname (UTS namespace): submitit logs it per rank
    seen = re.findall(r"hostname=(\S+), local_rank=\d+\(\d+\), node=\d+\(\d+\), global_rank=(\d+)",
                      "".join(p.read_text() for p in (run_dir / "jobs" / "train").glob("*_log.out")))
    assert sorted({(int(r), h) for h, r in seen}) == [(r, _expand(step0[1])[r // tasks]) for r in range(nodes * tasks)]
    return run_dir


def _expand(nodelist: str) -> list[str]:
    """``node[1-2]`` -> ``["node1", "node2"]`` (this cluster's names only)."""
    if "[" not in nodelist:
        return nodelist.split(",")
    prefix, ranges = nodelist.rstrip("]").split("[")
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        out += [f"{prefix}{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _compare(a_dir: Path, b_dir: Path) -> tuple[float, float]:
    """(max |weight difference|, relative training-loss difference) of two runs' train/model.pt, history.json;
    integer buffers (BatchNorm's step counters) must be equal."""
    a = torch.load(a_dir / "train" / "model.pt", weights_only=True)
    b = torch.load(b_dir / "train" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    diff = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    la = json.loads((a_dir / "train" / "history.json").read_text())[-1]["train_loss"]
    lb = json.loads((b_dir / "train" / "history.json").read_text())[-1]["train_loss"]
    return diff, abs(la - lb) / abs(lb)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same tiny AT (global batch 64, 2 steps) in one process, no SLURM."""
    tmp = tmp_path_factory.mktemp("ref1")
    run_pipeline(_cfg(tmp, **DDP_SECTIONS), tmp / "run", ["train"], progress=False, print_table=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def two_nodes_one_task(mn_cluster, tmp_path_factory, one_process) -> Path:
    """The train stage as one job of 2 nodes x 1 task."""
    with mn_env(mn_cluster):
        return _train(tmp_path_factory.mktemp("n2t1"), mn_cluster, "run", 2, 1)


@needs_data
def test_two_nodes_one_task_each_train_like_one_process(healthy_nodes, one_process, two_nodes_one_task):
    """2 nodes x 1 task (DDP over gloo between namespaces, SyncBN) = the one-process run of the same global batch."""
    diff, loss = _compare(two_nodes_one_task, one_process)
    print(f"\n2 nodes x 1 task vs 1 process after 2 AT steps: max|dW| {diff:.2e}, loss rel. diff {loss:.1e}")
    assert diff < WEIGHT_ATOL and loss <= LOSS_RTOL


@needs_data
@pytest.mark.slow
def test_two_nodes_two_tasks_and_one_node_two_tasks(healthy_nodes, tmp_path, one_process, two_nodes_one_task):
    """2 nodes x 2 tasks (4 ranks) = one process to the same tolerance; 1 node x 2 tasks = 2 nodes x 1 task
    bitwise (the same world size: where the ranks run changes nothing)."""
    four = _train(tmp_path, healthy_nodes, "n2t2", 2, 2)
    diff4, loss4 = _compare(four, one_process)
    one_node = _train(tmp_path, healthy_nodes, "n1t2", 1, 2)
    diff2, loss2 = _compare(one_node, two_nodes_one_task)
    print(f"\n2 nodes x 2 tasks vs 1 process: max|dW| {diff4:.2e}, loss rel. diff {loss4:.1e}; "
          f"1 node x 2 tasks vs 2 nodes x 1 task: max|dW| {diff2:.1e}, loss rel. diff {loss2:.1e}")
    assert diff4 < WEIGHT_ATOL and loss4 <= LOSS_RTOL
    assert diff2 == 0.0 and loss2 == 0.0


def test_a_killed_session_leaves_nothing_behind_the_next_start(tmp_path):
    """A process SIGKILLed after creating a cluster's network (namespaces, veths, bridge, /etc/netns entries) cannot
    clean up; its ledger lets remove_stale_networks (called by every cluster start) remove all of it."""
    import subprocess
    import sys

    from tests.integration.multinode.netns_cluster import (
        namespaces_unavailable,
        remove_stale_networks,
    )
    from tests.integration.pipeline_helpers import ROOT

    why = namespaces_unavailable()
    if why:
        pytest.skip(f"this machine cannot create network namespaces ({why})")
    code = ("import os,sys,json;sys.path.insert(0,sys.argv[2]);"
            "from tests.integration.multinode.netns_cluster import NetnsSlurmCluster as C;"
            "c=C(sys.argv[1],nodes=2);c._setup_network();"
            "print(json.dumps({'netns':list(c.netns.values()),'bridge':c._bridge}),flush=True);os.kill(os.getpid(),9)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c"), str(ROOT)], capture_output=True, text=True)
    made = json.loads(proc.stdout)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert proc.returncode == -9 and all(ns in netns for ns in made["netns"]), (proc, netns)
    assert subprocess.run(["ip", "link", "show", made["bridge"]], capture_output=True).returncode == 0
    handled = remove_stale_networks()
    assert any(made["bridge"] in h for h in handled), handled
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in netns for ns in made["netns"]), netns
    assert subprocess.run(["ip", "link", "show", made["bridge"]], capture_output=True).returncode != 0
    assert not any(Path("/etc/netns", ns).exists() for ns in made["netns"])
