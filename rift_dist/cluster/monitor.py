"""``rift status``, ``rift cancel`` and waiting: the state of a run's jobs, tasks and stages.

Reads ``submission.json`` (:func:`read_submission`; written by :mod:`rift_dist.cluster.submission`),
asks SLURM (``squeue``, then ``sacct``) or submitit's result files (local and debug executors) for each
task's state (:func:`job_states`), compares with what is on disk (:func:`task_done_on_disk`: the stage
table's done checks) and names the failed tasks with the command that re-submits them.  A run started
with ``rift run`` (no ``submission.json``) gets :func:`local_status`.  Both send MLflow writes that
earlier processes could not send.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from rift_dist.checkpoint_ids import newest_checkpoint_position
from rift_dist.cluster.job import read_events
from rift_dist.layout import CONFIG, SUBMISSION, RunLayout
from rift_dist.cluster.profile import ClusterError, last_line
from rift_dist.stages import STAGE_TABLE, STAGES, resolve
from rift_dist.stages import parts as stage_parts
from rift_dist.stages import stage as stage_entry



ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "SUBMITTED")


FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "BOOT_FAIL", "DEADLINE", "ERROR")


def read_submission(run_dir: str | Path) -> dict:
    """The run's ``submission.json``.

    Raises:
        ClusterError: when there is none (names the file and how to make one).
    """
    path = RunLayout(run_dir).submission
    if not path.is_file():
        raise ClusterError(f"{path} not found: {run_dir} was not submitted with `rift submit` "
                           f"(or the path is wrong)")
    return json.loads(path.read_text())


def write_submission(run_dir: str | Path, record: dict) -> None:
    """Write ``submission.json`` atomically."""
    path = RunLayout(run_dir).submission
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def _sacct(ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    try:
        proc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        out.update({x: state.strip() for x in _expand_array_id(jid.strip())})
    return out


def _squeue(ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    wanted = set(ids)
    try:
        proc = subprocess.run(["squeue", "-h", "--me", "--array", "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        if line.count("|") < 2:
            continue
        jid, state, reason = line.split("|", 2)
        label = state.strip() + (f" ({reason.strip()})" if reason.strip() and reason.strip() != "None" else "")
        for x in _expand_array_id(jid.strip()):
            if x.split("_")[0] in wanted:
                out[x] = label
    return out


def _expand_array_id(jid: str) -> list[str]:
    """``123_[0-2,5%4]`` -> 123_0, 123_1, 123_2, 123_5; other ids unchanged."""
    if "_[" not in jid:
        return [jid]
    base, rest = jid.split("_[", 1)
    rest = rest.rstrip("]").split("%")[0]
    out = []
    for part in rest.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def _result_state(folder: str, job_id: str) -> tuple[str, str] | None:
    """(state, error) from submitit's result pickle of a task, or None when it has none yet."""
    path = Path(folder) / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            outcome, payload = pickle.load(fh)
    except Exception:  # noqa: BLE001 - an unreadable pickle just means "unknown"
        return None
    if outcome == "success":
        return "COMPLETED", ""
    return "FAILED", last_line(str(payload))


def job_states(record: dict) -> dict[str, str]:
    """{task job id: state} for every task of every submission of a run.

    SLURM: ``squeue`` (pending / running, with the reason) then ``sacct`` (finished); local and
    debug: the state recorded by the waiting process, or submitit's result files.
    """
    tasks = [(job, t) for sub in record.get("submissions", []) for job in sub["jobs"] for t in job["tasks"]]
    states: dict[str, str] = {}
    if record.get("executor") == "slurm":
        bases = sorted({job["job_id"] for job, _ in tasks})
        queued = _squeue(bases)
        finished = _sacct(bases)
        for job, t in tasks:
            jid = t["job_id"]
            states[jid] = queued.get(jid) or finished.get(jid) or (_result_state(job["folder"], jid) or ("UNKNOWN",))[0]
    else:
        for job, t in tasks:
            found = _result_state(job["folder"], t["job_id"])
            states[t["job_id"]] = t.get("state") if t.get("state") in ("COMPLETED", "FAILED") else (
                found[0] if found else t.get("state", "UNKNOWN"))
    return states


