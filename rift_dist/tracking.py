"""MLflow tracking: one parent run per pipeline, one child run per stage (and per alpha).

Only the main process logs (other ranks get a tracker that does nothing).  The
embedded default is a SQLite store plus an artefact folder beside the run
directory (``<run_dir>/../mlflow.db``, ``<run_dir>/../mlartifacts``); a
tracking server is used when ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` names
one.  Logging never kills a run: a failing call is retried with back-off
(SQLite "database is locked"), then its metrics are buffered and re-sent on a
later call, with one warning.  Telemetry is switched off.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARENT_FILE = "mlflow_run.json"


def default_tracking_uri(run_dir: str | Path) -> str:
    """The embedded store for a run directory: ``sqlite:///<parent>/mlflow.db``."""
    parent = Path(run_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{parent / 'mlflow.db'}"


def resolve_tracking_uri(cfg, run_dir: str | Path) -> str:
    """``tracking.uri``, else env ``MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


class _Null:
    """A run handle that does nothing (ranks other than 0, tracking disabled)."""

    run_id = None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def flush(self) -> None:
        pass


class RunHandle(_Null):
    """One MLflow run; every call is safe (retried, then buffered) and never raises."""

    def __init__(self, tracker: "Tracker", run_id: str):
        self.tracker = tracker
        self.run_id = run_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log ``{name: float}`` at ``step`` (buffered if the store is unreachable)."""
        ts = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.tracker._metrics(self.run_id, clean, step or 0, ts)

    def log_params(self, params: dict) -> None:
        """Log params (values turned to strings, at most 6000 characters)."""
        self.tracker._params(self.run_id, params)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """Upload a file to the run's artefacts."""
        self.tracker._safe("log_artifact", self.tracker.client.log_artifact, self.run_id, str(path), subdir)

    def set_tags(self, tags: dict) -> None:
        """Set string tags on the run."""
        for k, v in tags.items():
            self.tracker._safe("set_tag", self.tracker.client.set_tag, self.run_id, k, str(v))

    def flush(self) -> None:
        """Try to send buffered metrics now."""
        self.tracker._flush()


class Tracker:
    """MLflow parent/child runs for one pipeline.

    Args:
        cfg: the RunConfig (tracking section, name).
        run_dir: the run directory; the parent run id is kept in ``<run_dir>/mlflow_run.json``
            so a re-run (or a requeued job) continues the same parent run.
        active: False on ranks other than 0 or when tracking is disabled.
        parent_run_id: attach to an existing parent run (jobs of a submitted pipeline).
    """

    retries = 5

    def __init__(self, cfg, run_dir: str | Path, active: bool = True, parent_run_id: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.active = bool(active and cfg.tracking.enabled)
        self.parent: _Null = _Null()
        self._buffer: list[tuple[str, dict, int, int]] = []
        self._warned = False
        self.uri = None
        self.client = None
        if not self.active:
            return
        try:
            import mlflow  # noqa: F401  (heavy import only where used)
            from mlflow.tracking import MlflowClient

            self.uri = resolve_tracking_uri(cfg, run_dir)
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment_id(cfg.tracking.experiment)
            self.parent = RunHandle(self, parent_run_id or self._parent_run_id())
        except Exception as exc:  # never let tracking stop a run
            warnings.warn(f"MLflow tracking is off for this run: could not reach {self.uri}: {exc}", stacklevel=2)
            self.active = False
            self.parent = _Null()

    # ------------------------------------------------------------------ internals
    def _retry(self, fn, *args, **kwargs):
        delay = 0.2
        for attempt in range(self.retries):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == self.retries - 1:
                    raise
                if "locked" not in str(exc).lower() and attempt >= 1:
                    raise
                time.sleep(delay)
                delay *= 2

    def _safe(self, what: str, fn, *args):
        try:
            return self._retry(fn, *args)
        except Exception as exc:
            self._warn(what, exc)
            return None

    def _warn(self, what: str, exc: Exception) -> None:
        if not self._warned:
            warnings.warn(
                f"MLflow call {what} failed ({type(exc).__name__}: {str(exc)[:200]}); training goes on, "
                f"metrics are buffered and sent when {self.uri} answers again",
                stacklevel=3,
            )
            self._warned = True

    def _experiment_id(self, name: str) -> str:
        exp = self._retry(self.client.get_experiment_by_name, name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        try:
            return self._retry(self.client.create_experiment, name, location)
        except Exception:
            exp = self.client.get_experiment_by_name(name)  # created concurrently
            if exp is None:
                raise
            return exp.experiment_id

    def _parent_run_id(self) -> str:
        marker = self.run_dir / PARENT_FILE
        if marker.is_file():
            data = json.loads(marker.read_text())
            if data.get("tracking_uri") == self.uri:
                try:
                    run = self.client.get_run(data["run_id"])
                    if run.info.lifecycle_stage == "active":
                        self.client.update_run(run.info.run_id, status="RUNNING")
                        return run.info.run_id
                except Exception:
                    pass
        run = self._retry(
            self.client.create_run, self.experiment_id, None, {"rift.run_dir": str(self.run_dir.resolve())},
            self.cfg.name,
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": self.uri}))
        os.replace(tmp, marker)
        return run.info.run_id

    def _metrics(self, run_id: str, metrics: dict, step: int, ts: int) -> None:
        if not self.active:
            return
        self._buffer.append((run_id, metrics, step, ts))
        self._flush()

    def _flush(self) -> None:
        if not self.active or not self._buffer:
            return
        from mlflow.entities import Metric

        pending, self._buffer = self._buffer, []
        for i, (run_id, metrics, step, ts) in enumerate(pending):
            try:
                self._retry(
                    self.client.log_batch, run_id, [Metric(k, v, ts, step) for k, v in metrics.items()], [], []
                )
            except Exception as exc:
                self._warn("log_batch", exc)
                self._buffer = pending[i:] + self._buffer
                return
        if self._warned:
            warnings.warn(f"MLflow is reachable again: {len(pending)} buffered metric batches sent", stacklevel=3)
            self._warned = False

    def _params(self, run_id: str, params: dict) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._safe("log_params", self.client.log_batch, run_id, [], items[i:i + 100], [])

    # ------------------------------------------------------------------ public
    def child(self, name: str, key: str | None = None, params: dict | None = None, parent: _Null | None = None) -> _Null:
        """A child run called ``name`` of the pipeline's parent run (or of ``parent``); ``key`` (default
        ``name``) identifies it so a re-run or requeued job continues the same child run instead of
        creating a new one."""
        if not self.active:
            return _Null()
        key = key or name
        store = self.run_dir / "mlflow" / (re.sub(r"[^A-Za-z0-9_.=-]", "_", key) + ".json")
        run_id = json.loads(store.read_text())["run_id"] if store.is_file() else None
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return RunHandle(self, run_id)
            except Exception:
                pass
        parent_id = parent.run_id if parent is not None and parent.run_id else self.parent.run_id
        tags = {"mlflow.parentRunId": parent_id, "rift.stage": name}
        run = self._safe("create_run", self.client.create_run, self.experiment_id, None, tags, name)
        if run is None:
            return _Null()
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"run_id": run.info.run_id, "key": key}))
        os.replace(tmp, store)  # one file per child: concurrent array tasks never race on it
        handle = RunHandle(self, run.info.run_id)
        if params:
            handle.log_params(params)
        return handle

    @contextmanager
    def stage(self, name: str, key: str | None = None, params: dict | None = None, parent: _Null | None = None):
        """Context manager: a child run that is marked FINISHED, or FAILED on an exception."""
        run = self.child(name, key, params, parent)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            self.end(run, status)

    def end(self, run: _Null, status: str = "FINISHED") -> None:
        """Mark ``run`` terminated with ``status`` (after flushing buffered metrics)."""
        if not self.active or run.run_id is None:
            return
        self._flush()
        self._safe("set_terminated", self.client.set_terminated, run.run_id, status)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and mark the parent run terminated."""
        self.end(self.parent, status)
        if self._buffer:
            warnings.warn(f"MLflow: {len(self._buffer)} metric batches could not be sent to {self.uri}", stacklevel=2)
