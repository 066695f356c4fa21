"""Unpack a data archive (.tar.gz, .tgz, .tar, .zip) into a cache directory, safely and atomically.

One archive is unpacked once per cache directory, however many processes ask at the same time
(all ranks of a node may call :func:`unpack_archive` together):

* the target directory is ``<cache_dir>/<archive stem>-<key>`` where ``key`` is a hash of the
  archive's absolute path, size and modification time, so a changed archive gets a new target;
* the archive is extracted into a temporary sibling directory, a marker file
  (``.rift_unpacked.json``: archive path, size, mtime, sha256, member count) is written last, and the
  temporary directory is renamed onto the target in one step;
* a target without the marker (a foreign or half-written directory) is removed and unpacked again;
  temporary directories left by a killed process on this host are removed on the next call;
* on POSIX an ``fcntl`` lock file serialises unpacking between processes of one host; between hosts
  the atomic rename alone keeps the result consistent (the loser discards its copy).

Extraction refuses absolute paths, ``..`` components, links pointing outside the target and device
files (Python's ``tarfile`` "data" filter where available).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import uuid
import zipfile
from pathlib import Path

from rift_dist.errors import RiftError

MARKER = ".rift_unpacked.json"
"""Name of the file that marks a complete unpack (written last, inside the target directory)."""

_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


class DataError(RiftError):
    """Data are missing, unreadable or not in the expected layout.

    The message names the path, what was expected there, and the fix.  Defined here (the lowest
    module of the package) and re-exported as ``rift_dist.data.sources.DataError``.
    """


class ArchiveError(DataError):
    """An archive is missing, unreadable or unsafe to unpack (a :class:`DataError`)."""


def archive_stem(path: str | Path) -> str:
    """File name of ``path`` without its archive suffix (``a/cifar10-jpeg.tar.gz`` -> ``cifar10-jpeg``)."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _target_key(archive: Path) -> str:
    st = archive.stat()
    ident = f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _host_lock(lock_path: Path):
    """Exclusive advisory lock on ``lock_path`` for processes of this host (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(cache_dir: Path, target_name: str) -> None:
    """Remove temporary unpack directories of dead processes of this host."""
    host = socket.gethostname()
    for tmp in cache_dir.glob(f".{target_name}.tmp-*"):
        parts = tmp.name.rsplit(".tmp-", 1)[-1].split("-")
        # name: .<target>.tmp-<host>-<pid>-<uuid>; host names may contain '-'
        if len(parts) < 3:
            continue
        tmp_host, pid = "-".join(parts[:-2]), parts[-2]
        if tmp_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _safe_member_path(dest: Path, name: str) -> Path:
    target = (dest / name).resolve()
    if not str(target).startswith(str(dest.resolve()) + os.sep) and target != dest.resolve():
        raise ArchiveError(f"archive member {name!r} would be written outside {dest}; refusing to unpack")
    return target


def _plain_and_safe(members: list[tarfile.TarInfo]) -> bool:
    """True when every member is a regular file or directory with a relative name free of '..'."""
    for m in members:
        if not (m.isreg() or m.isdir()) or not _safe_name(m.name):
            return False
    return True


def _safe_name(name: str) -> bool:
    return not name.startswith(("/", "\\")) and ".." not in name.replace("\\", "/").split("/")


def _gnu_tar() -> str | None:
    tar = shutil.which("tar")
    if tar is None:
        return None
    try:
        out = subprocess.run([tar, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return tar if "GNU tar" in out else None


def _gnu_tar_listing_is_plain(tar: str, archive: Path) -> int | None:
    """Member count when GNU ``tar -tv`` shows only regular files and directories with safe names, else None."""
    try:
        done = subprocess.run([tar, "-t", "-v", "--quoting-style=escape", "-f", str(archive)],
                              capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    count = 0
    for line in done.stdout.splitlines():
        fields = line.split(maxsplit=5)  # mode owner/group size date time name
        if len(fields) != 6 or line[0] not in "-d" or not _safe_name(fields[5]):
            return None
        count += 1
    return count


def _system_tar_extract(archive: Path, dest: Path) -> int | None:
    """Extract with GNU ``tar`` (several times faster than Python's tarfile for 60k small files) when its
    listing holds only plain files and directories with safe names; returns the member count, or None
    when not used or failed (the caller then extracts with Python's "data" filter)."""
    tar = _gnu_tar()
    if tar is None:
        return None
    count = _gnu_tar_listing_is_plain(tar, archive)
    if count is None:
        return None
    cmd = [tar, "-x", "-f", str(archive), "-C", str(dest), "--no-same-owner", "--no-same-permissions"]
    try:
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        for child in dest.iterdir():  # start clean for the Python fallback
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        return None
    return count


def _extract(archive: Path, dest: Path) -> int:
    """Extract ``archive`` into the existing directory ``dest``; returns the number of members."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                _safe_member_path(dest, m.filename)
            zf.extractall(dest)
            return len(members)
    count = _system_tar_extract(archive, dest)
    if count is not None:
        return count
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc}); expected .tar.gz/.tgz/.tar/.zip") from exc
    with tf:
        try:
            members = tf.getmembers()
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                for m in members:
                    _safe_member_path(dest, m.name)
                    if m.issym() or m.islnk() or m.isdev():
                        raise ArchiveError(f"{archive}: member {m.name!r} is a link or device; refusing to unpack")
                tf.extractall(dest)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(
                f"{archive}: unsafe or damaged archive member ({type(exc).__name__}: {exc}); refusing to unpack. "
                f"Re-create the archive with paths relative to its top directory"
            ) from exc
        return len(members)


def read_marker(target: Path) -> dict | None:
    """The marker of a complete unpack in ``target`` as a dict, or None when absent or unreadable."""
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None


def unpack_archive(archive: str | Path, cache_dir: str | Path) -> Path:
    """Unpack ``archive`` into ``cache_dir`` once and return the unpack directory.

    Args:
        archive: path of a .tar.gz / .tgz / .tar / .zip file.
        cache_dir: directory for unpacked data (created if missing; ``~`` expanded).

    Returns:
        ``<cache_dir>/<stem>-<key>``, holding the archive's members and the marker file.

    Raises:
        ArchiveError: the archive is missing, unreadable, or has members that would escape the
            target directory; the cache directory cannot be created.
    """
    archive = Path(archive).expanduser()
    if not archive.is_file():
        where = "" if archive.is_absolute() else f" (relative paths are read from the current directory: {archive.resolve()})"
        raise ArchiveError(
            f"data archive {archive} does not exist{where}; set data.archive to an existing .tar.gz file "
            f"(an absolute path, or run from the directory it is relative to) or leave it empty and set data.root"
        )
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArchiveError(f"cannot create cache directory {cache_dir} ({exc}); set data.cache_dir to a writable path") from exc
    target_name = f"{archive_stem(archive)}-{_target_key(archive)}"
    target = cache_dir / target_name
    if read_marker(target) is not None:
        return target
    with _host_lock(cache_dir / f".{target_name}.lock"):
        if read_marker(target) is not None:  # another process finished while we waited
            return target
        _remove_stale_tmp(cache_dir, target_name)
        if target.exists():  # half-written or foreign: redo
            shutil.rmtree(target, ignore_errors=True)
        tmp = cache_dir / f".{target_name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            start = time.time()
            count = _extract(archive, tmp)
            st = archive.stat()
            marker = {
                "archive": str(archive.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": file_sha256(archive),
                "members": count,
                "seconds": round(time.time() - start, 3),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            try:
                os.rename(tmp, target)
            except OSError:
                # another host won the race: keep theirs if complete
                if read_marker(target) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def data_dir_in(unpacked: str | Path) -> Path:
    """The directory holding the data inside an unpack directory.

    When the archive had a single top-level directory (``cifar10-jpeg/``, ``tiny-imagenet-200/``)
    that directory is returned, otherwise the unpack directory itself.
    """
    unpacked = Path(unpacked)
    entries = [p for p in unpacked.iterdir() if p.name != MARKER and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return unpacked
