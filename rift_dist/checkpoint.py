"""Atomic, verifiable checkpoints.

Files are written to a temporary name in the same directory, flushed to disk
and renamed, so a killed process never leaves a half-written file under the
real name.  Loading uses ``torch.load(weights_only=True)``: checkpoints hold
tensors, numbers, strings, lists and dicts only.  A truncated or corrupt file
raises :class:`CheckpointError`, and :class:`CheckpointManager` falls back to
the previous good checkpoint instead of crashing or silently restarting.
State dicts are consolidated and wrapper-free (no ``module.`` prefixes).

Checksums: ``torch.save`` writes a ZIP archive whose every record carries the
CRC-32 of its bytes (written with it, by PyTorch's own writer); ``torch.load``
does not check them, so a file with flipped bytes but the right size would load
silently.  :func:`load` verifies every record's CRC-32 with the standard
library's ``zipfile`` before unpickling, so such a file is a corrupt file.

Temporary files are named ``.<name>.<host>.<pid>.<random>.tmp``; those left by a
killed writer of this host are removed by :func:`remove_stale_temporaries`
(called when a :class:`CheckpointManager` is created).  A full disk is one
:class:`CheckpointError` naming the path, the bytes needed and the fix; the
previous file under the real name is left intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from rift_dist.atomic import remove_stale_temporaries, temp_prefix
from rift_dist.checkpoint_ids import checkpoint_name, checkpoint_number
from rift_dist.errors import RiftError


class CheckpointError(RiftError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not loadable with weights_only=True."""


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list/tuple (an estimate of the file size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically (temporary file, fsync, rename).

    Raises:
        CheckpointError: when the disk is full (or over quota): one message naming the path, the
            bytes needed and the free space; the temporary file is removed and the previous file
            under ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fault_point(path)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _is_no_space(exc):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"disk full writing {path}: it needs about {_tensor_bytes(obj) / 2**20:.1f} MiB and "
                f"{free / 2**20:.1f} MiB are free on that filesystem. Free space there (or put the run "
                f"directory elsewhere with --run-dir) and re-run the same command to resume; the previous "
                f"checkpoint is intact.") from None
        raise
    return path


_SAVES = 0


