"""One writer per run directory: a second pipeline is refused at once, naming the holder; a killed holder
leaves no stale lock; the refusal writes nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rift_dist.run_lock import RunDirLock, RunDirLockedError
from tests.integration.pipeline_helpers import ROOT, rift, tiny_config

HOLD = """
import sys, time
from rift_dist.run_lock import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
lock.record_holder()
print("locked", flush=True)
time.sleep(600)
"""


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_refused_at_once_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    holder = _holder(run_dir)
    try:
        before = tree_digest(tmp_path / "runs")
        t0 = time.monotonic()
        proc = rift("run", str(tiny_config(tmp_path)), "--run-dir", str(run_dir), check=False)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 1, proc.stderr
        assert "RunDirLockedError" in proc.stderr and f"PID {holder.pid}" in proc.stderr
        assert "another --run-dir" in proc.stderr
        assert tree_digest(tmp_path / "runs") == before  # no config.yaml, no mlflow.db, lock record unchanged
        assert not (run_dir / "config.yaml").exists() and not (tmp_path / "runs" / "mlflow.db").exists()
        assert elapsed < 120  # refused before any data or training work (generous: interpreter start-up)
    finally:
        holder.kill()
        holder.wait()


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = _holder(tmp_path)
    with pytest.raises(RunDirLockedError, match=f"PID {holder.pid}"):
        RunDirLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = RunDirLock(tmp_path).acquire()  # the kernel released it with the process
    lock.record_holder()
    assert f'"pid": {os.getpid()}' in (tmp_path / ".rift.lock").read_text()
    lock.release()
