"""A real, private SLURM cluster on loopback, for integration tests.

:class:`LocalSlurmCluster` starts, as child processes it tracks, a private
MariaDB server, ``munged``, ``slurmdbd``, ``slurmctld`` and one ``slurmd``
(node ``localhost``), all configured inside one work directory and bound to
127.0.0.1 on free ports. Nothing from ``/etc/slurm``, ``/etc/munge`` or the
system MariaDB is used or touched, and no system service is started.

The binaries come from Debian packages; install them with
``scripts/slurm/install.sh`` (root). The daemons run as the current user, which
must be root (``slurmd`` has to be able to launch jobs).

Typical use::

    with LocalSlurmCluster(tmp_path / "slurm") as cluster:
        os.environ.update(cluster.env)           # SLURM_CONF for clients
        print(cluster.run(["sinfo"]).stdout)

Cluster layout: one node ``localhost`` with :attr:`LocalSlurmCluster.cpus`
CPU slots and two partitions on it, ``debug`` (default, low ``PriorityTier``,
preemptable with ``PreemptMode=REQUEUE``; the job gets its ``--signal`` on
preemption, then ``GraceTime`` seconds to requeue itself) and ``high``
(higher ``PriorityTier``). A job in ``high`` that needs CPUs held by ``debug``
jobs preempts them. With ``gpus=N`` the node also declares ``N`` fake GPUs
(``Gres=gpu:N``; see :class:`LocalSlurmCluster`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

__all__ = [
    "LocalSlurmCluster",
    "SlurmClusterError",
    "REQUIRED_BINARIES",
    "missing_binaries",
]

#: Executables the cluster needs (all from Debian packages installed by
#: ``scripts/slurm/install.sh``).
REQUIRED_BINARIES: tuple[str, ...] = (
    "mariadbd",
    "mariadb-install-db",
    "mariadb",
    "mariadb-admin",
    "munged",
    "mungekey",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sinfo",
    "sacctmgr",
    "scontrol",
    "squeue",
    "scancel",
    "sbatch",
    "sacct",
    "srun",
)

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# AF_UNIX socket paths are limited to 108 bytes including the NUL; slurmd's
# step sockets add up to ~33 characters to the spool directory path.
_MAX_SPOOL_PATH = 72
_CLUSTER_NAME = "rifttest"
_ACCOUNT = "rift"


class SlurmClusterError(RuntimeError):
    """Raised when the local SLURM cluster cannot be set up, started or queried."""


def _which(name: str) -> str | None:
    """Return the path of executable ``name``, also looking in sbin dirs not on PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_binaries() -> list[str]:
    """Return the names in :data:`REQUIRED_BINARIES` that cannot be found.

    An empty list means the cluster can be started (as far as binaries go).
    """
    return [name for name in REQUIRED_BINARIES if _which(name) is None]


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a text file, or a note if unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


@dataclass
class _Daemon:
    """A daemon process started and owned by the cluster."""

    name: str
    popen: subprocess.Popen[bytes]
    output: Path  # stdout+stderr of the process
    logs: tuple[Path, ...] = field(default_factory=tuple)  # daemon's own log files
    stream: IO[bytes] | None = None

    def alive(self) -> bool:
        """Return True while the process has not exited."""
        return self.popen.poll() is None

    def describe_failure(self) -> str:
        """Return a message with the exit status and the tail of its logs."""
        status = self.popen.poll()
        state = "is running" if status is None else f"exited with status {status}"
        parts = [f"{self.name} (pid {self.popen.pid}) {state}."]
        for log in (*self.logs, self.output):
            parts.append(f"--- tail of {log} ---\n{_tail(log)}")
        return "\n".join(parts)