def _fault_point(path: Path) -> None:
    """Fault injection for the chaos tests: with env ``RIFT_FAULT_KILL_IN_SAVE=N`` the process SIGKILLs
    itself inside its N-th checkpoint write (temporary file complete, not yet renamed). Off by default."""
    global _SAVES
    target = os.environ.get("RIFT_FAULT_KILL_IN_SAVE")
    if not target:
        return
    _SAVES += 1
    if _SAVES == int(target):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _is_no_space(exc: BaseException | None) -> bool:
    """True when ``exc`` or an exception it was raised from/while handling is ENOSPC / EDQUOT.

    ``torch.save`` turns a full disk into a RuntimeError of its ZIP writer raised while handling the
    OSError, so the chain is searched.
    """
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def verify_checksums(path: str | Path) -> None:
    """Check the CRC-32 of every record of a ``torch.save`` ZIP file (legacy non-ZIP files pass unchecked).

    Raises:
        CheckpointError: naming the first record whose bytes do not match their checksum, or the
            archive structure that is damaged.
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy (pre-1.6) torch file or garbage; torch.load decides
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception as exc:  # noqa: BLE001 - BadZipFile, UnicodeDecodeError on a damaged name, ...
        raise CheckpointError(f"{path}: corrupt (damaged archive structure: {type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt (record {bad!r} does not match its CRC-32 checksum; "
                              f"size {path.stat().st_size} bytes)")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: when the file does not exist, is truncated/corrupt, or
            needs arbitrary code to unpickle (the message says which and what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_checksums(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors
        text = str(exc)
        # only an allow-list refusal of a named class means "needs code"; random bytes also fail inside
        # torch's weights-only unpickler ("Unsupported operand ..."), and those are corrupt files
        if "Unsupported global" in text:
            raise CheckpointError(
                f"{path}: refused — this checkpoint needs arbitrary Python code to unpickle "
                f"(it stores objects, not only tensors). Loading it could run untrusted code. "
                f"If you trust it, re-save just its state dict: "
                f"torch.save(torch.load(p, weights_only=False)['state_dict'], 'clean.pt'). Detail: {text.splitlines()[0]}"
            ) from exc
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt? size {path.stat().st_size} bytes): "
            f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        ) from exc


def partial_sums(state: dict, step: int) -> tuple[torch.Tensor, float] | None:
    """The partial epoch sums a mid-epoch checkpoint carries, for resuming that epoch's metrics.

    Args:
        state: a checkpoint written by the AT or fine-tuning loop.
        step: the step the epoch resumes at (0 = an epoch boundary: nothing to restore).

    Returns:
        ``(sums, seconds)``: float64 ``[3]`` (sum of loss x samples, correct count, sample count; summed
        over all ranks when saved) and the epoch's seconds before the checkpoint; None at an epoch
        boundary, or (with a warning) for a mid-epoch checkpoint without them (written by an older
        version: the epoch's train metrics then cover the steps after the resume only).
    """
    if not step:
        return None
    sums = state.get("partial_sums")
    if sums is None:
        warnings.warn(f"the checkpoint of step {step} has no partial epoch sums (an older version wrote it): this "
                      f"epoch's train metrics will cover the steps after the resume only", stacklevel=2)
        return None
    sums = torch.as_tensor(sums, dtype=torch.float64).reshape(-1).clone()
    if sums.numel() != 3:
        raise CheckpointError(f"checkpoint's partial_sums has {sums.numel()} values, expected 3 "
                              f"(loss sum, correct count, sample count)")
    return sums, float(state.get("partial_seconds", 0.0))


def start_sums(partial: tuple[torch.Tensor, float] | None, is_main: bool) -> tuple[torch.Tensor, float]:
    """The running sums and start time of an epoch: zeros and now, or a resumed epoch's.

    The restored sums are global (summed over ranks); only the main rank starts from them, so the
    epoch-end all-reduce counts them once.  Returns ``(sums float64 [3], t0)`` where ``t0`` is shifted
    back by the epoch's seconds before the resume (``epoch_seconds`` covers the whole epoch).
    """
    sums = torch.zeros(3, dtype=torch.float64)
    if partial is None:
        return sums, time.time()
    if is_main:
        sums += partial[0]
    return sums, time.time() - partial[1]


class CheckpointManager:
    """Numbered resumable checkpoints in one directory, newest first, keeping the last ``keep``.

    Files are ``<dir>/ckpt-<step:09d>.pt`` (:func:`rift_dist.checkpoint_ids.checkpoint_name`).
    :meth:`load_latest` returns the newest
    readable one (checksums verified) and warns about (and skips) corrupt newer files.
    Creating a manager removes the temporary files that killed writers left in its directory.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, keep)
        remove_stale_temporaries(self.directory)
        remove_stale_temporaries(self.directory.parent)  # the stage folder's model.pt / best.pt writes

    def paths(self) -> list[Path]:
        """Existing checkpoint files, newest (highest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(n, p) for p in self.directory.iterdir() if (n := checkpoint_number(p.name)) is not None]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as the checkpoint of global step ``step`` and prune old ones."""
        path = save_atomic(state, self.directory / checkpoint_name(step))
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location="cpu") -> dict | None:
        """The newest loadable checkpoint, or None when there is none.

        A corrupt newer file is reported with a warning and the previous good one
        is used; when every file is corrupt, raises CheckpointError listing them.
        """
        paths = self.paths()
        errors = []
        for path in paths:
            try:
                state = load(path, map_location)
            except CheckpointError as exc:
                errors.append(str(exc))
                warnings.warn(f"skipping unreadable checkpoint: {exc}; falling back to an older one", stacklevel=2)
                continue
            return state
        if errors:
            raise CheckpointError(
                "every checkpoint in " + str(self.directory) + " is unreadable:\n  " + "\n  ".join(errors)
                + "\nDelete the directory to restart the stage from scratch."
            )
        return None
