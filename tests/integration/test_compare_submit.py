"""`rift compare --submit` (issue 16): the comparison as jobs -- one per seed, then a summary job -- gives the
tables of `rift compare` in one process; --dry-run prints the jobs and their scripts and writes nothing."""

from __future__ import annotations

import json

import pytest

from tests.integration.pipeline_helpers import ROOT, rift, shared_data, tiny_config

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")

METHODS = ["rift", "most-critical"]


def test_dry_run_prints_a_job_per_seed_and_the_summary_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    proc = rift("compare", str(ROOT / "configs" / "compare_default.yaml"), "--run-dir", str(run), "--submit",
                "--dry-run", "--profile", str(ROOT / "launch" / "example_cluster.yaml"),
                "--set", f"data.archive={shared_data() / 'cifar10-jpeg.tar.gz'}")
    out = proc.stdout
    for s in (0, 1, 2):
        assert f"compare-seed-{s}: seed {s}, 1 node(s) x 1 rank(s), 1 GPU(s)" in out, out[-3000:]
    assert "compare-summary: summary of every seed, 1 node(s) x 1 rank(s), 0 GPU(s)" in out
    assert out.count("| #!/bin/bash") == 4 and "#SBATCH --partition=cpu" in out and "# rift compare: seed 1" in out
    assert "afterok" in out  # the summary waits for the seed jobs
    assert not run.exists() and not (tmp_path / "mlflow.db").exists()


def test_more_than_one_rank_per_seed_job_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    proc = rift("compare", str(ROOT / "configs" / "compare_default.yaml"), "--run-dir", str(run), "--submit",
                "--profile", str(ROOT / "launch" / "example_cluster.yaml"), "--profile-set",
                "stages.finetune.gpus_per_node=4", "--set", f"data.archive={shared_data() / 'cifar10-jpeg.tar.gz'}",
                check=False)
    assert proc.returncode == 1 and "runs each seed job as one rank" in proc.stderr, proc.stderr[-2000:]
    assert "stages.finetune.gpus_per_node=1" in proc.stderr
    assert not run.exists()


@pytest.mark.slow  # ~3 min on 2 cores: the same 2-seed comparison twice
def test_submitted_comparison_equals_the_one_process_comparison(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, compare={"seeds": [0, 1], "methods": METHODS},
                      interpolation={"alphas": [0.0, 0.5, 1.0]})
    local = tmp_path / "local" / "run"
    rift("compare", str(cfg), "--run-dir", str(local))
    jobs = tmp_path / "jobs" / "run"
    proc = rift("compare", str(cfg), "--run-dir", str(jobs), "--submit", "--debug", "--profile",
                str(ROOT / "launch" / "local_test.yaml"))
    assert "compare-seed-0 -> job" in proc.stdout and "compare-summary -> job" in proc.stdout, proc.stdout[-2000:]
    for name in ("pareto.csv", "summary.md"):
        assert (jobs / "compare" / name).read_text() == (local / "compare" / name).read_text(), name
    a = json.loads((jobs / "compare" / "summary.json").read_text())
    b = json.loads((local / "compare" / "summary.json").read_text())
    assert a["table"] == b["table"] and a["verdict"] == b["verdict"]
    record = json.loads((jobs / "compare" / "submission.json").read_text())
    assert [j["name"] for j in record["jobs"]] == ["compare-seed-0", "compare-seed-1", "compare-summary"]
    # MLflow: one parent, FINISHED, with the same children as the one-process comparison
    client = MlflowClient(tracking_uri=f"sqlite:///{jobs.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rift").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("rift.kind") == "compare"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    names = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id)
    assert names == sorted([f"{m} seed={s}" for m in METHODS for s in (0, 1)] + [f"AT + MRC seed={s}" for s in (0, 1)])

