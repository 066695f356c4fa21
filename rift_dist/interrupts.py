"""SIGTERM and SIGINT honoured: finish the step, write a checkpoint, close the MLflow runs, exit.

``scancel``, most preemption set-ups and container runtimes send SIGTERM first (then SIGKILL after a
grace period); Ctrl-C sends SIGINT.  Python's default is to die at once on SIGTERM (no checkpoint,
MLflow runs left RUNNING) and to raise ``KeyboardInterrupt`` wherever the main thread happens to be on
SIGINT (inside a collective, a checkpoint write, or a C++ kernel that swallows it).

With :func:`install` (done by the ``rift`` command for local runs; SLURM jobs keep submitit's own
handlers), the first signal only sets a flag.  The training loops call :func:`check` at every step
(fine-tuning and adversarial training; MRC per module, the interpolation sweep per alpha, the pipeline
between stages), which — after all ranks agree that one of them was signalled — writes the resumable
state and raises :class:`Interrupted`.  The pipeline then closes its MLflow runs as KILLED and the CLI
exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT) and one line saying how to resume.
A second signal exits at once (status 128 + signal) without a checkpoint -- unless it comes within
:data:`REPEAT_WINDOW_S` of the first: that is the same request passed on by a launcher (torchrun, srun
and shells forward the signal that the process group already delivered), not a second request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

_requested: int | None = None
_requested_at = 0.0
_installed = False

REPEAT_WINDOW_S = 2.0
"""A signal within this many seconds of the first is the first one passed on again, not a second request."""


class Interrupted(Exception):
    """The run was asked to stop by a signal; its resumable state has been written.

    Attributes:
        signum: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
        where: what was saved, e.g. "train epoch 2 step 5".
    """

    def __init__(self, signum: int, where: str = ""):
        self.signum = int(signum)
        self.where = where
        name = signal.Signals(self.signum).name
        super().__init__(f"stopped by {name}" + (f" after {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        """128 + the signal number (the shell's convention: 143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal protocol
    global _requested, _requested_at
    if _requested is not None:
        if time.monotonic() - _requested_at < REPEAT_WINDOW_S:
            return  # the same stop request, forwarded by a launcher
        sys.stderr.write(f"rift: second {signal.Signals(signum).name} — exiting now, without a checkpoint\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    _requested, _requested_at = signum, time.monotonic()
    sys.stderr.write(f"rift: {signal.Signals(signum).name} received — finishing the current step, writing a "
                     f"checkpoint, then exiting (send it again, {REPEAT_WINDOW_S:g} s or more later, to exit at "
                     f"once)\n")
    sys.stderr.flush()


def install() -> bool:
    """Route SIGTERM and SIGINT to the stop flag (main thread only; returns whether it was installed)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    _installed = True
    return True


def uninstall() -> None:
    """Restore the default handlers and clear the flag (tests; the end of a CLI command)."""
    global _installed, _requested
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _installed = False
    _requested = None


def requested() -> int | None:
    """The signal received by this process since :func:`install`, or None."""
    return _requested


def stop_requested(runtime=None) -> int | None:
    """The signal any rank received (all ranks agree: one all-reduce of one number when distributed), or None.

    Args:
        runtime: a :class:`rift_dist.parallel.runtime.Runtime`; None or one process = this process only.

    Raises:
        DistributedError: when the collective fails (a dead peer), as every collective does.
    """
    mine = _requested or 0
    if runtime is None or not runtime.distributed:
        return mine or None
    flag = torch.tensor([float(mine)], dtype=torch.float64)
    runtime.all_reduce_sum(flag)
    if not flag.item():
        return None
    return mine or signal.SIGTERM  # another rank was signalled; this one stops as if terminated


def check(runtime=None, save=None, where: str = "") -> None:
    """Raise :class:`Interrupted` (after calling ``save()``, on every rank) when a stop was requested.

    Args:
        runtime: the run's runtime (all ranks must call this at the same point of the loop).
        save: a callable that writes the resumable state (collective where needed), or None.
        where: a short description of the saved position for the final message.
    """
    signum = stop_requested(runtime)
    if signum is None:
        return
    if save is not None:
        save()
    raise Interrupted(signum, where)
