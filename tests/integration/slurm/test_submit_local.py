"""`rift submit --local` (submitit's local executor) and `--debug` (in this process): the same jobs without SLURM."""

from __future__ import annotations

import json
import shutil

import pytest

from rift_dist import cluster
from rift_dist.pipeline import run_pipeline
from tests.integration.pipeline_helpers import rift, shared_data, tiny_config
from tests.integration.slurm.test_submit import DDP_SECTIONS, _cfg

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def test_local_executor_runs_a_two_rank_job_and_records_it(tmp_path):
    """`rift submit --local` with 2 ranks per node: submitit's local tasks become torchrun-style ranks (DDP over
    gloo); the submission, the job's events and `rift status` record it."""
    cfg_path = tiny_config(tmp_path, **DDP_SECTIONS)
    run_dir = tmp_path / "run"
    out = rift("submit", str(cfg_path), "--run-dir", str(run_dir), "--local", "--stages", "train",
               "--profile-set", "tasks_per_node=2", "--profile-set", "time_min=20")
    assert "train" in out.stdout
    record = cluster.read_submission(run_dir)
    assert record["executor"] == "local"
    task = record["submissions"][-1]["jobs"][0]["tasks"][0]
    assert task["state"] == "COMPLETED"
    start = next(e for e in cluster.read_events(run_dir) if e["event"] == "start")
    assert start["world_size"] == 2
    assert (run_dir / "train" / "done.json").is_file()
    st = rift("status", str(run_dir))
    assert "COMPLETED" in st.stdout and "train done" in st.stdout
    again = rift("submit", str(run_dir), "--stages", "train")  # re-submit a finished run: nothing to do
    assert "nothing to submit" in again.stdout


@pytest.mark.slow
def test_debug_executor_full_graph_equals_rift_run(tmp_path):
    """The whole graph as jobs (MRC and alpha arrays, gathers) in this process gives `rift run`'s results."""
    cfg = _cfg(tmp_path, tracking={"enabled": False})
    ref = tmp_path / "ref"
    run_pipeline(cfg, ref, progress=False, print_table=False)
    run_dir = tmp_path / "run"
    shutil.copytree(ref / "train", run_dir / "train")  # AT is compared by the SLURM tests; start after it
    profile = cluster.load_profile(None, ["stages.mrc.array_size=3", "stages.interpolate.array_size=2"])
    record = cluster.submit(_cfg(tmp_path, tracking={"enabled": False}), profile, run_dir, executor="debug",
                            log=lambda _: None)
    names = [j["name"] for j in record["submissions"][-1]["jobs"]]
    assert names == ["mrc-prepare", "mrc", "mrc-gather", "finetune", "interpolate", "interpolate-gather", "evaluate"]
    assert (run_dir / "mrc.csv").read_text() == (ref / "mrc.csv").read_text()
    assert (run_dir / "interpolation.csv").read_text() == (ref / "interpolation.csv").read_text()
    a, b = json.loads((run_dir / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    for key in ("modules", "alpha"):
        assert a[key] == b[key]
    for model in ("at", "rift"):
        for metric in ("clean_accuracy", "robust_accuracy", "corruption_accuracy"):
            assert a[model][metric] == b[model][metric], (model, metric)
