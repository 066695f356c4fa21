"""MLflow at scale: a real `mlflow server` stopped and restarted mid-run, and many processes on one SQLite store.

:class:`MlflowServer` starts ``mlflow server`` (SQLite backend and artefact folder in a temporary
directory, 127.0.0.1, a free port) as a child process in its own session, and can stop it and start
it again on the same port and store; the SLURM tests use it too.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import json
import warnings
from pathlib import Path

import pytest

from rift_dist.config import load_config
from rift_dist.tracking import Tracker


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on ``host`` (default 127.0.0.1) with a SQLite backend in ``root``; :meth:`stop` /
    :meth:`start` keep port and store."""

    def __init__(self, root: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.host = host
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        """The tracking URI (``http://<host>:<port>``)."""
        return f"http://{self.host}:{self.port}"

    def healthy(self) -> bool:
        """Whether the server answers ``/health``."""
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout_s: float = 180) -> "MlflowServer":
        """Start the server and wait until it answers.

        Raises:
            RuntimeError: when it exits or does not answer within ``timeout_s`` (with its log).
        """
        exe = Path(sys.executable).with_name("mlflow")
        log = (self.root / f"server-{self.starts}.log").open("w")
        self.starts += 1
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        self.proc = subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", self.host,
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self._log()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s}s:\n{self._log()}")

    def _log(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.root.glob("server-*.log")))

    def stop(self) -> None:
        """Stop the server (its whole process group: SIGTERM, then SIGKILL after 15 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        deadline = time.time() + 10
        while self.healthy() and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture
def mlflow_server(tmp_path):
    """A running :class:`MlflowServer`, stopped at the end of the test."""
    server = MlflowServer(tmp_path / "mlflow-server").start()
    try:
        yield server
    finally:
        server.stop()


def _metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_server_stopped_mid_run_buffers_without_stalling_then_sends(mlflow_server, tmp_path):
    """Server down: logging calls return at once (no MLflow HTTP retry loop), one warning, writes queued;
    a process that ends while it is down leaves its writes in <run_dir>/mlflow/pending; server back:
    the queue is sent in order and the pending file is sent by the next tracker on that run directory."""
    cfg = load_config(None, [f"tracking.uri={mlflow_server.uri}", "name=buffering"])
    run_dir = tmp_path / "run"
    tracker = Tracker(cfg, run_dir)
    run = tracker.child("adversarial_training")
    run.log_metrics({"loss": 1.0}, step=1)
    other_dir = tmp_path / "other"
    other = Tracker(cfg, other_dir, parent_run_id=tracker.parent.run_id)
    other_run = other.child("mrc-task-0")

    mlflow_server.stop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.time()
        for step in range(2, 7):
            run.log_metrics({"loss": 1.0 / step}, step=step)
        run.set_tags({"note": "logged while the server was down"})
        seconds = time.time() - t0
        other_run.log_metrics({"mrc.conv1": 0.5}, step=0)
        other.end(other_run)
        other.close()  # the process ends while the server is down
    texts = [str(w.message) for w in caught]
    assert seconds < 5, f"logging stalled for {seconds:.1f}s while the server was down"
    assert any("buffered" in t for t in texts), texts
    assert tracker.pending >= 6
    pending = list((other_dir / "mlflow" / "pending").glob("*.json"))
    assert len(pending) == 1 and any(str(pending[0]) in t for t in texts), texts

    mlflow_server.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.log_metrics({"loss": 0.1}, step=7)
        run.flush()
    assert tracker.pending == 0
    assert any("reachable again" in str(w.message) for w in caught)
    assert _metric_steps(mlflow_server.uri, run.run_id, "loss") == [1, 2, 3, 4, 5, 6, 7]
    tracker.end(run)
    tracker.finish()

    replay = Tracker(cfg, other_dir, parent_run_id=tracker.parent.run_id)  # e.g. the next job of the run
    replay.close()
    assert not list((other_dir / "mlflow" / "pending").glob("*.json"))
    assert _metric_steps(mlflow_server.uri, other_run.run_id, "mrc.conv1") == [0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert client.get_run(other_run.run_id).info.status == "FINISHED"
    assert client.get_run(run.run_id).data.tags["note"] == "logged while the server was down"
    print(f"\n5 metric writes + 1 tag while the server was down took {seconds * 1000:.0f} ms; all arrived later")


def _writer(uri: str, run_dir: str, parent_run_id: str, index: int, steps: int, queue) -> None:
    """One concurrent writer process: its own child run, ``steps`` metric batches, params and tags."""
    cfg = load_config(None, [f"tracking.uri={uri}"])
    tracker = Tracker(cfg, run_dir, parent_run_id=parent_run_id)
    run = tracker.child(f"task-{index}", key=f"task-{index}")
    run.log_params({"index": index})
    for step in range(steps):
        run.log_metrics({"value": index + step / 100, "step_seconds": 0.0}, step=step)
        run.set_tags({"progress": step})
    tracker.end(run)
    tracker.close()
    queue.put((index, run.run_id, tracker.pending, tracker.lock_retries))


def test_concurrent_writers_share_one_sqlite_store(tmp_path):
    """6 processes write at once into one embedded SQLite store (as concurrent array tasks do): every write
    arrives, nothing is left pending ("database is locked" is retried with back-off)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"tracking.uri={uri}"])
    parent = Tracker(cfg, tmp_path / "run")  # the submitting process creates the store and the parent run
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    n, steps = 6, 30
    procs = [ctx.Process(target=_writer, args=(uri, str(tmp_path / "run"), parent.parent.run_id, i, steps, queue))
             for i in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    parent.finish()
    assert all(pending == 0 for _, _, pending, _ in results), results
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for index, run_id, _, _ in sorted(results):
        r = client.get_run(run_id)
        assert r.info.status == "FINISHED" and r.data.params["index"] == str(index)
        assert r.data.tags["mlflow.parentRunId"] == parent.parent.run_id
        assert _metric_steps(uri, run_id, "value") == list(range(steps))
    assert not (tmp_path / "run" / "mlflow" / "pending").exists()
    print(f"\n{n} writers x {steps * 2 + 3} writes on one SQLite store: all arrived; "
          f"'database is locked' retries: {sum(r[3] for r in results)}")


def test_rerun_with_changed_settings_keeps_params_and_tags_the_changes(tmp_path, monkeypatch):
    """Real SQLite store: a run directory re-run with another value must not lose the batch (MLflow params are immutable)."""
    from rift_dist.config import RunConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RunConfig()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(cfg, tmp_path / "run")
    first.parent.log_params({"data.train_subset": -5, "seed": 0})
    first.finish("FAILED")
    again = Tracker(cfg, tmp_path / "run")  # same run directory: the same parent run is continued
    assert again.parent.run_id == first.parent.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.parent.log_params({"data.train_subset": 4000, "seed": 0, "train.epochs": 8})
        again.parent.flush()
    assert any("param_changed" in str(c.message) for c in caught)
    assert not any("rejected" in str(c.message) for c in caught)
    data = again.client.get_run(again.parent.run_id).data
    assert data.params == {"data.train_subset": "-5", "seed": "0", "train.epochs": "8"}  # the new key arrived
    assert data.tags["rift.param_changed.data.train_subset"] == "-5 -> 4000"
    again.finish("FINISHED")


def test_unreachable_server_at_start_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    """No server at the start: one warning naming the URI and what happens; tracking calls become no-ops."""
    from rift_dist.config import RunConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(RunConfig(), tmp_path / "run")
    off = [str(c.message) for c in caught if "tracking is off" in str(c.message)]
    assert len(off) == 1 and "http://127.0.0.1:9" in off[0] and "goes on untracked" in off[0]
    assert "\n" not in off[0]
    assert not tracker.active
    tracker.parent.log_metrics({"x": 1.0}, step=1)  # no error, no network
    tracker.finish("FINISHED")


def test_no_param_lost_to_a_bad_key_or_a_long_value(tmp_path, monkeypatch):
    """Real SQLite store: one key MLflow refuses used to sink its whole batch of 100; long values were cut silently."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from rift_dist.config import RunConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RunConfig()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(cfg, tmp_path / "run")
    params = {f"section.key_{i}": i for i in range(165)}
    params["eval.weird=key"] = "x"
    params["data.long"] = "y" * 7000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.parent.log_params(params)
        tracker.parent.flush()
    assert not any("rejected" in str(c.message) for c in caught)
    run = tracker.client.get_run(tracker.parent.run_id)
    assert len(run.data.params) == 167  # all arrived
    sane = [k for k in run.data.params if k.startswith("eval.weird")]
    assert len(sane) == 1 and "=" not in sane[0]
    assert run.data.tags[f"rift.param_key.{sane[0]}"] == "eval.weird=key"
    assert len(run.data.params["data.long"]) == MAX_PARAM_VAL_LENGTH
    assert "7000 characters" in run.data.tags["rift.param_truncated.data.long"]
    local = tracker.client.download_artifacts(tracker.parent.run_id, "params_full.json", str(tmp_path))
    full = json.loads(Path(local).read_text())
    assert full["data.long"] == "y" * 7000 and full["eval.weird=key"] == "x"
    tracker.finish("FINISHED")
