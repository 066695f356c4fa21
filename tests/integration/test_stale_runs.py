"""Runs that died do not stay "Running": the next start on the run directory closes them as KILLED."""

from __future__ import annotations

import pytest

from tests.integration.chaos import _attempt
from tests.integration.pipeline_helpers import rift, shared_data, tiny_config

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def test_sigkilled_stage_run_is_closed_killed_at_the_next_start(tmp_path):
    from mlflow.tracking import MlflowClient

    # MRC with 10 ascent passes per module (seconds of work) so that the kill, 0.2 s after its first line, lands
    # while the mrc child run is open (with the tiny config's 2 passes a fast machine finished MRC within 1 s)
    cfg = tiny_config(tmp_path, train={"epochs": 1, "milestones": [1]}, mrc={"num_iterations": 10})
    run_dir = tmp_path / "runs" / "tiny"
    # killed while the mrc child run is open (its first log line comes after the run is created)
    rc, out, killed_at = _attempt(cfg, run_dir, "mrc", 0.2, None, 600, marker="[mrc] 21 modules")
    assert "[mrc] lowest MRC" not in out, "MRC finished before the kill: the test needs a slower MRC"
    assert killed_at is not None, out
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rift")

    def by_name():
        return {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=100)}

    assert by_name()["mrc"].info.status == "RUNNING"  # what SIGKILL leaves behind
    later = rift("evaluate", str(cfg), "--run-dir", str(run_dir), check=False)  # a stage that will not run
    assert later.returncode != 0
    mrc = by_name()["mrc"]
    assert mrc.info.status == "KILLED" and "dead process" in mrc.data.tags["rift.stale"]
    assert by_name()["adversarial_training"].info.status == "FINISHED"  # finished runs are left alone