class LocalSlurmCluster:
    """A private SLURM 22.05 cluster (with accounting) running on 127.0.0.1.

    Args:
        workdir: Directory that will hold every file of the cluster (configs,
            MariaDB data, munge key, state, spool and logs). It is created if
            needed and must not already hold a cluster.
        cpus: CPU slots of the single node ``localhost``. ``None`` means
            ``max(4, real CPUs)`` so several one-CPU jobs run at once on a small
            machine (``task/none`` binds nothing, so extra slots are harmless).
        grace_time_s: ``GraceTime`` of the ``debug`` partition: seconds a
            preempted job has, after receiving its ``--signal``, to checkpoint
            and requeue itself before SLURM requeues (kills) it.
        start_timeout_s: Seconds to wait for each daemon to become ready.
        db_in_memory: Keep the MariaDB data directory on the ``/dev/shm``
            tmpfs (removed by :meth:`stop`) instead of ``workdir/mysql/data``.
            MariaDB's initialisation is fsync-bound: measured 0.8 s on tmpfs
            vs 4-6 s on a busy virtual disk. ``None`` (default) means: yes if
            ``/dev/shm`` is writable with at least 1 GiB free.
        gpus: GPUs node ``localhost`` declares (``Gres=gpu:<gpus>``, ``GresTypes=gpu``), backed by
            links ``<workdir>/dev/gpu<i>`` -> ``/dev/null`` in ``gres.conf`` (slurmd wants character
            devices): SLURM accepts, schedules and accounts GPU requests (``--gpus-per-node``, ``--gres=gpu:N``) and sets
            ``CUDA_VISIBLE_DEVICES`` in the job as on a GPU cluster, while the jobs run on the CPU.
            0 (default) declares none.

    Attributes:
        env: Environment variables every SLURM client call needs
            (``SLURM_CONF``); merge it into ``os.environ`` or a subprocess env.
        cpus: CPU slots of node ``localhost``.
        gpus: GPUs node ``localhost`` declares (``Gres=gpu:<gpus>``; 0 = none).
        node: The node name (``"localhost"``).
        partitions: Partition names, default first (``("debug", "high")``).
        slurm_conf: Path of the generated ``slurm.conf``.

    Use as a context manager or call :meth:`start` and :meth:`stop`. Only the
    processes started here are ever signalled.
    """

    node = "localhost"
    partitions = ("debug", "high")

    def __init__(
        self,
        workdir: Path | str,
        *,
        cpus: int | None = None,
        grace_time_s: int = 30,
        start_timeout_s: float = 60.0,
        db_in_memory: bool | None = None,
        gpus: int = 0,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        if gpus < 0:
            raise SlurmClusterError(f"gpus must be >= 0, got {gpus}")
        self.gpus = int(gpus)
        self._requested_cpus = cpus
        self.cpus: int = 0
        self.real_memory_mb: int = 0
        self.grace_time_s = grace_time_s
        self.start_timeout_s = start_timeout_s
        self.slurm_conf = self.workdir / "slurm.conf"
        self.slurmdbd_conf = self.workdir / "slurmdbd.conf"
        self.gres_conf = self.workdir / "gres.conf"
        self.env: dict[str, str] = {"SLURM_CONF": str(self.slurm_conf)}
        self._daemons: list[_Daemon] = []
        self._short_socket_dir: Path | None = None
        self._started = False
        #: Seconds the last :meth:`start` took, in total and per phase.
        self.startup_seconds: float | None = None
        self.phase_seconds: dict[str, float] = {}

        self._log_dir = self.workdir / "log"
        self._munge_dir = self.workdir / "munge"
        self._mysql_dir = self.workdir / "mysql"
        self._state_dir = self.workdir / "state"
        self._spool_dir = self.workdir / "spool"
        self._run_dir = self.workdir / "run"
        self.munge_socket = self._run_dir / "munge.sock"
        self.mysql_socket = self._run_dir / "mysql.sock"
        self._db_in_memory = db_in_memory
        self._db_data_dir = self._mysql_dir / "data"
        self._db_shm_dir: Path | None = None
        self._db_password = secrets.token_hex(12)
        self._ports: dict[str, int] = {}

    # ------------------------------------------------------------------ API

    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._started

    def start(self) -> "LocalSlurmCluster":
        """Start MariaDB, munged, slurmdbd, slurmctld and slurmd; wait until the node is idle.

        Returns:
            ``self``.

        Raises:
            SlurmClusterError: if binaries are missing, the user is not root,
                ``workdir`` already holds a cluster, or a daemon fails to start
                (the message names the daemon and shows the tail of its log).
                Daemons already started are stopped before raising.
        """
        if self._started:
            return self
        self._preflight()
        t0 = time.monotonic()
        self.phase_seconds = {}
        try:
            for phase, step in (
                ("prepare", self._prepare_dirs),
                ("mariadb", self._start_mariadb),
                ("munged", self._start_munge),
                ("configs", self._write_configs),
                ("slurmdbd", self._start_slurmdbd),
                ("sacctmgr", self._register_accounting),
                ("slurmctld", self._start_slurmctld),
                ("slurmd", self._start_slurmd),
            ):
                t_phase = time.monotonic()
                step()
                self.phase_seconds[phase] = round(time.monotonic() - t_phase, 3)
        except BaseException:
            self._stop_daemons()
            self._cleanup_external_dirs()
            raise
        self._started = True
        self.startup_seconds = time.monotonic() - t0
        # Safety net if the owner forgets stop() (not run on SIGKILL, of course).
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop every daemon this object started, and clean up.

        Safe to call more than once and after a failed :meth:`start`. Sends
        SIGTERM (then SIGKILL after a timeout) only to processes it started,
        plus job processes of *this* cluster left behind by ``slurmd``
        (identified by this cluster's exact ``SLURM_CONF`` path in their
        environment). Never raises for processes that are already gone.
        """
        if self._started:
            atexit.unregister(self.stop)
            self._cancel_all_jobs()
        self._stop_daemons()
        self._reap_stray_job_processes()
        self._cleanup_external_dirs()
        self._started = False

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (``sinfo``, ``sbatch``, ...) against this cluster.

        Args:
            args: Command and arguments, e.g. ``["squeue", "-h"]``.
            check: Raise if the command exits non-zero.
            timeout: Seconds before the command is killed.
            env: Extra environment variables (applied after :attr:`env`).

        Returns:
            The completed process, with ``stdout``/``stderr`` as text.

        Raises:
            SlurmClusterError: if the executable is missing, it times out, or
                (with ``check``) exits non-zero; the message includes its stderr.
        """
        full_env = {**os.environ, **self.env, **(env or {})}
        try:
            proc = subprocess.run(
                list(args),
                env=full_env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except FileNotFoundError as exc:
            raise SlurmClusterError(
                f"{args[0]!r} not found; install SLURM with scripts/slurm/install.sh"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise SlurmClusterError(f"{' '.join(args)} timed out after {timeout} s") from exc
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(args)} failed with exit status {proc.returncode}:\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def reconfigure(self, **settings: str | int) -> dict[str, str]:
        """Change ``slurm.conf`` settings (e.g. ``MaxArraySize=3``) and restart slurmctld to apply them.

        Each ``Key=value`` line of the generated config is replaced (or appended).  ``scontrol
        reconfigure`` is not enough: slurmctld 22.05 reports a new MaxArraySize at once but went on
        enforcing the old one in some runs (measured: 4-task arrays accepted at MaxArraySize=2, and
        refused after raising it back), so the controller is restarted, keeping its job state (no
        ``-c``), and this waits until ``scontrol show config`` reports every new value.

        Returns:
            The previous values ({key: old value as written}), to pass back to restore them.

        Raises:
            SlurmClusterError: ``scontrol`` fails, or the controller does not report the values within 30 s.
        """
        lines = self.slurm_conf.read_text().splitlines()
        old: dict[str, str] = {}
        for key, value in settings.items():
            for i, line in enumerate(lines):
                if line.split("=", 1)[0] == key:
                    old[key] = line.split("=", 1)[1]
                    lines[i] = f"{key}={value}"
                    break
            else:
                lines.append(f"{key}={value}")
        self.slurm_conf.write_text("\n".join(lines) + "\n")
        for daemon in [d for d in self._daemons if d.name == "slurmctld"]:
            daemon.popen.send_signal(signal.SIGTERM)
            try:
                daemon.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.popen.kill()
                daemon.popen.wait(timeout=10)
            if daemon.stream is not None:
                daemon.stream.close()
            self._daemons.remove(daemon)
        ctld = self._spawn(
            "slurmctld",
            [_which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.slurm_conf)],
            logs=(self._log_dir / "slurmctld.log",),
        )
        self._wait_until(ctld, "answer `scontrol ping` after a restart", self._controller_up)
        # the restarted controller marks the node DOWN until slurmd re-registers (up to SlurmdTimeout/3)
        deadline = time.monotonic() + 30
        while not self.node_state().rstrip("*~#").startswith(("idle", "mix", "alloc", "compl")):
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"node {self.node} is {self.node_state()} 30 s after restarting slurmctld")
            self.run(["scontrol", "update", f"NodeName={self.node}", "State=RESUME"], check=False)
            time.sleep(0.5)
        deadline = time.monotonic() + 30
        while True:
            shown = {}
            for line in self.run(["scontrol", "show", "config"]).stdout.splitlines():
                k, sep, v = line.partition("=")
                if sep:
                    shown[k.strip()] = v.strip()
            if all(shown.get(k) == str(v) for k, v in settings.items()):
                return old
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"scontrol reconfigure: {settings} not applied after 30 s "
                                        f"(controller shows {({k: shown.get(k) for k in settings})})")
            time.sleep(0.5)

    def node_state(self) -> str:
        """Return the state of node ``localhost`` as ``sinfo`` prints it (e.g. ``idle``).

        Raises:
            SlurmClusterError: if ``sinfo`` fails.
        """
        out = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"]).stdout
        return out.split()[0] if out.split() else ""

    def job_ids(self) -> list[str]:
        """Return the ids of all jobs the controller knows that are not finished.

        Raises:
            SlurmClusterError: if ``squeue`` fails.
        """
        out = self.run(["squeue", "-h", "-o", "%i"]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    # ------------------------------------------------------------ internals

    def _preflight(self) -> None:
        """Check binaries, user and workdir before anything is started."""
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(
                f"missing executables: {', '.join(missing)}. "
                "Install them (as root) with scripts/slurm/install.sh."
            )
        if os.geteuid() != 0:
            raise SlurmClusterError(
                "LocalSlurmCluster must run as root: slurmd launches jobs and the "
                "daemons run with --user=root / SlurmUser=root."
            )
        used = [
            path.name
            for path in (self.slurm_conf, self._mysql_dir, self._munge_dir, self._state_dir)
            if path.exists() or path.is_symlink()
        ]
        if used:
            raise SlurmClusterError(
                f"{self.workdir} already holds (part of) a cluster ({', '.join(used)} exist); "
                "a LocalSlurmCluster starts once, in a fresh work directory: pass a new one."
            )

    def _prepare_dirs(self) -> None:
        """Create the directory layout and pick free ports."""
        for directory in (
            self.workdir,
            self._log_dir,
            self._munge_dir,
            self._mysql_dir,
            self._state_dir,
            self._spool_dir,
            self._run_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        # munged refuses directories writable by group/others.
        for directory in (self._munge_dir, self._run_dir, self._log_dir):
            directory.chmod(0o755)
        # slurmd creates one AF_UNIX socket per job step in its spool dir, named
        # "<node>_<jobid>.<stepid>" (up to ~32 characters); socket paths are
        # limited to 108 bytes. If the workdir path is too long, keep sockets
        # and the spool in a short directory under /tmp instead.
        if len(str(self._spool_dir / self.node)) > _MAX_SPOOL_PATH:
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="rslurm-", dir="/tmp"))
            self._short_socket_dir.chmod(0o755)
            self.munge_socket = self._short_socket_dir / "munge.sock"
            self.mysql_socket = self._short_socket_dir / "mysql.sock"
            self._spool_dir = self._short_socket_dir / "spool"
            self._spool_dir.mkdir()
        taken: set[int] = set()
        for name in ("mysql", "slurmdbd", "slurmctld", "slurmd"):
            port = _free_port()
            while port in taken:
                port = _free_port()
            taken.add(port)
            self._ports[name] = port

    def _spawn(
        self,
        name: str,
        cmd: Sequence[str],
        logs: Sequence[Path] = (),
        env: Mapping[str, str] | None = None,
    ) -> _Daemon:
        """Start ``cmd`` in its own session with output to ``log/<name>.out``."""
        output = self._log_dir / f"{name}.out"
        stream = open(output, "ab")
        full_env = {**os.environ, **self.env, **(env or {})}
        try:
            popen = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=self.workdir,
                start_new_session=True,
            )
        except OSError as exc:
            stream.close()
            raise SlurmClusterError(f"cannot execute {name} ({cmd[0]}): {exc}") from exc
        daemon = _Daemon(name, popen, output, tuple(logs), stream)
        self._daemons.append(daemon)
        return daemon

    def _wait_until(self, daemon: _Daemon, what: str, probe: Callable[[], bool]) -> None:
        """Poll ``probe`` until it returns True; raise if ``daemon`` dies or time runs out."""
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.05
        while True:
            if not daemon.alive():
                raise SlurmClusterError(
                    f"{daemon.name} died while waiting for it to {what}.\n"
                    + daemon.describe_failure()
                )
            try:
                if probe():
                    return
            except SlurmClusterError:
                pass
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"{daemon.name} did not {what} within {self.start_timeout_s:.0f} s.\n"
                    + daemon.describe_failure()
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _quiet(self, args: Sequence[str], timeout: float = 10.0) -> bool:
        """Run a probe command; return True if it exits 0."""
        try:
            proc = subprocess.run(
                list(args),
                env={**os.environ, **self.env},
                capture_output=True,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0

    # MariaDB --------------------------------------------------------------

    def _mysql_server_args(self) -> list[str]:
        data = self._db_data_dir
        return [
            "--no-defaults",
            f"--datadir={data}",
            "--user=root",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=32M",
            "--innodb-lock-wait-timeout=900",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-flush-method=nosync",  # throwaway data: skip fsync (disk is the bottleneck)
            "--skip-innodb-doublewrite",
            "--innodb-use-native-aio=0",
        ]

    def _choose_db_dir(self) -> None:
        """Put the MariaDB datadir on /dev/shm if requested or (auto) if it has room."""
        shm = Path("/dev/shm")
        use_shm = self._db_in_memory
        if use_shm is None:
            try:
                stat = os.statvfs(shm)
                use_shm = os.access(shm, os.W_OK) and stat.f_bavail * stat.f_frsize >= 1 << 30
            except OSError:
                use_shm = False
        if not use_shm:
            return
        self._db_shm_dir = Path(tempfile.mkdtemp(prefix="rift-slurm-mariadb-", dir=shm))
        self._db_data_dir = self._db_shm_dir / "data"
        # Leave a pointer in the workdir for whoever inspects it.
        (self._mysql_dir / "data").symlink_to(self._db_data_dir)

    def _start_mariadb(self) -> None:
        self._choose_db_dir()
        data = self._db_data_dir
        init_log = self._log_dir / "mariadb-install-db.out"
        cmd = [
            _which("mariadb-install-db") or "mariadb-install-db",
            *self._mysql_server_args(),
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
            "--skip-name-resolve",
        ]
        with open(init_log, "wb") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)
        if proc.returncode != 0 or not (data / "mysql").is_dir():
            raise SlurmClusterError(
                f"mariadb-install-db failed (status {proc.returncode}) for {data}.\n"
                f"--- tail of {init_log} ---\n{_tail(init_log)}"
            )
        error_log = self._log_dir / "mariadbd.log"
        daemon = self._spawn(
            "mariadbd",
            [
                _which("mariadbd") or "mariadbd",
                *self._mysql_server_args(),
                "--bind-address=127.0.0.1",
                f"--port={self._ports['mysql']}",
                f"--socket={self.mysql_socket}",
                f"--pid-file={self._run_dir / 'mariadbd.pid'}",
                f"--log-error={error_log}",
                "--skip-name-resolve",
            ],
            logs=(error_log,),
        )
        admin = _which("mariadb-admin") or "mariadb-admin"
        self._wait_until(
            daemon,
            "accept connections",
            lambda: self._quiet(
                [admin, "--no-defaults", f"--socket={self.mysql_socket}", "-uroot", "ping"]
            ),
        )
        sql = (
            "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}';"
            f"CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{self._db_password}';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
            "FLUSH PRIVILEGES;"
        )
        client = _which("mariadb") or "mariadb"
        proc = subprocess.run(
            [client, "--no-defaults", f"--socket={self.mysql_socket}", "-uroot", "-e", sql],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise SlurmClusterError(
                f"creating the slurm accounting database in MariaDB failed: {proc.stderr.strip()}\n"
                + daemon.describe_failure()
            )

    # munge ------------------------------------------------------------------

    def _start_munge(self) -> None:
        key = self._munge_dir / "munge.key"
        proc = subprocess.run(
            [_which("mungekey") or "mungekey", "--create", f"--keyfile={key}", "--bits=1024"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SlurmClusterError(f"mungekey could not create {key}: {proc.stderr.strip()}")
        key.chmod(0o400)
        log = self._log_dir / "munged.log"
        daemon = self._spawn(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self._run_dir / 'munged.pid'}",
                f"--log-file={log}",
                f"--seed-file={self._munge_dir / 'munged.seed'}",
            ],
            logs=(log,),
        )
        munge = _which("munge") or "munge"
        self._wait_until(
            daemon,
            "create its socket",
            lambda: self.munge_socket.exists()
            and self._quiet([munge, f"--socket={self.munge_socket}", "--no-input"]),
        )

    # configuration ----------------------------------------------------------

    def _detect_hardware(self) -> None:
        proc = subprocess.run(
            [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30
        )
        cpus = re.search(r"\bCPUs=(\d+)", proc.stdout)
        mem = re.search(r"\bRealMemory=(\d+)", proc.stdout)
        if proc.returncode != 0 or not cpus or not mem:
            raise SlurmClusterError(
                f"`slurmd -C` did not report CPUs/RealMemory (status {proc.returncode}): "
                f"{proc.stdout.strip()} {proc.stderr.strip()}"
            )
        real_cpus = int(cpus.group(1))
        self.cpus = self._requested_cpus or max(4, real_cpus)
        if self.cpus < 1:
            raise SlurmClusterError(f"cpus must be >= 1, got {self.cpus}")
        self.real_memory_mb = int(mem.group(1))

    def _write_configs(self) -> None:
        self._detect_hardware()
        logs = self._log_dir
        auth_info = f"socket={self.munge_socket},cred_expire=5"
        dbd = "\n".join(
            [
                "# Generated by tests.harness.slurm_cluster.LocalSlurmCluster",
                "AuthType=auth/munge",
                f"AuthInfo=socket={self.munge_socket}",
                "DbdHost=localhost",
                "DbdAddr=127.0.0.1",
                f"DbdPort={self._ports['slurmdbd']}",
                "SlurmUser=root",
                "DebugLevel=info",
                f"LogFile={logs / 'slurmdbd.log'}",
                f"PidFile={self._run_dir / 'slurmdbd.pid'}",
                "StorageType=accounting_storage/mysql",
                "StorageHost=127.0.0.1",
                f"StoragePort={self._ports['mysql']}",
                "StorageUser=slurm",
                f"StoragePass={self._db_password}",
                "StorageLoc=slurm_acct_db",
                "",
            ]
        )
        # slurmdbd refuses a slurmdbd.conf readable by others (it holds a password).
        fd = os.open(self.slurmdbd_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(dbd)
        self.slurmdbd_conf.chmod(0o600)

        conf = "\n".join(
            [
                "# Generated by tests.harness.slurm_cluster.LocalSlurmCluster",
                f"ClusterName={_CLUSTER_NAME}",
                "SlurmctldHost=localhost",
                f"SlurmctldPort={self._ports['slurmctld']}",
                f"SlurmdPort={self._ports['slurmd']}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo={auth_info}",
                f"StateSaveLocation={self._state_dir}",
                f"SlurmdSpoolDir={self._spool_dir}/%n",
                f"SlurmctldPidFile={self._run_dir / 'slurmctld.pid'}",
                f"SlurmdPidFile={self._run_dir / 'slurmd.pid'}",
                f"SlurmctldLogFile={logs / 'slurmctld.log'}",
                f"SlurmdLogFile={logs / 'slurmd.log'}",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                "MailProg=/bin/true",
                "MpiDefault=none",
                "SwitchType=switch/none",
                # No cgroups needed:
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                # Trust the configured CPU count even if above the hardware's.
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "SlurmdTimeout=300",
                "SlurmctldTimeout=60",
                "InactiveLimit=0",
                "MinJobAge=300",
                "KillWait=10",
                "MaxArraySize=10001",
                "MaxJobCount=100000",
                "JobRequeue=1",
                # Schedule often: requeued jobs become eligible after a short delay
                # and only a scheduling pass starts them again.
                "SchedulerType=sched/backfill",
                "SchedulerParameters=sched_interval=2,bf_interval=2",
                "PriorityType=priority/basic",
                # Preemption: a job in a higher PriorityTier partition requeues
                # jobs of lower tiers; they get their --signal (submitit: USR2).
                "PreemptType=preempt/partition_prio",
                "PreemptMode=REQUEUE",
                "SlurmctldParameters=preempt_send_user_signal",
                # Accounting through slurmdbd (submitit reads job states via sacct).
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=localhost",
                f"AccountingStoragePort={self._ports['slurmdbd']}",
                f"AccountingStoragePass={self.munge_socket}",
                "JobCompType=jobcomp/none",
                *(["GresTypes=gpu", "AccountingStorageTRES=gres/gpu"] if self.gpus else []),
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                f"RealMemory={self.real_memory_mb}{f' Gres=gpu:{self.gpus}' if self.gpus else ''} State=UNKNOWN",
                f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE "
                f"State=UP PriorityTier=1 OverSubscribe=NO PreemptMode=REQUEUE "
                f"GraceTime={self.grace_time_s}",
                f"PartitionName=high Nodes={self.node} Default=NO MaxTime=INFINITE "
                "State=UP PriorityTier=10 OverSubscribe=NO PreemptMode=OFF",
                "",
            ]
        )
        self.slurm_conf.write_text(conf)
        if self.gpus:
            self._write_fake_gpus(self.node, self.gpus, "Generated by tests.harness.slurm_cluster.LocalSlurmCluster")

    def _write_fake_gpus(self, nodes: str, count: int, comment: str) -> None:
        """gres.conf giving ``nodes`` (a node name or list) ``count`` fake GPUs: links to /dev/null in ``dev/``.

        slurmd reads gres.conf from the directory of slurm.conf and wants a character device behind ``File=``.
        """
        devices = self.workdir / "dev"
        devices.mkdir(exist_ok=True)
        for i in range(count):
            link = devices / f"gpu{i}"
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        self.gres_conf.write_text(f"# {comment}: fake GPUs (links to /dev/null)\n"
                                  f"NodeName={nodes} Name=gpu File={devices}/gpu[0-{count - 1}]\n")

    # slurm daemons -----------------------------------------------------------

    def _start_slurmdbd(self) -> None:
        daemon = self._spawn(
            "slurmdbd",
            [_which("slurmdbd") or "slurmdbd", "-D"],
            logs=(self._log_dir / "slurmdbd.log",),
        )
        sacctmgr = _which("sacctmgr") or "sacctmgr"
        self._wait_until(
            daemon,
            "answer sacctmgr",
            lambda: self._quiet([sacctmgr, "-n", "-P", "list", "cluster"], timeout=15),
        )

    def _register_accounting(self) -> None:
        """Register cluster, account and the current user in slurmdbd (idempotent)."""
        user = _current_user()
        for args in (
            ["add", "cluster", _CLUSTER_NAME],
            ["add", "account", _ACCOUNT, f"Cluster={_CLUSTER_NAME}", "Description=rift tests"],
            ["add", "user", user, f"Account={_ACCOUNT}", f"Cluster={_CLUSTER_NAME}"],
        ):
            proc = self.run(["sacctmgr", "-i", *args], check=False, timeout=30)
            text = proc.stdout + proc.stderr
            if proc.returncode != 0 and "Nothing new added" not in text and "already exists" not in text:
                raise SlurmClusterError(
                    f"sacctmgr -i {' '.join(args)} failed (status {proc.returncode}): {text.strip()}"
                )

    def _start_slurmctld(self) -> None:
        daemon = self._spawn(
            "slurmctld",
            [_which("slurmctld") or "slurmctld", "-D", "-c", "-i", "-f", str(self.slurm_conf)],
            logs=(self._log_dir / "slurmctld.log",),
        )
        self._wait_until(daemon, "answer `scontrol ping`", self._controller_up)

    def _controller_up(self) -> bool:
        proc = self.run(["scontrol", "ping"], check=False, timeout=10)
        return proc.returncode == 0 and "UP" in proc.stdout

    def _start_slurmd(self) -> None:
        (self._spool_dir / self.node).mkdir(parents=True, exist_ok=True)
        daemon = self._spawn(
            "slurmd",
            [_which("slurmd") or "slurmd", "-D", "-N", self.node, "-f", str(self.slurm_conf)],
            logs=(self._log_dir / "slurmd.log",),
        )
        self._wait_until(
            daemon,
            f"bring node {self.node} to state idle",
            lambda: self.node_state().rstrip("*") == "idle",
        )

    # shutdown ---------------------------------------------------------------

    def _cancel_all_jobs(self) -> None:
        """Kill and cancel every job, then wait (bounded) until the queue is empty."""
        ctld = next((d for d in self._daemons if d.name == "slurmctld"), None)
        if ctld is None or not ctld.alive():
            return
        try:
            ids = self.job_ids()
        except SlurmClusterError:
            return
        if not ids:
            return
        # SIGKILL first: submitit jobs ignore SIGTERM, which would cost KillWait.
        self.run(["scancel", "--full", "--signal=KILL", *ids], check=False)
        self.run(["scancel", *ids], check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if not self.job_ids():
                    return
            except SlurmClusterError:
                return
            time.sleep(0.3)

    def _stop_daemons(self) -> None:
        """SIGTERM the daemons in reverse start order, SIGKILL those that linger."""
        for daemon in reversed(self._daemons):
            if daemon.alive():
                with contextlib.suppress(ProcessLookupError):
                    daemon.popen.send_signal(signal.SIGTERM)
                try:
                    daemon.popen.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        daemon.popen.kill()
                    daemon.popen.wait(timeout=10)
            if daemon.stream is not None:
                daemon.stream.close()
        self._daemons.clear()

    def _reap_stray_job_processes(self) -> None:
        """Kill processes whose environment has exactly this cluster's SLURM_CONF.

        ``slurmstepd`` and job processes are detached from ``slurmd`` and
        survive it; they carry ``SLURM_CONF=<our slurm.conf>``, which no other
        cluster's processes can have. The current process is never touched.
        """
        marker = f"SLURM_CONF={self.slurm_conf}".encode()
        me = os.getpid()
        for _round in range(2):
            victims = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                try:
                    environ = (entry / "environ").read_bytes()
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if marker not in environ.split(b"\0"):
                    continue
                # Only slurm job machinery: slurmstepd or processes of a job.
                if cmdline.startswith(b"slurmstepd") or b"SLURM_JOB_ID=" in environ:
                    victims.append(int(entry.name))
            if not victims:
                return
            for pid in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def _cleanup_external_dirs(self) -> None:
        """Remove the directories this cluster created outside ``workdir``."""
        if self._short_socket_dir is not None:
            shutil.rmtree(self._short_socket_dir, ignore_errors=True)
            self._short_socket_dir = None
        if self._db_shm_dir is not None:
            shutil.rmtree(self._db_shm_dir, ignore_errors=True)
            self._db_shm_dir = None


def _current_user() -> str:
    """Return the login name of the effective user."""
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
