"""One writer per run directory: an exclusive OS file lock held for the life of a pipeline.

Two ``rift run`` on the same run directory (a double-clicked script, a requeued job next to a manual
re-run) would otherwise both run every stage and interleave their artefacts and MLflow metrics.  The
lock is ``fcntl.flock`` on ``<run_dir>/.rift.lock``: the kernel releases it when the holding process
dies, however it dies (SIGKILL included), so a killed run never leaves a stale lock behind.  The file
also records who holds it (host, PID, command, since when) so that a refused second writer can name
the holder.  Over NFS, Linux emulates ``flock`` with POSIX byte-range locks, which NFSv4 servers
honour across hosts.

Validate, then write: :meth:`RunDirLock.acquire` does not change an existing lock file (it opens it
for appending and writes nothing); :meth:`RunDirLock.record_holder` writes the holder record once the
command has passed every check, so a refused command changes no byte of an existing run directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from rift_dist.layout import RunLayout
from rift_dist.stages import StageError

class RunDirLockedError(StageError):
    """Another process holds the run directory's lock (its host, PID, command and start time are named)."""


class RunDirLock:
    """An exclusive, non-blocking lock on one run directory.

    Args:
        run_dir: the run directory; the lock file is ``<run_dir>/.rift.lock``
            (:attr:`rift_dist.layout.RunLayout.lock`).

    Use as ``with RunDirLock(run_dir): ...`` or ``acquire()`` / ``release()``.  Re-entrant within one
    object only (a second ``acquire`` on the same object is a no-op).

    Raises (from :meth:`acquire`):
        RunDirLockedError: when another process holds it; the message names the holder and the fix.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = RunLayout(self.run_dir).lock
        self._fh = None

    def acquire(self) -> "RunDirLock":
        """Take the lock, or raise :class:`RunDirLockedError` at once (never waits).

        A run directory that does not exist yet has nothing to protect: it is created (the lock file
        is its first file).  An existing one gains the lock file if it has none; its contents are
        not changed until :meth:`record_holder`.
        """
        if self._fh is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # no truncation: the last holder's record stays until we write ours
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _describe(fh.read())
            fh.close()
            raise RunDirLockedError(
                f"run directory {self.run_dir} is in use by another rift process ({holder}). Wait for it to "
                f"finish, stop it, or use another --run-dir; two writers would mix their artefacts and MLflow "
                f"records.") from None
        self._fh = fh
        return self

    def record_holder(self) -> None:
        """Write this process's host, PID, command and start time into the lock file (after validation)."""
        if self._fh is None:
            raise RuntimeError("record_holder() before acquire()")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps(info) + "\n")
        self._fh.flush()

    def release(self) -> None:
        """Release the lock (the file stays; it is reused by the next writer)."""
        if self._fh is not None:
            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            finally:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(text: str) -> str:
    """The holder record as 'host H, PID P, command C, since S' (or 'holder unknown')."""
    try:
        info = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "holder not yet recorded"
    return f"host {info.get('host')}, PID {info.get('pid')}, command '{info.get('command')}', since {info.get('since')}"
