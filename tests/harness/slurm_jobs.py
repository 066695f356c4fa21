"""Small callables submitted to SLURM by the integration tests (via submitit).

They live in the package (not in the test files) so that the job process can
import them when it unpickles the submission. Keep this module light: it is
imported at the start of every test job, so it must not import torch.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import submitit

__all__ = [
    "add",
    "square",
    "job_context",
    "hold_cpus",
    "progress_update",
    "ProgressJob",
    "read_jsonl",
]

_MODULUS = 1_000_000_007


def add(a: int, b: int) -> int:
    """Return ``a + b``."""
    return a + b


def square(x: int) -> int:
    """Return ``x * x``."""
    return x * x


def job_context() -> dict[str, str | None]:
    """Return the SLURM job id, partition, CPU count and restart count seen by the job."""
    keys = ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_CPUS_ON_NODE", "SLURM_RESTART_COUNT")
    return {key: os.environ.get(key) for key in keys}


def hold_cpus(seconds: float) -> int:
    """Sleep ``seconds`` and return the number of CPUs SLURM allocated to the job.

    Raises:
        RuntimeError: if not running inside a SLURM job.
    """
    cpus = os.environ.get("SLURM_CPUS_ON_NODE")
    if cpus is None:
        raise RuntimeError("hold_cpus must run inside a SLURM job (SLURM_CPUS_ON_NODE unset)")
    time.sleep(seconds)
    return int(cpus)


def progress_update(acc: int, step: int) -> int:
    """Advance the toy computation by one step.

    Order-dependent, so a skipped or repeated step changes the final value.
    """
    return (acc * 31 + step * step + 7) % _MODULUS


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Return the JSON objects of a JSON-lines file (empty list if it is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class ProgressJob(submitit.helpers.Checkpointable):
    """A resumable step-by-step computation that persists its progress after each step.

    Files in ``workdir``:

    * ``progress.json``: ``{"step": done_steps, "acc": value}``, replaced
      atomically after every step; a (re)started run resumes from it.
    * ``starts.jsonl``: one record per run start (``start_step``, job id,
      ``SLURM_RESTART_COUNT``).
    * ``checkpoints.jsonl``: one record per :meth:`checkpoint` call.

    The resumed state comes from disk, not from the pickled submission, so a
    requeued job continues from the newest finished step. The final value is
    the same whether or not the run was interrupted.
    """

    def __call__(self, workdir: str, n_steps: int, step_s: float) -> int:
        """Run steps ``[done_steps, n_steps)`` sleeping ``step_s`` each; return the final value."""
        wd = Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        progress_file = wd / "progress.json"
        state = {"step": 0, "acc": 0}
        if progress_file.exists():
            state = json.loads(progress_file.read_text())
        _append_jsonl(
            wd / "starts.jsonl",
            {
                "start_step": state["step"],
                "job_id": os.environ.get("SLURM_JOB_ID"),
                "restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                "time": time.time(),
            },
        )
        step, acc = int(state["step"]), int(state["acc"])
        while step < n_steps:
            time.sleep(step_s)
            acc = progress_update(acc, step)
            step += 1
            tmp = wd / "progress.json.tmp"
            tmp.write_text(json.dumps({"step": step, "acc": acc}))
            os.replace(tmp, progress_file)
        return acc

    def checkpoint(
        self, workdir: str, n_steps: int, step_s: float
    ) -> submitit.helpers.DelayedSubmission:
        """Record the call and resubmit with the same arguments (progress is reloaded from disk)."""
        wd = Path(workdir)
        done = None
        if (wd / "progress.json").exists():
            done = json.loads((wd / "progress.json").read_text())["step"]
        _append_jsonl(
            wd / "checkpoints.jsonl",
            {"job_id": os.environ.get("SLURM_JOB_ID"), "step_on_disk": done, "time": time.time()},
        )
        return submitit.helpers.DelayedSubmission(ProgressJob(), workdir, n_steps, step_s)
