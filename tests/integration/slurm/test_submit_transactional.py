"""A transactional `rift submit` on a real SLURM cluster (issue 13): arrays over MaxArraySize are split and
still give the one-process MRC table; an sbatch refused mid-submit leaves no job queued and nothing in the
run directory, and the CLI says what was cancelled and how to retry (exit 2, no traceback)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from rift_dist import cluster
from rift_dist.config import load_config
from rift_dist.pipeline import run_pipeline
from tests.integration.pipeline_helpers import ROOT, rift, shared_data, tiny_config

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                       reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)"),
]

PROFILE = ROOT / "launch" / "local_test.yaml"
AT_TRAIN = {"epochs": 1, "milestones": [1], "max_steps_per_epoch": 2, "eval_attack_steps": 1}


def _cfg(tmp: Path, **sections):
    sections.setdefault("train", AT_TRAIN)
    sections.setdefault("tracking", {"enabled": False})
    return load_config(tiny_config(tmp, **sections))


@pytest.fixture
def small_arrays(slurm_cluster):
    """The cluster with MaxArraySize=2 (array task indices 0-1) for one test; restored afterwards."""
    old = slurm_cluster.reconfigure(MaxArraySize=2)
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.reconfigure(**old)


def _queued(slurm_cluster, ids: list[str]) -> list[str]:
    out = slurm_cluster.run(["squeue", "-h", "--array", "-o", "%i|%T"], check=False).stdout
    return [line for line in out.splitlines() if line.split("|")[0].split("_")[0] in ids]


def test_sbatch_refused_mid_submit_cancels_what_was_queued(slurm_cluster, tmp_path):
    """train, mrc-prepare and the MRC array are queued; the gather's sbatch is refused (a reservation that
    does not exist: nothing the pre-checks read): all three are cancelled, nothing is written, the CLI
    exits 2 with one message naming the cancelled ids and the retry command."""
    config = tiny_config(tmp_path, train=AT_TRAIN, tracking={"enabled": False})
    run_dir = tmp_path / "run"
    proc = rift("submit", str(config), "--profile", str(PROFILE), "--run-dir", str(run_dir), "--stages", "train,mrc",
                "--profile-set", "sbatch.begin=now+3600", "--profile-set", "stages.gather.sbatch.reservation=nope",
                check=False, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2, (proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and "sbatch refused job mrc-gather" in err, err[-3000:]
    queued = re.search(r"Queued by this submit before it: ([^;]+);", err).group(1)
    ids = re.findall(r"\d+", queued)
    assert [name for name in ("train", "mrc-prepare", "mrc") if f"{name} " in queued] == ["train", "mrc-prepare",
                                                                                          "mrc"], queued
    assert len(ids) == 3 and f"cancelled: {', '.join(ids)}" in err, err
    assert "run the same command again: rift submit" in err
    deadline = time.time() + 30
    while _queued(slurm_cluster, ids) and time.time() < deadline:
        time.sleep(0.5)
    assert _queued(slurm_cluster, ids) == []
    assert not run_dir.exists()  # no submission.json, no config.yaml, no submitit folders


@pytest.mark.slow
def test_arrays_over_max_array_size_are_split_and_gather_the_same_table(small_arrays, tmp_path):
    """MaxArraySize=2, a 4-task MRC array: two 2-task arrays, the gather after both; mrc.csv equals the
    one-process table."""
    slurm_cluster = small_arrays
    ref = tmp_path / "ref"
    run_pipeline(_cfg(tmp_path), ref, ["train", "mrc"], progress=False, print_table=False)
    run_dir = tmp_path / "run"
    shutil.copytree(ref / "train", run_dir / "train")
    (run_dir / "mrc").mkdir()
    shutil.copy(ref / "mrc" / "adversarial_set.pt", run_dir / "mrc" / "adversarial_set.pt")
    profile = cluster.load_profile(PROFILE, ["stages.mrc.array_size=4"])
    lines: list[str] = []
    t0 = time.time()
    record = cluster.submit(_cfg(tmp_path), profile, run_dir, stages=["mrc"], log=lines.append)
    jobs = record["submissions"][-1]["jobs"]
    assert [(j["name"], len(j["tasks"])) for j in jobs] == [("mrc-part1", 2), ("mrc-part2", 2), ("mrc-gather", 1)]
    assert jobs[2]["dependency"] == f"afterok:{jobs[0]['job_id']}:{jobs[1]['job_id']}"
    assert any("MaxArraySize (2)" in x for x in lines), lines
    states = cluster.wait(run_dir, timeout_s=300, poll_s=1.0, log=lambda _: None)
    assert all(s.startswith("COMPLETED") for s in states.values()), states
    assert cluster.status(run_dir, log=lambda _: None)["failed"] == []
    assert (run_dir / "mrc.csv").read_text() == (ref / "mrc.csv").read_text()
    print(f"\nMRC: 4 tasks in 2 arrays of 2 (MaxArraySize=2), gathered in {time.time() - t0:.0f}s; "
          f"mrc.csv equal to one process")