def _outputs_summary(run_dir: Path) -> str:
    """One line: which stages are done, how many partial results (modules, alphas) exist."""
    bits = []
    for s in STAGE_TABLE:
        partial = resolve(s.results)(run_dir) if s.results else ""
        bits.append(f"{s.name} done" if RunLayout(run_dir).done_marker(s.name).is_file() else
                    f"{s.name} {partial}" if partial else f"{s.name} -")
    return ", ".join(bits)


def task_done_on_disk(run_dir: str | Path, job: dict, task: dict) -> bool:
    """Whether the work of a recorded task is on disk (done by this task or by a later re-submission).

    Part ``stage``: the stage's done marker; a piece of a stage's shards: its :attr:`Part.done`, else
    (the gathers) the stage's done marker.
    """
    run_dir = Path(run_dir)
    part, args = job["part"], task.get("args", {})
    if part == "stage":
        return RunLayout(run_dir).done_marker(args.get("stage", job["stage"])).is_file()
    found = stage_parts().get(part)
    if found is None:
        return False
    if found[1].done:
        return bool(resolve(found[1].done)(run_dir, args))
    return RunLayout(run_dir).done_marker(found[0].name).is_file()


def _lock_holder(run_dir: Path) -> str | None:
    """'host H, PID P, command C, since S' of the live process holding the run directory's lock, or None.

    Probes the lock (``flock``, non-blocking, released at once) without creating or writing anything.
    """
    import fcntl

    from rift_dist.run_lock import _describe

    path = RunLayout(run_dir).lock
    if not path.is_file():
        return None
    with open(path) as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(fh.read())
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def stage_state_on_disk(run_dir: Path, stage: str) -> str:
    """A stage's state read from the run directory: 'done', 'in progress (...)' or 'not started'."""
    entry = stage_entry(stage)
    layout = RunLayout(run_dir)
    folder = layout.stage_dir(stage)
    if layout.done_marker(stage).is_file():
        return "done"
    if entry.checkpoints and (position := newest_checkpoint_position(layout.checkpoints(stage))) is not None:
        epoch, step = position
        where = f"epoch {epoch + 1}, step {step}" if step else f"{epoch} epoch(s) done"
        return f"in progress (checkpoint: {where})"
    partial = resolve(entry.results)(run_dir) if entry.results else ""
    if partial:
        return f"in progress ({partial})"
    return "in progress" if folder.is_dir() and any(folder.iterdir()) else "not started"


def _pending_ops(run_dir: Path) -> int:
    """How many MLflow writes wait in ``mlflow/pending/*.json`` files under ``run_dir``."""
    n = 0
    for path in RunLayout(run_dir).pending_files():
        try:
            n += len(json.loads(path.read_text()).get("ops", []))
        except (OSError, ValueError):
            continue
    return n


