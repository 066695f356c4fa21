"""Atomic writes for the text files a stage writes (tables, summaries, markers).

A file is written to a temporary name in its own directory, flushed, fsync'ed and renamed over the
real name, so a reader (a resumed stage, ``rift report``, a gather job on another node) sees the old
file or the new one, never half of one.  Checkpoints use the same scheme in
:func:`rift_dist.checkpoint.save_atomic`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, rename).

    Raises:
        OSError: from the filesystem (the temporary file is removed; ``path`` keeps its old content).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))
