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


def test_a_stage_redone_after_its_folder_was_deleted_gets_new_mlflow_runs(tmp_path):
    """The refusal of a changed setting says to delete the stage folders; the redone stage must not continue
    the old MLflow run, which kept its old value at every step the new run logged again (found by the new-user
    trial: MLflow kept MRC 8.27e-5 for a module whose new mrc.csv said 2.02e-4).  The old runs go to MLflow's
    deleted runs, tagged rift.superseded; the new mrc run's metrics are the new mrc.csv's."""
    import csv
    import shutil

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, train={"epochs": 1, "milestones": [1]})
    run_dir = tmp_path / "runs" / "tiny"
    rift("train", str(cfg), "--run-dir", str(run_dir))
    rift("mrc", str(cfg), "--run-dir", str(run_dir))
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rift").experiment_id
    old = next(r for r in client.search_runs([exp]) if r.info.run_name == "mrc")
    refused = rift("mrc", str(cfg), "--run-dir", str(run_dir), "--set", "mrc.num_iterations=5", check=False)
    assert refused.returncode == 1 and str(run_dir / "mrc") in refused.stderr
    shutil.rmtree(run_dir / "mrc")
    again = rift("mrc", str(cfg), "--run-dir", str(run_dir), "--set", "mrc.num_iterations=5")
    assert "[mrc] 1 MLflow run(s) of an earlier 'mrc' whose folder is gone" in again.stdout
    active = [r for r in client.search_runs([exp]) if r.info.run_name == "mrc"]
    assert len(active) == 1 and active[0].info.run_id != old.info.run_id
    assert active[0].info.status == "FINISHED"
    gone = client.get_run(old.info.run_id)
    assert gone.info.lifecycle_stage == "deleted" and gone.data.tags["rift.superseded"] == "true"
    assert old.info.run_id in {r.info.run_id for r in client.search_runs([exp], run_view_type=ViewType.DELETED_ONLY)}
    with (run_dir / "mrc.csv").open() as fh:
        table = {r["module"]: float(r["mrc"]) for r in csv.DictReader(fh)}
    logged = {k[len("mrc."):]: v for k, v in active[0].data.metrics.items() if k.startswith("mrc.")}
    assert set(logged) == set(table)
    assert all(abs(logged[m] - table[m]) <= 1e-6 * max(1.0, abs(table[m])) for m in table), (logged, table)
    assert any(abs(old.data.metrics[f"mrc.{m}"] - table[m]) > 1e-9 for m in table), (old.data.metrics, table)  # changed