def local_status(run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """``rift status`` of a run started with ``rift run`` (no ``submission.json``).

    Prints whether a process is running on the directory (its lock holder), each stage's state on disk
    (done, in progress with the checkpoint's epoch / step or the modules and alphas done, not started),
    the MLflow parent run, and sends the MLflow writes that earlier processes could not send
    (``<run_dir>/mlflow/pending``: metrics, params, tags, statuses and buffered run creations), saying
    how many were sent and how many still wait.

    Returns:
        {"states": {stage: state}, "failed": [], "active": [lock holder, if any],
        "pending_sent": int, "pending_left": int}.

    Raises:
        ClusterError: when ``run_dir`` is not a run directory (no ``config.yaml``); nothing is written.
    """
    run_dir = Path(run_dir).resolve()
    if not RunLayout(run_dir).config.is_file():
        raise ClusterError(f"{run_dir} is not a rift run directory (it has no {CONFIG} nor {SUBMISSION}); "
                           f"give the --run-dir of a `rift run` or `rift submit`")
    holder = _lock_holder(run_dir)
    log(f"run {run_dir} (local: started with `rift run`, no {SUBMISSION})")
    log(f"  {'running: ' + holder if holder else 'no rift process is running on it'}")
    states = {s: stage_state_on_disk(run_dir, s) for s in STAGES}
    for s, state in states.items():
        log(f"  {s:<12} {state}")
    before = _pending_ops(run_dir)
    marker = RunLayout(run_dir).mlflow_parent
    if marker.is_file():
        data = json.loads(marker.read_text())
        log(f"  MLflow parent run {data.get('run_id')} at {data.get('tracking_uri')}")
        if before:
            _replay_local_pending(run_dir, data)
    elif before:
        log(f"  MLflow: {before} buffered write(s) but no {marker.name}: cannot tell which parent run they belong to")
    left = _pending_ops(run_dir)
    if before:
        log(f"  MLflow: sent {before - left} buffered write(s)" +
            (f"; {left} still wait (the store does not answer): run `rift status {run_dir}` again later"
             if left else ""))
    return {"states": states, "failed": [], "active": [holder] if holder else [],
            "pending_sent": before - left, "pending_left": left}


def _replay_local_pending(run_dir: Path, marker: dict) -> None:
    """Send the pending MLflow writes of a local run (and of its sub-run directories) to its parent's store."""
    try:
        from rift_dist.config import load_config
        from rift_dist.tracking import Tracker

        cfg = load_config(RunLayout(run_dir).config)
        cfg.tracking.enabled = True
        cfg.tracking.uri = marker.get("tracking_uri") or cfg.tracking.uri
        for owner in RunLayout(run_dir).pending_owners():
            parent = marker.get("run_id")
            sub = RunLayout(owner).mlflow_parent
            if owner != run_dir and sub.is_file():
                parent = json.loads(sub.read_text()).get("run_id", parent)
            Tracker(cfg, owner, parent_run_id=parent).close()
    except Exception as exc:  # noqa: BLE001 - status must still print
        print(f"rift: could not send buffered MLflow writes: {type(exc).__name__}: {exc}", file=sys.stderr)


def status(run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Print every job and task of a run with its state; name failed tasks and how to re-submit them.

    Also sends MLflow writes that earlier jobs could not send (``<run_dir>/mlflow/pending``).  A run
    without ``submission.json`` (started with ``rift run``) gets :func:`local_status`.

    Returns:
        {"states": {task job id: state}, "failed": [task descriptions], "active": [...]}.

    Raises:
        ClusterError: when ``run_dir`` is neither a submitted nor a local run directory.
    """
    run_dir = Path(run_dir).resolve()
    if not RunLayout(run_dir).submission.is_file():
        return local_status(run_dir, log)
    record = read_submission(run_dir)
    _replay_pending(run_dir, record)
    states = job_states(record)
    tr = record.get("tracking", {})
    log(f"run {run_dir}")
    log(f"  executor {record.get('executor')}, profile {record.get('profile', {}).get('name')}; MLflow parent run "
        f"{tr.get('parent_run_id')} at {tr.get('uri')} (experiment {tr.get('experiment')})")
    requeues: dict[str, int] = {}  # checkpoint() calls (= requeues) per task job id
    for e in read_events(run_dir):
        if e["event"] == "checkpoint":
            requeues[str(e.get("job_id"))] = requeues.get(str(e.get("job_id")), 0) + 1
    failed, active = [], []
    for n, sub in enumerate(record.get("submissions", []), 1):
        log(f"submission {n} ({sub['time']}){' --only ' + ' '.join(sub['only']) if sub.get('only') else ''}:")
        log(f"  {'job':<19} {'id':<14} {'task':>4}  {'state':<34} what")
        for job in sub["jobs"]:
            for t in job["tasks"]:
                state = states.get(t["job_id"], "UNKNOWN")
                task = str(t["index"]) if job["array"] else "-"
                n_requeued = requeues.get(t["job_id"], 0)
                shown = state + (f", requeued {n_requeued}x" if n_requeued else "")
                log(f"  {job['name']:<19} {t['job_id']:<14} {task:>4}  {shown:<34} {t['label']}")
                word = state.split()[0]
                if word in FAILED_STATES or word.startswith("CANCELLED"):
                    err = t.get("error") or (_result_state(job["folder"], t["job_id"]) or ("", ""))[1]
                    if "Dependency" in state or (word.startswith("CANCELLED") and job.get("dependency")
                                                 and not err):
                        continue  # cancelled because an earlier job failed: not a failure of its own
                    failed.append((job, t, state, err))
                elif word in ACTIVE_STATES:
                    active.append(t["job_id"])
    log(f"outputs: {_outputs_summary(run_dir)}")
    still_failed = [(j, t, s, e) for j, t, s, e in failed if not task_done_on_disk(run_dir, j, t)]
    executor_flag = "" if record.get("executor") == "slurm" else f" --{record.get('executor')}"
    for job, t, state, err in still_failed:
        what = f"{job['name']} task {t['index']} ({t['label']})" if job["array"] else f"{job['name']} ({t['label']})"
        log(f"FAILED: {what}: {state}{' — ' + err if err else ''}; log: {job['folder']}/{t['job_id']}_0_log.err")
        name = t["names"][0] if t.get("names") else str(t["index"])
        log(f"  re-submit it alone: rift submit {run_dir} --only {job.get('family') or job['name']}"
            f"{':' + name if job['array'] else ''}"
            f"{executor_flag}")
    if still_failed:
        log(f"  or re-submit everything that is not done (failed tasks and the jobs after them): "
            f"rift submit {run_dir}{executor_flag}")
    return {"states": states, "failed": [f"{j['name']}:{t['label']}" for j, t, _, _ in still_failed],
            "active": active}


def _replay_pending(run_dir: Path, record: dict) -> None:
    """Send MLflow writes saved by jobs that ended while the store was down."""
    tr = record.get("tracking", {})
    if not tr.get("enabled") or not RunLayout(run_dir).pending_files():
        return
    try:
        from rift_dist.config import load_config
        from rift_dist.tracking import Tracker

        cfg = load_config(RunLayout(run_dir).config)
        cfg.tracking.uri = tr.get("uri") or cfg.tracking.uri
        for pending in RunLayout(run_dir).pending_owners():
            Tracker(cfg, pending, parent_run_id=tr.get("parent_run_id")).close()
    except Exception as exc:  # noqa: BLE001 - status must still print
        print(f"rift: could not send buffered MLflow writes: {exc}", file=sys.stderr)


def cancel(run_dir: str | Path, log: Callable[[str], None] = print) -> list[str]:
    """Cancel every queued or running job of a run (SLURM: scancel; local: SIGTERM to the job's process).

    Marks the MLflow parent run KILLED.  Returns the ids cancelled.

    Raises:
        ClusterError: no submission, or scancel failing.
    """
    run_dir = Path(run_dir).resolve()
    record = read_submission(run_dir)
    states = job_states(record)
    active = [jid for jid, s in states.items() if s.split()[0] in ACTIVE_STATES or s in ("RUNNING", "SUBMITTED")]
    if not active:
        log(f"rift: no queued or running job in {run_dir}")
        return []
    if record.get("executor") == "slurm":
        bases = sorted({jid.split("_")[0] for jid in active})  # an array's id cancels all its remaining tasks
        proc = subprocess.run(["scancel", *bases], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"scancel failed: {proc.stderr.strip() or proc.stdout.strip()}")
    else:
        for jid in active:
            pid = int(jid.split("_")[0]) if jid.split("_")[0].isdigit() else 0
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") if pid else ""
            except OSError:
                cmdline = ""
            if "submitit" in cmdline:
                os.kill(pid, signal.SIGTERM)
    tr = record.get("tracking", {})
    if tr.get("enabled") and tr.get("parent_run_id"):
        try:
            from rift_dist.config import load_config
            from rift_dist.tracking import Tracker

            cfg = load_config(RunLayout(run_dir).config)
            cfg.tracking.uri = tr.get("uri") or cfg.tracking.uri
            tracker = Tracker(cfg, run_dir, parent_run_id=tr["parent_run_id"])
            tracker.end(tracker.parent, "KILLED")
            tracker.close()
        except Exception as exc:  # noqa: BLE001 - the jobs are cancelled either way
            print(f"rift: could not mark the MLflow run killed: {exc}", file=sys.stderr)
    log(f"rift: cancelled {len(active)} job(s)/task(s): {', '.join(sorted(active))}")
    return active


def wait(run_dir: str | Path, timeout_s: float = 0, poll_s: float = 5.0, log: Callable[[str], None] = print) -> dict:
    """Wait until no job of the run is queued or running; print state changes.

    Returns :func:`job_states`' final dict.

    Raises:
        ClusterError: on ``timeout_s`` (> 0) running out.
    """
    record = read_submission(run_dir)
    start = time.time()
    seen: dict[str, str] = {}
    while True:
        states = job_states(record)
        for jid, s in states.items():
            if seen.get(jid) != s:
                log(f"  {jid}: {s}")
        seen = states
        if not any(s.split()[0] in ACTIVE_STATES for s in states.values()):
            return states
        if timeout_s and time.time() - start > timeout_s:
            raise ClusterError(f"jobs of {run_dir} still active after {timeout_s:.0f}s")
        time.sleep(poll_s)
