"""Atomic, verifiable checkpoints.

Files are written to a temporary name in the same directory, flushed to disk
and renamed, so a killed process never leaves a half-written file under the
real name.  Loading uses ``torch.load(weights_only=True)``: checkpoints hold
tensors, numbers, strings, lists and dicts only.  A truncated or corrupt file
raises :class:`CheckpointError`, and :class:`CheckpointManager` falls back to
the previous good checkpoint instead of crashing or silently restarting.
State dicts are consolidated and wrapper-free (no ``module.`` prefixes).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not loadable with weights_only=True."""


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: when the file does not exist, is truncated/corrupt, or
            needs arbitrary code to unpickle (the message says which and what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
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


class CheckpointManager:
    """Numbered resumable checkpoints in one directory, newest first, keeping the last ``keep``.

    Files are ``<dir>/ckpt-<step:09d>.pt``.  :meth:`load_latest` returns the newest
    readable one and warns about (and skips) corrupt newer files.
    """

    _pattern = re.compile(r"ckpt-(\d+)\.pt$")

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def paths(self) -> list[Path]:
        """Existing checkpoint files, newest (highest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._pattern.search(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as the checkpoint of global step ``step`` and prune old ones."""
        path = save_atomic(state, self.directory / f"ckpt-{step:09d}.pt")
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
