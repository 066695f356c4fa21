"""Tracker robustness for cluster runs, against a fake MLflow client: buffering, back-off, spill and replay.

The same behaviour against a real `mlflow server` stopped and restarted is in
tests/integration/test_mlflow_tracking.py (slow) and tests/integration/slurm/test_submit_mlflow.py.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest

from rift_dist.config import load_config
from rift_dist.tracking import Tracker, is_transient, limit_http_retries


class Down(Exception):
    """What MLflow raises when the server does not answer."""

    error_code = "INTERNAL_ERROR"


class Rejected(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


class FakeClient:
    """Records writes; ``down`` makes every call fail like an unreachable server."""

    def __init__(self):
        self.down = False
        self.calls = 0
        self.writes: list[tuple] = []
        self.locked = 0
        self.reject_params = False
        self.created = 0

    def _call(self):
        self.calls += 1
        if self.down:
            raise Down("API request failed: Connection refused")
        if self.locked:
            self.locked -= 1
            raise Down("(sqlite3.OperationalError) database is locked")

    def log_batch(self, run_id, metrics, params, tags):
        self._call()
        if params and self.reject_params:
            raise Rejected("Changing param values is not allowed")
        self.writes.append(("batch", run_id, [(m.key, m.value, m.step) for m in metrics],
                            [(p.key, p.value) for p in params], [(t.key, t.value) for t in tags]))

    def get_metric_history(self, run_id, key):
        """The metrics logged to ``run_id`` under ``key`` (a read: fails when down, not counted in ``calls``)."""
        if self.down:
            raise Down("API request failed: Connection refused")

        class M:
            def __init__(self, value, step):
                self.value, self.step = value, step

        return [M(v, s) for w in self.writes if w[0] == "batch" and w[1] == run_id for k, v, s in w[2] if k == key]

    def update_run(self, run_id, status=None, name=None):
        self._call()
        self.writes.append(("status", run_id, status))

    def set_terminated(self, run_id, status=None):
        self._call()
        self.writes.append(("terminate", run_id, status))

    def log_artifact(self, run_id, path, subdir=None):
        self._call()
        self.writes.append(("artifact", run_id, path))

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        self._call()
        self.created += 1

        class Info:
            run_id = f"child-{self.created}"

        class Run:
            info = Info()

        return Run()


@pytest.fixture(autouse=True)
def no_real_store(monkeypatch):
    """Trackers get a FakeClient instead of opening a store (each test sets its own behaviour)."""
    import mlflow.tracking

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", lambda tracking_uri=None: FakeClient())


def make(tmp_path, run_dir="run"):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'never-opened.db'}"])
    tracker = Tracker(cfg, tmp_path / run_dir, parent_run_id="parent-1")
    tracker._experiment = "0"
    return tracker, tracker.client


def metrics_sent(fake):
    return [m for w in fake.writes if w[0] == "batch" for m in w[2]]


def test_down_store_buffers_backs_off_and_sends_in_order(tmp_path):
    tracker, fake = make(tmp_path)
    run = tracker.parent
    run.log_metrics({"loss": 1.0}, step=1)
    fake.down = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.time()
        for step in range(2, 50):
            run.log_metrics({"loss": 1.0 / step}, step=step)
        elapsed = time.time() - t0
    assert elapsed < 1.0
    assert fake.calls == 2  # one attempt, then nothing until the back-off has passed
    assert tracker.pending == 48
    assert sum("buffered" in str(w.message) for w in caught) == 1
    fake.down = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.log_metrics({"loss": 0.0}, step=50)  # still inside the back-off: queued
        assert tracker.pending == 49
        run.flush()
    assert tracker.pending == 0
    assert [s for _, _, s in metrics_sent(fake)] == list(range(1, 51))
    assert any("reachable again: 49 buffered writes" in str(w.message) for w in caught)


def test_sqlite_lock_is_retried_on_the_spot(tmp_path):
    tracker, fake = make(tmp_path)
    fake.locked = 2
    tracker.parent.log_metrics({"x": 1.0})
    assert tracker.pending == 0 and tracker.lock_retries == 2 and len(metrics_sent(fake)) == 1


def test_a_rejected_write_is_dropped_not_blocking(tmp_path):
    tracker, fake = make(tmp_path)
    fake.reject_params = True
    with pytest.warns(UserWarning, match="rejected a params write"):
        tracker.parent.log_params({"a": 1})
    tracker.parent.log_metrics({"x": 2.0})
    assert tracker.pending == 0 and metrics_sent(fake) == [("x", 2.0, 0)]


def test_unsent_writes_are_saved_and_replayed_by_the_next_tracker(tmp_path):
    tracker, fake = make(tmp_path)
    fake.down = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.parent.log_metrics({"epoch_loss": 0.5}, step=3)
        tracker.parent.set_tags({"k": "v"})
        tracker.end(tracker.parent, "FINISHED")
        tracker.close()
    files = list((tmp_path / "run" / "mlflow" / "pending").glob("*.json"))
    assert len(files) == 1
    assert any(str(files[0]) in str(w.message) for w in caught)
    ops = json.loads(files[0].read_text())["ops"]
    assert [op[0] for op in ops] == ["metrics", "tags", "terminate"]

    # the next process on this run directory (a later job, `rift status`) sends them on start-up
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'never-opened.db'}"])
    fake2 = Tracker(cfg, tmp_path / "run", parent_run_id="parent-1").client
    assert not list((tmp_path / "run" / "mlflow" / "pending").glob("*.json"))
    assert [w[0] for w in fake2.writes] == ["batch", "batch", "terminate"]
    assert metrics_sent(fake2) == [("epoch_loss", 0.5, 3)]


def test_precreated_child_run_is_continued_while_the_store_is_down(tmp_path):
    tracker, fake = make(tmp_path)
    scheduled = tracker.child("mrc-task-0", key="mrc.task-0", status="SCHEDULED")
    assert scheduled.run_id == "child-1" and ("status", "child-1", "SCHEDULED") in fake.writes
    job, fake_job = make(tmp_path)  # the job's process
    fake_job.down = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = job.child("mrc-task-0", key="mrc.task-0", tags={"slurm.job_id": "7"})
        run.log_metrics({"mrc.conv1": 0.1})
    assert run.run_id == "child-1" and fake_job.created == 0
    assert job.pending == 3  # status RUNNING, tags, metrics
    fake_job.down = False
    run.flush()
    assert [w[0] for w in fake_job.writes] == ["status", "batch", "batch"]


def test_stage_marks_killed_on_interruption(tmp_path):
    tracker, fake = make(tmp_path)
    with pytest.raises(SystemExit):
        with tracker.stage("adversarial_training"):
            raise SystemExit(-1)  # what submitit's requeue handler raises
    assert fake.writes[-1] == ("terminate", "child-1", "KILLED")


def test_transient_versus_permanent_errors_and_http_limits(monkeypatch):
    assert is_transient(Down("Connection refused")) and is_transient(RuntimeError("database is locked"))
    assert not is_transient(Rejected("Changing param values is not allowed"))
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    limit_http_retries()
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"  # the user's setting wins

