"""Faults across nodes (issue 14): a requeued 2-node job, checkpoints moving between 2 nodes and 1 node, a node
that dies mid-job.

Every comparison is bitwise against the same training, uninterrupted, with the same world size (2 ranks,
started locally by ``rift train --nproc 2``): test_multinode.py shows that 1 node x 2 tasks and 2 nodes x 1
task give identical weights, so where the ranks run, and where they resume, must change nothing.  The
validation numbers of every epoch match too; the training-loss average of an epoch resumed mid-way covers
only its steps after the resume (as in tests/integration/slurm/test_submit.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rift_dist import cluster
from rift_dist.checkpoint_ids import checkpoint_id
from tests.integration.distributed_helpers import rift_cli
from tests.integration.multinode.conftest import diagnostics
from tests.integration.multinode.test_multinode import _expand
from tests.integration.pipeline_helpers import shared_data
from tests.integration.slurm.test_submit import DDP_SECTIONS, PROFILE, _cfg

pytestmark = [
    pytest.mark.slurm, pytest.mark.slow,
    pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                       reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)"),
]

TIMEOUT_S = 30
LONG = {**DDP_SECTIONS,
        "train": {"epochs": 8, "milestones": [6], "lr": 0.01, "checkpoint_every": 1, "attack": {"num_steps": 6},
                  "eval_attack_steps": 1},
        "distributed": {"sync_bn": True, "timeout_s": TIMEOUT_S}}
"""Deterministic fp32 AT, 8 epochs x 4 steps (PGD-6) with a resumable checkpoint every step; collectives time out
in 30 s.  (The cluster's KillWait is 3 s: a requeued or cancelled job stops within ~3 s, well before the end.)"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank training of LONG (``rift train --nproc 2`` on this machine, no SLURM)."""
    tmp = tmp_path_factory.mktemp("ref2")
    assert _cfg(tmp, **LONG).train.epochs == LONG["train"]["epochs"]  # writes tmp/tiny.yaml
    rift_cli("train", str(tmp / "tiny.yaml"), "--run-dir", str(tmp / "run"), nproc=2, timeout=900)
    return tmp / "run"


def _submit(tmp: Path, run_dir: Path, nodes: int, tasks: int, extra=()) -> str:
    profile = cluster.load_profile(PROFILE, [f"stages.train.nodes={nodes}", f"stages.train.tasks_per_node={tasks}",
                                             *extra])
    record = cluster.submit(_cfg(tmp, **LONG), profile, run_dir, stages=["train"], log=lambda _: None)
    return record["submissions"][-1]["jobs"][0]["job_id"]


def _newest_checkpoint(run_dir: Path) -> int:
    found = [int(p.stem.split("-")[1]) for p in (run_dir / "train" / "checkpoints").glob("ckpt-*.pt")]
    return max(found, default=-1)


def _wait_for(what: str, predicate, timeout_s: float, run_dir: Path, mn):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout_s}s\n{diagnostics(run_dir, mn)}", pytrace=False)


def _checkpoint_at_least(run_dir: Path, mn, at_least: int = checkpoint_id(1, 1)) -> int:
    """Wait for a checkpoint numbered >= at_least (epoch * 1e6 + step; default: a step of the second epoch)."""
    def ready():
        if (run_dir / "train" / "done.json").is_file():
            pytest.fail("training finished before it could be interrupted", pytrace=False)
        n = _newest_checkpoint(run_dir)
        return n if n >= at_least else 0

    return _wait_for(f"checkpoint >= {at_least}", ready, 300, run_dir, mn)


def _squeue_state(mn, job_id: str) -> str:
    return mn.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip()


def _wait_gone(mn, job_id: str, run_dir: Path, timeout_s: float = 120) -> None:
    _wait_for(f"job {job_id} to leave the queue", lambda: _squeue_state(mn, job_id) == "", timeout_s, run_dir, mn)


def _wait_trained(run_dir: Path, mn, timeout_s: float = 600) -> None:
    _wait_for("train/done.json", lambda: (run_dir / "train" / "done.json").is_file(), timeout_s, run_dir, mn)


