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


def every_stage_tracked_once(uri: str, run_dir):
    """Assert the pipeline of ``run_dir`` is in the store at ``uri``: its parent FINISHED and one FINISHED run with
    metrics per stage under it; returns (client, parent run, {stage run name: [runs]})."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert parent.info.status == "FINISHED"
    children = _runs_by_name(client, parent.info.experiment_id, parent.info.run_id)
    assert sorted(children) == sorted(["adversarial_training", "mrc", "finetune", "interpolation", "evaluation"])
    for name, runs in children.items():
        assert len(runs) == 1, (name, len(runs))
        assert runs[0].info.status == "FINISHED" and runs[0].data.metrics, name
    return client, parent, children


def _runs_by_name(client, experiment_id: str, parent_id: str) -> dict[str, list]:
    """{run name: [runs]} of the direct children of ``parent_id``."""
    out: dict[str, list] = {}
    for r in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000):
        out.setdefault(r.info.run_name, []).append(r)
    return out


def test_continued_run_logs_each_metric_step_once(mlflow_server, tmp_path):
    """A stage killed after logging steps 1-3 and resumed from an older checkpoint re-logs steps 2-3: the
    continued run (a new process: new Tracker, same run directory) must hold each step once, the value
    logged first; a changed timing metric is dropped quietly, a changed result with one warning."""
    from mlflow.tracking import MlflowClient

    cfg = load_config(None, [f"tracking.uri={mlflow_server.uri}", "name=dedupe"])
    run_dir = tmp_path / "run"
    first = Tracker(cfg, run_dir)
    run = first.child("adversarial_training")
    for step in (1, 2, 3):
        run.log_metrics({"train_loss": 2.0 / step, "epoch_seconds": 1.0}, step=step)
    first.close()  # killed: the child run is never ended

    again = Tracker(cfg, run_dir)  # the re-run continues the parent run and (key file) the child run
    resumed = again.child("adversarial_training")
    assert resumed.run_id == run.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (2, 3, 4, 5):
            resumed.log_metrics({"train_loss": 2.0 / step, "epoch_seconds": 9.0}, step=step)
        resumed.log_metrics({"train_loss": 123.0}, step=4)  # not a duplicate of a resumed step: a changed value
        again.end(resumed)
        again.finish()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    history = client.get_metric_history(run.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert {m.step: m.value for m in history} == {s: 2.0 / s for s in (1, 2, 3, 4, 5)}
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "epoch_seconds")) == [1, 2, 3, 4, 5]
    assert again.duplicates_skipped == 2 * 2 + 1
    texts = [str(c.message) for c in caught if "already holds" in str(c.message)]
    assert len(texts) == 1 and "train_loss = 0.5 at step 4" in texts[0], texts


def test_child_runs_created_while_the_server_is_down_appear_after_rift_status(mlflow_server, tmp_path):
    """A stage (and a per-alpha grandchild) started while the server is down gets local run ids; its writes and
    creations wait in the pending file; `rift status RUN_DIR` on this LOCAL run (no submission.json) creates
    the runs once, in order (grandchild under its real parent), sends their metrics and statuses, and
    rewrites the key files with the real ids."""
    from mlflow.tracking import MlflowClient

    from rift_dist.cluster import status
    from rift_dist.config import dump_yaml

    cfg = load_config(None, [f"tracking.uri={mlflow_server.uri}", "name=catch-up"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_yaml(cfg, run_dir / "config.yaml")
    tracker = Tracker(cfg, run_dir)
    train = tracker.child("adversarial_training")
    train.log_metrics({"train_loss": 1.0}, step=1)
    tracker.end(train)

    mlflow_server.stop()
    t0 = time.time()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        interp = tracker.child("interpolation")
        alpha = tracker.child("alpha=0.5", key="alpha-0.5", parent=interp, params={"alpha": 0.5})
        alpha.log_metrics({"clean_accuracy": 0.5}, step=0)
        tracker.end(alpha)
        interp.log_metrics({"clean_accuracy": 0.5, "alpha": 0.5}, step=0)
        tracker.end(interp)
        tracker.finish("FINISHED")
    assert time.time() - t0 < 10, "run creation stalled while the server was down"
    assert interp.run_id.startswith("local-") and alpha.run_id.startswith("local-")
    assert json.loads(tracker.key_file("interpolation").read_text())["run_id"] == interp.run_id
    assert list((run_dir / "mlflow" / "pending").glob("*.json"))

    mlflow_server.start()
    lines: list[str] = []
    result = status(run_dir, log=lines.append)
    assert result["pending_left"] == 0 and result["pending_sent"] > 0, lines
    assert any("no rift process is running" in line for line in lines), lines
    assert not list((run_dir / "mlflow" / "pending").glob("*.json"))

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    parent = client.get_run(tracker.parent.run_id)
    assert parent.info.status == "FINISHED"
    children = _runs_by_name(client, parent.info.experiment_id, parent.info.run_id)
    assert sorted(children) == ["adversarial_training", "interpolation"]
    assert all(len(v) == 1 for v in children.values()), children
    interp_run = children["interpolation"][0]
    assert interp_run.info.status == "FINISHED" and interp_run.data.metrics["clean_accuracy"] == 0.5
    grand = _runs_by_name(client, parent.info.experiment_id, interp_run.info.run_id)
    assert list(grand) == ["alpha=0.5"] and len(grand["alpha=0.5"]) == 1
    assert grand["alpha=0.5"][0].data.params == {"alpha": "0.5"}
    assert grand["alpha=0.5"][0].data.metrics == {"clean_accuracy": 0.5}
    for key, run in (("interpolation", interp_run), ("alpha-0.5", grand["alpha=0.5"][0])):
        assert json.loads(tracker.key_file(key).read_text())["run_id"] == run.info.run_id  # real ids now


@pytest.mark.slow
def test_server_down_from_epoch_1_to_the_end_then_rift_status_tracks_every_stage(mlflow_server, tmp_path):
    """The issue's case: a tiny `rift run` whose server goes away after training epoch 1 and is back only after
    the run.  Every stage starting meanwhile is buffered (run creation included); `rift status RUN_DIR` on the
    local run then sends it: each stage's run exists once, FINISHED, with its metrics (train_loss at steps 1
    and 2, once each), and each alpha's run once under the interpolation run."""
    import threading

    from mlflow.tracking import MlflowClient

    from tests.integration.pipeline_helpers import ROOT, rift, shared_data, tiny_config

    if not (shared_data() / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")
    cfg = tiny_config(tmp_path, tracking={"uri": mlflow_server.uri})
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "rift_dist.cli", "run", str(cfg), "--run-dir", str(run_dir),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, stopper = [], None
    for line in proc.stdout:
        lines.append(line)
        if stopper is None and line.startswith("[train] epoch 1/"):
            stopper = threading.Thread(target=mlflow_server.stop)
            stopper.start()
    assert proc.wait(timeout=900) == 0, "".join(lines)[-4000:]
    assert stopper is not None, "".join(lines)[-3000:]
    stopper.join()
    out = "".join(lines)
    assert "did not answer" in out and "rift status" in out, out[-3000:]

    mlflow_server.start()
    status_out = rift("status", str(run_dir)).stdout
    assert "sent" in status_out and "still wait" not in status_out, status_out
    assert not list(run_dir.rglob("mlflow/pending/*.json"))

    client, parent, children = every_stage_tracked_once(mlflow_server.uri, run_dir)
    train_id = children["adversarial_training"][0].info.run_id
    assert sorted(m.step for m in client.get_metric_history(train_id, "train_loss")) == [1, 2]
    alphas = _runs_by_name(client, parent.info.experiment_id, children["interpolation"][0].info.run_id)
    assert len(alphas) == 3 and all(len(v) == 1 and v[0].data.metrics for v in alphas.values()), alphas
    print(f"\nrift status sent the buffered writes: {status_out.strip().splitlines()[-1]}")
