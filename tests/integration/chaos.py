"""A chaos driver: run a tiny pipeline, SIGKILL its whole process group at chosen moments, re-run until it
finishes, and compare every artefact with an uninterrupted run's.

Kills are aimed at stages: the driver reads the run's output line by line and, for the stage a kill is
planned for, waits for ``[<stage>] started`` (the pipeline prints it when the stage really starts, not when
it is skipped as done) and then for a delay drawn from that stage's measured duration in the reference
run.  A kill "inside a checkpoint write" uses the fault point of :func:`rift_dist.checkpoint.save_atomic`
(env ``RIFT_FAULT_KILL_IN_SAVE``).  Results are a list of :class:`Fault` records and the artefact comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.pipeline_helpers import ROOT

STAGES = ("train", "mrc", "finetune", "interpolate", "evaluate")
# files whose bytes must equal the uninterrupted run's; summary.json is compared without its timing fields and
# its resume bookkeeping (resumed_examples: how many examples a resumed attack read from its progress files)
COMPARED = ("train/model.pt", "train/history.json", "mrc.csv", "finetune/model.pt", "interpolation.csv",
            "interpolate/model.pt", "summary.json")
_TIMING = re.compile(r"(seconds|_s$|time|elapsed|duration)", re.IGNORECASE)
# "_sha256" (rift_dist.atomic.write_json's checksum) covers the timing fields too, so it differs whenever they do
_BOOKKEEPING = re.compile(r"(seconds|_s$|time|elapsed|duration|^resumed_|^_sha256$)", re.IGNORECASE)


@dataclass
class Fault:
    """One injected fault: its kind, the stage it hit, and whether the run later finished equal."""

    kind: str
    stage: str
    at_s: float
    detail: str = ""


@dataclass
class ChaosResult:
    faults: list[Fault] = field(default_factory=list)
    attempts: int = 0
    unequal: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def kills_per_stage(self) -> dict[str, int]:
        out = {s: 0 for s in STAGES}
        for f in self.faults:
            out[f.stage] = out.get(f.stage, 0) + 1
        return out


def rift_cmd(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rift_dist.cli", "run", str(config), "--run-dir", str(run_dir), "--no-progress"]


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_reference(config: Path, run_dir: Path, timeout: int = 900) -> dict[str, float]:
    """Run uninterrupted; returns each stage's duration in seconds (from ``[stage] finished in Xs``)."""
    proc = subprocess.run(rift_cmd(config, run_dir), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"reference run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\[(\w+)\] finished in ([\d.]+)s", proc.stdout, re.M)}


def _attempt(config: Path, run_dir: Path, kill_stage: str | None, delay_s: float, env_extra: dict | None,
             timeout: float, marker: str | None = None) -> tuple[int, str, float | None]:
    """One attempt; SIGKILL the process group ``delay_s`` after the line ``marker`` (default
    ``[kill_stage] started``) appears.

    Returns (exit status, output, seconds into the stage when killed, or None when not killed by us).
    """
    proc = subprocess.Popen(rift_cmd(config, run_dir), cwd=ROOT, env=child_env(env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    started = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if kill_stage and line.startswith(marker or f"[{kill_stage}] started"):
                started.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    killed_at = None
    deadline = time.monotonic() + timeout
    if kill_stage:
        while not started.is_set() and proc.poll() is None and time.monotonic() < deadline:
            started.wait(0.05)
        if started.is_set():
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < delay_s:
                time.sleep(0.01)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = time.monotonic() - t0
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    t.join(5)
    return rc, "".join(lines), killed_at


def run_with_kills(config: Path, run_dir: Path, plan: list[tuple[str, float]], durations: dict[str, float],
                   seed: int = 0, kill_in_save: bool = True, timeout: float = 900) -> ChaosResult:
    """Run under the kill ``plan`` [(stage, fraction of its reference duration)] in order, then to the end.

    With ``kill_in_save`` the first attempt SIGKILLs itself inside its second checkpoint write (the
    training stage's; ``RIFT_FAULT_KILL_IN_SAVE=2``), recorded as kind "sigkill-in-save".  A planned kill
    whose stage finished first is recorded as kind "missed" (the run may then already be complete).
    """
    rng = random.Random(seed)
    result = ChaosResult()
    t_start = time.monotonic()
    finished = False
    if kill_in_save:
        rc, out, _ = _attempt(config, run_dir, None, 0.0, {"RIFT_FAULT_KILL_IN_SAVE": "2"}, timeout)
        result.attempts += 1
        if rc in (-signal.SIGKILL, 128 + signal.SIGKILL):
            result.faults.append(Fault("sigkill-in-save", "train", 0.0, "inside the 2nd checkpoint write"))
        elif rc == 0:
            finished = True
        else:
            raise AssertionError(f"the kill-in-save attempt failed on its own ({rc}):\n{out[-4000:]}")
    for stage, frac in plan:
        if finished:
            result.faults.append(Fault("missed", stage, 0.0, "the run had finished"))
            continue
        delay = frac * durations.get(stage, 1.0) * rng.uniform(0.8, 1.2)
        rc, out, killed_at = _attempt(config, run_dir, stage, delay, None, timeout)
        result.attempts += 1
        if killed_at is not None:
            result.faults.append(Fault("sigkill", stage, killed_at))
        elif rc == 0:
            result.faults.append(Fault("missed", stage, delay, "the stage finished before the kill"))
            finished = True
        else:
            raise AssertionError(f"attempt {result.attempts} failed on its own ({rc}):\n{out[-4000:]}")
    if not finished:
        rc, out, _ = _attempt(config, run_dir, None, 0.0, None, timeout)
        result.attempts += 1
        if rc != 0:
            raise AssertionError(f"the final re-run failed ({rc}):\n{out[-4000:]}")
    result.wall_s = time.monotonic() - t_start
    return result


def _normalised_summary(path: Path) -> bytes:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not _BOOKKEEPING.search(k)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True).encode()


def _history(path: Path) -> bytes:
    rows = json.loads(path.read_text())
    return json.dumps([{k: v for k, v in r.items() if not _TIMING.search(k)} for r in rows], sort_keys=True).encode()


def digest(run_dir: Path, rel: str) -> str:
    """sha256 of an artefact (summary/history without their timing fields); 'missing' when absent."""
    path = run_dir / rel
    if not path.is_file():
        return "missing"
    if rel == "summary.json":
        data = _normalised_summary(path)
    elif rel.endswith("history.json"):
        data = _history(path)
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def compare(reference: Path, chaos: Path) -> list[str]:
    """The artefacts of ``COMPARED`` whose digests differ between the two run directories."""
    return [rel for rel in COMPARED if digest(reference, rel) != digest(chaos, rel)]


def leftover_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files of atomic writes still in the run directory."""
    return [p for p in run_dir.rglob("*.tmp")]


def duplicate_metric_steps(tracking_uri: str) -> list[str]:
    """'run name / key @ step' for every metric logged more than once at one step in any run of the store
    (a resumed stage re-logging what it had logged before the kill)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    out = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=5000):
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            out += [f"{run.info.run_name} / {key} @ {s}" for s in sorted(set(steps)) if steps.count(s) > 1]
    return out


def stage_runs(tracking_uri: str, run_dir: Path) -> dict[str, list[str]]:
    """{child run name: [statuses]} of the MLflow parent run of ``run_dir`` (each stage should appear once)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    experiment = client.get_run(parent).info.experiment_id
    out: dict[str, list[str]] = {}
    for r in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000):
        out.setdefault(r.info.run_name, []).append(r.info.status)
    return out
