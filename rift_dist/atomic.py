"""Atomic writes for the text files a stage writes (tables, summaries, markers), and JSON with a checksum.

A file is written to a temporary name in its own directory, flushed, fsync'ed and renamed over the
real name, so a reader (a resumed stage, ``rift report``, a gather job on another node) sees the old
file or the new one, never half of one.  Checkpoints use the same scheme in
:func:`rift_dist.checkpoint.save_atomic`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any

from rift_dist.errors import RiftError


def host_field() -> str:
    """This host's name with dots replaced (it is one dot-free field of a temporary file's name)."""
    return socket.gethostname().replace(".", "-") or "localhost"


def temp_prefix(path: Path) -> str:
    """``.<name>.<host>.<pid>.``: the prefix of a temporary file written for ``path`` by this process, so that
    :func:`remove_stale_temporaries` can tell a dead writer's leftover from a live writer's file."""
    return f".{path.name}.{host_field()}.{os.getpid()}."


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def remove_stale_temporaries(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Delete temporary files of atomic writes (these and :func:`rift_dist.checkpoint.save_atomic`'s) left in
    ``directory`` (and below it with ``recursive``) by dead writers of this host.

    A temporary file's name carries its writer's host and PID; it is removed when the host is this one and no
    process with that PID is alive (a live writer's file is never touched; files of other hosts are left to
    their hosts).  Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    host, removed = host_field(), []
    files = directory.rglob("*.tmp") if recursive else directory.glob("*.tmp")
    for p in files:
        m = _TEMP.match(p.name)
        if not m or m.group("host") != host:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file ``.<name>.<host>.<pid>.<random>.tmp`` in the same
    directory, fsync, rename); a killed writer's leftover is removed by :func:`remove_stale_temporaries`.

    Raises:
        OSError: from the filesystem (the temporary file is removed; ``path`` keeps its old content).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
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


# ------------------------------------------------------------------------------ JSON with a checksum

CHECKSUM_KEY = "_sha256"
"""Key of the checksum that :func:`write_json` adds to a JSON object (issue 13: every artefact carries one)."""


class CorruptFileError(RiftError, ValueError):
    """A JSON artefact does not parse, or its content does not match the checksum written with it.

    Attributes:
        path: the file.
        why: what is wrong with it (``not valid JSON: ...`` or the checksum mismatch).
    """

    def __init__(self, path: str | Path, why: str):
        self.path = Path(path)
        self.why = why
        super().__init__(f"{path}: corrupt ({why}). Delete it and re-run the same command: the piece it holds is "
                         f"computed again")


def _canonical_digest(data: dict) -> str:
    # over the parsed-back form, so what write_json hashes is exactly what read_json will see
    plain = json.loads(json.dumps({k: v for k, v in data.items() if k != CHECKSUM_KEY}, default=str))
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def write_json(path: str | Path, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON, atomically; a JSON object gets a ``_sha256`` key, the sha256 of its content.

    The checksum is over the object's canonical JSON (sorted keys, without ``_sha256``; values that are not
    JSON types written as ``str``); :func:`read_json` verifies it, so a flipped byte that still parses is
    found.  Lists and scalars are written without one.

    Raises:
        OSError: from the filesystem (``path`` keeps its old content).
    """
    if isinstance(data, dict):
        data = {**{k: v for k, v in data.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: _canonical_digest(data)}
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def read_json(path: str | Path) -> Any:
    """Read JSON written by :func:`write_json` (or any JSON file), verifying a ``_sha256`` key when present.

    Returns the data without the ``_sha256`` key (files written before checksums existed are read as they are).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: the text does not parse as JSON, or the object does not match its checksum.
    """
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(path, f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, dict) and CHECKSUM_KEY in data:
        stored = data.pop(CHECKSUM_KEY)
        if stored != _canonical_digest(data):
            raise CorruptFileError(path, "its content does not match the sha256 checksum written with it")
    return data


def read_json_piece(path: str | Path) -> Any | None:
    """A resumable piece (one alpha's row, one module's MRC, an evaluated point): its data, or None when the file
    is missing or corrupt -- a corrupt piece is reported on stderr and then computed again like a missing one.

    Raises:
        nothing for a missing or corrupt file; OSError for other read failures.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except CorruptFileError as exc:
        import sys

        # not the error's own text, which tells the user to delete the file and re-run: here that is being done
        print(f"rift: WARNING: {exc.path}: corrupt ({exc.why}); the piece it holds is computed again",
              file=sys.stderr, flush=True)
        return None