def _same_as_reference(run_dir: Path, reference: Path) -> None:
    a = torch.load(run_dir / "train" / "model.pt", weights_only=True)
    b = torch.load(reference / "train" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    starts = [e for e in cluster.read_events(run_dir) if e["event"] == "start" and e["job"] == "train"]
    partial = {s["progress"]["epoch"] + 1 for s in starts[1:] if s["progress"]["step"] > 0}
    got = json.loads((run_dir / "train" / "history.json").read_text())
    want = json.loads((reference / "train" / "history.json").read_text())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        keys = [k for k in w if k != "epoch_seconds" and not (w["epoch"] in partial and k.startswith("train_"))]
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, (g, w)


def _starts(run_dir: Path) -> list[dict]:
    return [e for e in cluster.read_events(run_dir) if e["event"] == "start" and e["job"] == "train"]


def _alloc_nodes(mn, job_id: str) -> list[str]:
    """Nodes of the job's newest allocation (sacct -X; a requeued job's last line)."""
    out = mn.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"]).stdout.split()
    return _expand(out[-1]) if out else []


def test_two_node_job_requeued_resumes_bitwise(healthy_nodes, tmp_path, reference):
    """`scontrol requeue` of a running 2 nodes x 1 task job: it is killed, runs again (restart count 1) from the
    newest checkpoint, and ends with the reference's weights and validation history."""
    mn = healthy_nodes
    run_dir = tmp_path / "run"
    job_id = _submit(tmp_path, run_dir, 2, 1)
    before = _checkpoint_at_least(run_dir, mn)
    mn.run(["scontrol", "requeue", job_id])
    _wait_trained(run_dir, mn)
    _wait_gone(mn, job_id, run_dir)
    starts = _starts(run_dir)
    assert len(starts) == 2 and starts[-1]["restart_count"] == 1 and starts[-1]["world_size"] == 2, starts
    resumed = starts[-1]["progress"]
    assert checkpoint_id(resumed["epoch"], resumed["step"]) >= before, (before, starts)
    assert len(_alloc_nodes(mn, job_id)) == 2
    _same_as_reference(run_dir, reference)
    print(f"\nrequeued at checkpoint {before}; resumed at {resumed}; weights = uninterrupted 2-rank run")


@pytest.mark.parametrize("first,then", [((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=["2nodes-to-1", "1node-to-2"])
def test_checkpoint_moves_between_node_counts(healthy_nodes, tmp_path, reference, first, then):
    """A job of `first` (nodes, tasks) cancelled after a checkpoint; `rift submit` again with `then`: the new job
    resumes from that checkpoint on the other node count and ends with the reference's weights."""
    mn = healthy_nodes
    run_dir = tmp_path / "run"
    job_id = _submit(tmp_path, run_dir, *first)
    before = _checkpoint_at_least(run_dir, mn)
    mn.run(["scancel", "--full", "--signal=KILL", job_id])
    mn.run(["scancel", job_id], check=False)
    _wait_gone(mn, job_id, run_dir)
    assert not (run_dir / "train" / "done.json").is_file()
    second = _submit(tmp_path, run_dir, *then)
    _wait_trained(run_dir, mn)
    _wait_gone(mn, second, run_dir)
    starts = _starts(run_dir)
    resumed = starts[-1]["progress"]
    assert len(starts) == 2 and checkpoint_id(resumed["epoch"], resumed["step"]) >= before > 0, starts
    assert [len(_alloc_nodes(mn, j)) for j in (job_id, second)] == [first[0], then[0]]
    _same_as_reference(run_dir, reference)
    print(f"\n{first[0]} node(s) x {first[1]} -> {then[0]} node(s) x {then[1]}: resumed at {resumed}; weights = reference")


def test_node_dies_mid_job_fails_within_timeout_and_requeued_job_finishes(healthy_nodes, tmp_path, reference):
    """node B of a running 2-node job dies (its slurmd and every process in its namespace SIGKILLed): rank 0 on
    node A fails with a DistributedError naming the collective within distributed.timeout_s; the job ends and is
    requeued (slurmctld marks B down after SlurmdTimeout), runs on two healthy nodes from the newest checkpoint
    and ends with the reference's weights."""
    mn = healthy_nodes
    run_dir = tmp_path / "run"
    job_id = _submit(tmp_path, run_dir, 2, 1)
    victim = None
    try:
        before = _checkpoint_at_least(run_dir, mn)
        nodes = _alloc_nodes(mn, job_id)
        assert len(nodes) == 2, nodes
        victim = nodes[1]  # rank 1's node; the batch script and rank 0 run on nodes[0]
        t_kill = time.time()
        killed = mn.kill_node(victim)
        assert killed
        failed = _wait_for("rank 0's failure", lambda: next(
            (e for e in cluster.read_events(run_dir) if e["event"] == "failed"), None), TIMEOUT_S + 60, run_dir, mn)
        took = failed["time"] - t_kill
        assert took <= TIMEOUT_S + 5, (took, failed)
        assert "DistributedError" in failed["error"] and "collective" in failed["error"], failed
        _wait_trained(run_dir, mn, 900)
        _wait_gone(mn, job_id, run_dir)
        starts = _starts(run_dir)
        assert len(starts) >= 2 and starts[-1]["restart_count"] >= 1, starts
        resumed = starts[-1]["progress"]
        assert checkpoint_id(resumed["epoch"], resumed["step"]) >= before, (before, starts)
        last_nodes = _alloc_nodes(mn, job_id)
        assert len(last_nodes) == 2 and victim not in last_nodes, last_nodes
        runs = mn.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, "-o", "State"]).stdout.split()
        assert runs[-1] == "COMPLETED" and runs[0] in ("NODE_FAIL", "REQUEUED"), runs  # slurmctld requeued it
        requeued_after = starts[-1]["time"] - failed["time"]
        _same_as_reference(run_dir, reference)
        state = mn.node_state(victim)
        print(f"\n{victim} killed ({len(killed)} processes) at checkpoint {before}: rank 0 failed after {took:.1f}s "
              f"({failed['error'][:160]}...); allocations {runs}; the requeued job started {requeued_after:.0f}s "
              f"after the failure on {last_nodes}, resumed at {resumed}; weights = reference; {victim} is {state}")
    finally:
        if victim is not None:
            mn.revive_node(victim)
