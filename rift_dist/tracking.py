"""MLflow tracking: one parent run per pipeline, one child run per stage (and per alpha, per array task).

Only the main process logs (other ranks get a tracker that does nothing).  The
embedded default is a SQLite store plus an artefact folder beside the run
directory (``<run_dir>/../mlflow.db``, ``<run_dir>/../mlartifacts``); a
tracking server is used when ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` names
one.  Telemetry is switched off.

Logging never stops or stalls a run:

* every write (metrics, params, tags, run status, artefacts) goes through one
  ordered queue.  SQLite "database is locked" errors (many array tasks writing
  to one store) are retried on the spot with exponential back-off;
* any other transient failure (server gone, timeout, HTTP 5xx) marks the store
  *down*: the queue keeps the writes, training goes on, one warning says so, and
  the queue is retried after 2 s, 4 s, ... (at most every 30 s) — never on every
  call, so a dead server costs nothing per step.  When the store answers again
  the buffered writes are sent in order and a second warning says how many;
* MLflow's own HTTP retry loop (7 retries with back-off, a 120 s timeout: minutes
  per call) is shortened for this process: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 0
  and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` = 10 s unless already set in the environment;
* writes still queued when the process ends (the server is still down) are
  saved to ``<run_dir>/mlflow/pending/*.json`` and sent by the next tracker that
  opens the same run directory (a later job, ``rift status``), with a warning
  naming the file;
* a write the store rejects for good (e.g. a param re-logged with another value)
  is dropped with a warning instead of blocking the queue.

Child runs are remembered in ``<run_dir>/mlflow/<key>.json`` (one file per key,
so concurrent array tasks never race on a shared file); a re-run or requeued
job continues its own child run instead of creating a new one.  Runs can be
created ahead of time (:meth:`Tracker.child` with ``status="SCHEDULED"``), which
is what ``rift submit`` does for every job and array task, so a job never needs
the store to be up to start logging.

Creating a child run is a buffered write like any other: when the store is down
(or writes are already queued), the run gets a local id (``local-<hex>``, written to
its key file) and a ``create`` operation is queued ahead of its writes; when the
store answers (at the next write, the end of a stage, the end of the process, or
``rift status RUN_DIR`` replaying a pending file) the run is created, the local id is
mapped to the store's id in every later write and in the key files, and everything
logged meanwhile follows in order.  So a stage that starts while the server is down
is tracked once it is back.

Continued runs do not get duplicate metrics: for a run this process did not create
(a re-run, a resumed stage, a requeued job), the first write of each metric key reads
that key's history once, and a (key, step) the run already holds is not logged again
(the stored value stays; a different value is reported in one warning, unless the
key is a timing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

from rift_dist.atomic import atomic_write_text
from rift_dist.layout import PARAMS_FULL, RunLayout

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

LOCAL_PREFIX = "local-"
"""Run ids handed out while a run's creation is buffered (mapped to the store's ids once it answers)."""
_TIMING_KEY = re.compile(r"(seconds|_s$|time|elapsed|duration)", re.IGNORECASE)


def is_local_id(run_id: str | None) -> bool:
    """Whether ``run_id`` is a local placeholder of a run whose creation is still buffered."""
    return bool(run_id) and str(run_id).startswith(LOCAL_PREFIX)

# MLflow error codes that will not go away by retrying: the write is dropped (with a warning).
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}


EXPERIMENT_KIND = "mlflow.experimentKind"
"""Experiment tag MLflow 3's UI reads to pick the experiment's landing page."""
ML_KIND = "custom_model_development"
"""Its value for a machine-learning (training runs) experiment, as opposed to "genai_development"."""

def default_tracking_uri(run_dir: str | Path) -> str:
    """The embedded store for a run directory: ``sqlite:///<parent>/mlflow.db``."""
    parent = Path(run_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{parent / 'mlflow.db'}"


def resolve_tracking_uri(cfg, run_dir: str | Path) -> str:
    """``tracking.uri``, else env ``MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


def limit_http_retries(timeout_s: int = 10) -> None:
    """Make MLflow's HTTP client fail fast (no internal retries, ``timeout_s`` per request) unless the
    user set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` already.

    The tracker buffers and retries on its own schedule, so MLflow's minutes-long retry loop would
    only stall training while a server is down.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))


class _Permanent(RuntimeError):
    """A queued write that can never be sent (e.g. for a run whose buffered creation was lost)."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later (store down, locked, timeout) rather than never."""
    if isinstance(exc, _Permanent):
        return False
    text = str(exc).lower()
    if "locked" in text or "timed out" in text or "timeout" in text or "connection" in text:
        return True
    code = getattr(exc, "error_code", None)
    return code not in _PERMANENT_CODES


def _param_value_limit() -> int:
    """MLflow's longest param value (6,000 characters in MLflow 3), read from MLflow itself."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except ImportError:  # pragma: no cover - MLflow without the constant
        return 6000


def mlflow_param_key(key: str) -> str:
    """``key`` itself when MLflow accepts it as a param / tag key, else a sanitised, still unique form.

    MLflow's rule (``mlflow.utils.validation``): characters in ``[\\w\\-. /:]``, a normalised relative
    path, at most 250 characters.  Other characters become ``_``, ``/`` becomes ``_`` and, when the key
    had to change, an 8-hex-digit hash of the original is appended so two keys never collide.
    """
    try:
        from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

        ok = validate_param_and_metric_name(key) and not path_not_unique(key)
    except ImportError:  # pragma: no cover
        ok = re.fullmatch(r"[\w\-. :]+", key) is not None
    if ok and len(key) <= 250:
        return key
    clean = re.sub(r"[^\w\-. :]", "_", key).strip(" .") or "param"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{clean[:240]}_{digest}"


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
    """One MLflow run; every call is queued (sent at once when the store answers) and never raises."""

    def __init__(self, tracker: "Tracker", run_id: str):
        self.tracker = tracker
        self._id = run_id

    @property
    def run_id(self) -> str:
        """The store's id of the run; a ``local-...`` placeholder while its creation is still buffered."""
        return self.tracker.resolve(self._id)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log ``{name: float}`` at ``step`` (None values skipped; buffered if the store is unreachable)."""
        ts = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self.tracker._submit(["metrics", self.run_id, clean, int(step or 0), ts])

    def log_params(self, params: dict) -> None:
        """Log params (values turned to strings; sent in batches of 100), none lost.

        MLflow refuses a whole batch for one bad key, and cuts values at 6,000 characters.  So keys it
        would refuse (a ``=`` or other characters outside ``[\\w\\-. /:]``, a non-normal path, over 250
        characters) are sanitised (:func:`mlflow_param_key`) with the original in tag
        ``rift.param_key.<sanitised>``; values over MLflow's limit are cut with tag
        ``rift.param_truncated.<key>`` saying so, and the full values of every sanitised or cut param go
        to the run's artefact ``params_full.json``.

        MLflow params are immutable.  When the run already holds some of these keys with other values
        (a run directory re-run with changed settings, e.g. after a failed first attempt), those keys
        are not re-sent (MLflow would reject the whole batch); their new values go to tags
        ``rift.param_changed.<key>`` ("old -> new") with one warning.  When the store cannot be read,
        everything is queued as before.
        """
        limit = _param_value_limit()
        items, renamed, cut, full = [], {}, {}, {}
        for k, v in params.items():
            key, text = mlflow_param_key(str(k)), str(v)
            if key != k:
                renamed[key] = str(k)
            if len(text) > limit:
                cut[key] = f"{len(text)} characters, cut to {limit}; the full value is in {PARAMS_FULL}"
                text = text[:limit]
            if key != k or key in cut:
                full[str(k)] = str(v)
            items.append([key, text])
        if renamed:
            self.set_tags({f"rift.param_key.{k}": v[:5000] for k, v in renamed.items()})
        if cut:
            self.set_tags({f"rift.param_truncated.{k}": v for k, v in cut.items()})
        if full:
            path = RunLayout(self.tracker.run_dir).params_full(self.run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(full, indent=1, sort_keys=True))
            self.log_artifact(path)
        try:
            # only when the store answered last time: a buffered queue means it is down (no 10 s wait)
            reachable = self.tracker.client is not None and not self.tracker._queue
            old = self.tracker.client.get_run(self.run_id).data.params if reachable else {}
        except Exception:  # noqa: BLE001  (store down: the queue handles it)
            old = {}
        changed = {k: f"{old[k]} -> {v}"[:5000] for k, v in items if k in old and old[k] != v}
        if changed:
            warnings.warn(f"MLflow run {self.run_id} already records {len(changed)} param(s) with other values "
                          f"(e.g. {next(iter(changed))}: {next(iter(changed.values()))}); MLflow params cannot change, "
                          f"so the new values are tags rift.param_changed.<key>", stacklevel=2)
            self.set_tags({f"rift.param_changed.{k}": v for k, v in changed.items()})
        items = [[k, v] for k, v in items if k not in old]
        for i in range(0, len(items), 100):
            self.tracker._submit(["params", self.run_id, items[i:i + 100]])

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """Upload a file to the run's artefacts (the file must still exist when a buffered upload is sent)."""
        self.tracker._submit(["artifact", self.run_id, str(path), subdir])

    def set_tags(self, tags: dict) -> None:
        """Set string tags on the run."""
        if tags:
            self.tracker._submit(["tags", self.run_id, {k: str(v) for k, v in tags.items()}])

    def flush(self) -> None:
        """Try to send buffered writes now (even while the store is marked down)."""
        self.tracker._drain(force=True)


class Tracker:
    """MLflow parent/child runs for one pipeline.

    Args:
        cfg: the RunConfig (tracking section, name).
        run_dir: the run directory; the parent run id is kept in ``<run_dir>/mlflow_run.json``
            so a re-run (or a requeued job) continues the same parent run.
        active: False on ranks other than 0 or when tracking is disabled.
        parent_run_id: attach to an existing parent run (jobs of a submitted pipeline); the
            store is then not contacted at all until the first write, so a job that starts
            while the server is down still logs (buffered).

    Never raises from logging calls; when the store cannot be reached at construction (and no
    ``parent_run_id`` is given), tracking is switched off for the process with a warning.
    """

    retries = 6
    """Attempts of one write while SQLite reports "database is locked" (0.2 s, 0.4 s, ... apart)."""
    max_backoff_s = 30.0
    """Longest wait between two attempts to reach a store that is down."""

    def __init__(self, cfg, run_dir: str | Path, active: bool = True, parent_run_id: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.active = bool(active and cfg.tracking.enabled)
        self.parent: _Null = _Null()
        self._queue: list[list] = []
        self._warned = False
        self._down_until = 0.0
        self._backoff = 2.0
        self._experiment: str | None = None
        self.lock_retries = 0
        """How many times a write was retried because SQLite said "database is locked"."""
        self._local_ids: dict[str, str] = {}  # local placeholder -> the store's run id, once created
        self._fresh: set[str] = set()  # runs this process created: nothing was logged to them before
        self._steps: dict[tuple[str, str], dict[int, float]] = {}  # (run, metric key) -> {step: value} in the store
        self._warned_values: set[str] = set()
        self.duplicates_skipped = 0
        """Metric values not re-logged because the run already held that key at that step."""
        self.stage_name: str | None = None
        """The stage now running (set by :func:`rift_dist.pipeline.run_stages`): recorded in the key file of
        every child run created meanwhile, so that :meth:`retire_stage` finds them."""
        self.uri = None
        self.client = None
        if not self.active:
            return
        try:
            import mlflow  # noqa: F401  (heavy import only where used)
            from mlflow.tracking import MlflowClient

            self.uri = resolve_tracking_uri(cfg, run_dir)
            if self.uri.startswith(("http://", "https://")):
                limit_http_retries()
            self.client = MlflowClient(tracking_uri=self.uri)
            if parent_run_id:
                self.parent = RunHandle(self, parent_run_id)
            else:
                self.parent = RunHandle(self, self._parent_run_id())
        except Exception as exc:  # never let tracking stop a run
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(f"MLflow tracking is off for this run: could not reach {self.uri} when the run started "
                          f"({type(exc).__name__}: {detail}). The run goes on untracked (its artefacts are in the run "
                          f"directory); check the server or unset MLFLOW_TRACKING_URI to use the local store.",
                          stacklevel=2)
            self.active = False
            self.parent = _Null()
            return
        self._load_pending()

    # ------------------------------------------------------------------ internals
    @property
    def experiment_id(self) -> str:
        """The id of experiment ``tracking.experiment`` (created when missing; looked up on first use)."""
        if self._experiment is None:
            self._experiment = self._experiment_id(self.cfg.tracking.experiment)
        return self._experiment

    def _retry(self, fn, *args, **kwargs):
        """Call ``fn``; retry with back-off while SQLite says "locked"; other errors raise at once."""
        delay = 0.2
        for attempt in range(self.retries):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == self.retries - 1 or "locked" not in str(exc).lower():
                    raise
                self.lock_retries += 1
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            warnings.warn(
                f"MLflow call {what} failed ({type(exc).__name__}: {str(exc)[:200]}); training goes on, "
                f"writes are buffered and sent when {self.uri} answers again",
                stacklevel=3,
            )
            self._warned = True

    def _experiment_id(self, name: str) -> str:
        """The experiment's id (created when missing), tagged as a machine-learning experiment.

        MLflow 3 opens an experiment without ``mlflow.experimentKind`` on its GenAI "Overview" of
        traces; ``custom_model_development`` makes it open on the training runs table.
        """
        exp = self._retry(self.client.get_experiment_by_name, name)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            try:
                exp_id = self._retry(self.client.create_experiment, name, location, {EXPERIMENT_KIND: ML_KIND})
                return exp_id
            except Exception:
                exp = self.client.get_experiment_by_name(name)  # created concurrently
                if exp is None:
                    raise
        if EXPERIMENT_KIND not in (exp.tags or {}):
            try:
                self._retry(self.client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND, ML_KIND)
            except Exception:  # noqa: BLE001 - cosmetic: never stop a run for it
                pass
        return exp.experiment_id

    def _parent_run_id(self) -> str:
        marker = RunLayout(self.run_dir).mlflow_parent
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
        self._fresh.add(run.info.run_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": self.uri}))
        os.replace(tmp, marker)
        return run.info.run_id

    def resolve(self, run_id: str | None) -> str | None:
        """The store's id for ``run_id`` (itself unless it is a local placeholder already created)."""
        return self._local_ids.get(run_id, run_id) if run_id else run_id

    def _unresolved(self, run_id: str) -> bool:
        return is_local_id(run_id) and run_id not in self._local_ids

    def _create_queued(self, local_id: str) -> bool:
        return any(op[0] == "create" and op[1] == local_id for op in self._queue)

    def _create(self, local_id: str, spec: dict) -> None:
        """Create the run buffered as ``local_id``; map the id and rewrite the key files that hold it."""
        tags = dict(spec["tags"])
        parent = tags.get("mlflow.parentRunId")
        if parent and self._unresolved(self.resolve(parent)):
            raise _Permanent(f"its parent run {parent} was never created")
        if parent:
            tags["mlflow.parentRunId"] = self.resolve(parent)
        run = self._retry(self.client.create_run, self.experiment_id, None, tags, spec["name"])
        real = run.info.run_id
        self._local_ids[local_id] = real
        self._fresh.add(real)
        directory = RunLayout(self.run_dir).mlflow_dir
        for path in directory.glob("*.json") if directory.is_dir() else []:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("run_id") == local_id:
                data["run_id"] = real
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, path)

    def _known_steps(self, run_id: str, key: str) -> dict[int, float]:
        """{step: value} of metric ``key`` already in the store for ``run_id`` (read once per key and run)."""
        cache = self._steps.get((run_id, key))
        if cache is None:
            cache = {}
            if run_id not in self._fresh:
                for m in self._retry(self.client.get_metric_history, run_id, key):
                    cache.setdefault(int(m.step), float(m.value))
            self._steps[(run_id, key)] = cache
        return cache

    def _new_metrics(self, run_id: str, metrics: dict, step: int) -> dict:
        """``metrics`` less the keys the run already holds at ``step`` (a resumed stage re-logging them)."""
        out = {}
        for k, v in metrics.items():
            known = self._known_steps(run_id, k)
            if step not in known:
                out[k] = v
                continue
            self.duplicates_skipped += 1
            old = known[step]
            if old != v and not (math.isnan(old) and math.isnan(v)) and not _TIMING_KEY.search(k) \
                    and run_id not in self._warned_values:
                self._warned_values.add(run_id)
                warnings.warn(f"MLflow run {run_id} already holds metric {k} = {old} at step {step}; the new value "
                              f"{v} is not logged (a continued run logs each metric once per step)", stacklevel=4)
        return out

    def _apply(self, op: list) -> None:
        """Send one queued write to the store."""
        from mlflow.entities import Metric, Param, RunTag

        kind, run_id = op[0], self.resolve(op[1])
        if kind == "create":
            self._create(op[1], op[2])
            return
        if self._unresolved(run_id):
            raise _Permanent(f"run {run_id} was never created (its creation was lost)")
        if kind == "metrics":
            _, _, metrics, step, ts = op
            metrics = self._new_metrics(run_id, metrics, int(step))
            if metrics:
                self._retry(self.client.log_batch, run_id, [Metric(k, v, ts, step) for k, v in metrics.items()],
                            [], [])
                for k, v in metrics.items():
                    self._steps[(run_id, k)][int(step)] = float(v)
        elif kind == "params":
            self._retry(self.client.log_batch, run_id, [], [Param(k, v) for k, v in op[2]], [])
        elif kind == "tags":
            self._retry(self.client.log_batch, run_id, [], [], [RunTag(k, v) for k, v in op[2].items()])
        elif kind == "status":
            self._retry(self.client.update_run, run_id, status=op[2])
        elif kind == "terminate":
            self._retry(self.client.set_terminated, run_id, op[2])
        elif kind == "delete":
            self._retry(self.client.delete_run, run_id)
        elif kind == "artifact":
            if Path(op[2]).is_file():
                self._retry(self.client.log_artifact, run_id, op[2], op[3])
        else:  # pragma: no cover - only written by this class
            raise ValueError(f"unknown tracking operation {kind!r}")

    def _submit(self, op: list) -> None:
        if not self.active:
            return
        self._queue.append(op)
        self._drain()

    def _drain(self, force: bool = False) -> bool:
        """Send queued writes in order; True when the queue is empty afterwards.

        While the store is marked down (a transient failure less than the back-off ago), does
        nothing unless ``force``.  A permanently rejected write is dropped with a warning.
        """
        if not self.active or not self._queue:
            return True
        if not force and time.time() < self._down_until:
            return False
        sent = 0
        was_down = self._warned
        while self._queue:
            op = self._queue[0]
            try:
                self._apply(op)
            except Exception as exc:
                if is_transient(exc):
                    self._warn(op[0], exc)
                    self._down_until = time.time() + self._backoff
                    self._backoff = min(2 * self._backoff, self.max_backoff_s)
                    return False
                warnings.warn(f"MLflow rejected a {op[0]} write for run {op[1]} and it is dropped: "
                              f"{type(exc).__name__}: {str(exc)[:300]}", stacklevel=3)
            self._queue.pop(0)
            sent += 1
        self._backoff = 2.0
        self._down_until = 0.0
        if was_down:
            warnings.warn(f"MLflow is reachable again: {sent} buffered writes sent to {self.uri}", stacklevel=3)
            self._warned = False
        return True

    def _pending_dir(self) -> Path:
        return RunLayout(self.run_dir).mlflow_pending

    def _load_pending(self) -> None:
        """Take over the writes earlier processes could not send (claimed by an atomic rename)."""
        directory = self._pending_dir()
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.json")):
            claimed = path.with_name(path.name + f".claimed-{os.getpid()}")
            try:
                os.rename(path, claimed)
            except OSError:
                continue  # another process took it
            try:
                data = json.loads(claimed.read_text())
                if data.get("tracking_uri") == self.uri:
                    self._queue.extend(data["ops"])
                    claimed.unlink()
                else:
                    os.rename(claimed, path)
            except (OSError, ValueError, KeyError):
                continue
        if self._queue:
            self._drain(force=True)

    def _spill(self) -> Path | None:
        """Save writes that could not be sent to ``<run_dir>/mlflow/pending/`` (None when there are none)."""
        if not self._queue:
            return None
        directory = self._pending_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        tmp = path.with_suffix(".tmp")
        ops = [[op[0], self.resolve(op[1]), *op[2:]] for op in self._queue]  # ids created meanwhile: the store's
        tmp.write_text(json.dumps({"tracking_uri": self.uri, "ops": ops}))
        os.replace(tmp, path)
        self._queue = []
        return path

    # ------------------------------------------------------------------ public
    @property
    def pending(self) -> int:
        """Number of writes waiting for the store."""
        return len(self._queue)

    def child(self, name: str, key: str | None = None, params: dict | None = None, parent: _Null | None = None,
              status: str | None = None, tags: dict | None = None) -> _Null:
        """A child run called ``name`` of the pipeline's parent run (or of ``parent``).

        ``key`` (default ``name``) identifies it: when ``<run_dir>/mlflow/<key>.json`` exists (a
        re-run, a requeued job, or a run created ahead of time by ``rift submit``), that run is
        continued and marked RUNNING (queued: works while the store is down); otherwise a new run
        is created -- at once when the store answers and nothing is queued, else buffered under a
        local id (``local-<hex>``, in the key file) and created, in order, when the store answers
        (the handle's ``run_id`` then reads the store's id).  ``status`` other than None sets the new
        run's status (``SCHEDULED`` for runs created ahead of time).  Returns a do-nothing handle when
        tracking is off or the store refuses the run for good (with a warning).
        """
        if not self.active:
            return _Null()
        key = key or name
        store = self.key_file(key)
        run_id = self.resolve(json.loads(store.read_text())["run_id"]) if store.is_file() else None
        if run_id and self._unresolved(run_id) and not self._create_queued(run_id):
            run_id = None  # a creation buffered by a process that died before saving it: create the run now
        if run_id:
            handle = RunHandle(self, run_id)
            self._submit(["status", run_id, status or "RUNNING"])
            if tags:
                handle.set_tags(tags)
            return handle
        parent_id = parent.run_id if parent is not None and parent.run_id else self.parent.run_id
        all_tags = {"mlflow.parentRunId": parent_id, "rift.stage": name, **{k: str(v) for k, v in (tags or {}).items()}}
        run_id = None
        if not self._queue and not self._unresolved(parent_id):
            try:
                run_id = self._retry(self.client.create_run, self.experiment_id, None, all_tags, name).info.run_id
                self._fresh.add(run_id)
            except Exception as exc:  # noqa: BLE001 - tracking never stops a run
                if not is_transient(exc):
                    warnings.warn(f"MLflow refused to create run {name!r}: {type(exc).__name__}: {str(exc)[:300]}; "
                                  f"it is not tracked", stacklevel=2)
                    return _Null()
                self._warn("create_run", exc)
                self._down_until = time.time() + self._backoff
        if run_id is None:  # the store is down (or writes are queued before it): buffer the creation
            run_id = f"{LOCAL_PREFIX}{uuid.uuid4().hex}"
            self._fresh.add(run_id)
            self._queue.append(["create", run_id, {"name": name, "tags": all_tags, "key": key}])
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.tmp")
        record = {"run_id": run_id, "key": key, "name": name}
        if self.stage_name:
            record["stage"] = self.stage_name
        tmp.write_text(json.dumps(record))
        os.replace(tmp, store)  # one file per child: concurrent array tasks never race on it
        handle = RunHandle(self, run_id)
        if status and status != "RUNNING":
            self._submit(["status", run_id, status])
        else:
            self._drain()  # a buffered creation is sent as soon as the store answers
        if params:
            handle.log_params(params)
        return handle

    def retire_stage(self, stage: str) -> list[str]:
        """Retire the child runs that an earlier run of ``stage`` created, when that stage's folder is gone
        (deleted by the user to redo it, e.g. with a changed config): each is tagged ``rift.superseded`` and
        moved to MLflow's deleted runs (restorable there), and its key file removed, so the stage starts new runs
        instead of continuing the old ones -- whose metrics describe artefacts no longer on disk, and which would
        keep their old values at every step the new run logs again.  Only runs whose key file names ``stage``
        (created while :attr:`stage_name` was set) are touched; runs created ahead of time by ``rift submit``
        are not.  Queued like any write when the store is down.

        Returns:
            the retired runs' ids (local ids for creations still buffered).
        """
        if not self.active:
            return []
        retired = []
        folder = RunLayout(self.run_dir).mlflow_dir
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(record, dict) or record.get("stage") != stage or "run_id" not in record:
                continue
            self._submit(["tags", record["run_id"], {"rift.superseded": "true"}])
            self._submit(["delete", record["run_id"]])
            path.unlink(missing_ok=True)
            retired.append(record["run_id"])
        return retired

    def key_file(self, key: str) -> Path:
        """The file that remembers the child run of ``key``: ``<run_dir>/mlflow/<key>.json``."""
        return RunLayout(self.run_dir).mlflow_key_file(key)

    @contextmanager
    def stage(self, name: str, key: str | None = None, params: dict | None = None, parent: _Null | None = None):
        """Context manager: a child run marked FINISHED, FAILED on an exception, or KILLED when the
        process is interrupted (:class:`rift_dist.interrupts.Interrupted` after SIGTERM / SIGINT, SystemExit,
        KeyboardInterrupt, e.g. a preempted job about to be requeued)."""
        from rift_dist.interrupts import Interrupted

        run = self.child(name, key, params, parent)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except (Interrupted, SystemExit, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            self.end(run, status)

    def end(self, run: _Null, status: str = "FINISHED") -> None:
        """Mark ``run`` terminated with ``status`` (after sending buffered writes)."""
        if not self.active or run.run_id is None:
            return
        self._queue.append(["terminate", getattr(run, "_id", run.run_id), status])
        self._drain(force=True)

    def finish(self, status: str = "FINISHED", end_parent: bool = True) -> None:
        """Send what is buffered, mark the parent run terminated (unless ``end_parent`` is False: a job
        of a submitted pipeline that is not the last one), and save what still cannot be sent."""
        if end_parent:
            self.end(self.parent, status)
        self.close()

    def close(self) -> None:
        """Last attempt to send buffered writes; what remains is saved to ``<run_dir>/mlflow/pending/``
        (sent by the next tracker on this run directory), with a warning."""
        if not self.active:
            return
        self._drain(force=True)
        path = self._spill()
        if path is not None:
            warnings.warn(f"MLflow: {self.uri} did not answer; the writes it missed are saved in {path} and will "
                          f"be sent by the next rift process on {self.run_dir} (e.g. `rift status {self.run_dir}`)",
                          stacklevel=2)
