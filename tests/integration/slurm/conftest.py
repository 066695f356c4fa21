"""Fixtures for tests against a real local SLURM cluster (see tests.harness.slurm_cluster).

The cluster needs the Debian packages installed by ``scripts/slurm/install.sh``
and root. Without the binaries the tests are skipped, unless the environment
variable ``CI`` is set, in which case they fail (CI must exercise them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.slurm_cluster import LocalSlurmCluster, missing_binaries


# Filled by the slurm_cluster fixture, printed by pytest_terminal_summary.
_STARTUP_REPORT: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``slurm`` marker."""
    config.addinivalue_line(
        "markers", "slurm: test runs jobs on a real local SLURM cluster (scripts/slurm/install.sh)"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how long the local SLURM cluster took to start, if it was started."""
    for line in _STARTUP_REPORT:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurmCluster]:
    """A running :class:`LocalSlurmCluster` shared by the whole session (node ``localhost`` declares 4 GPUs).

    Exports ``SLURM_CONF`` into ``os.environ`` for the session (restored at
    the end) so that submitit and any SLURM client find the cluster, then stops
    every daemon. Skips when the SLURM/MUNGE/MariaDB binaries are missing and
    ``CI`` is unset; fails when they are missing and ``CI`` is set.
    """
    missing = missing_binaries()
    if missing:
        message = (
            f"local SLURM cluster unavailable, missing executables: {', '.join(missing)}; "
            "install them as root with scripts/slurm/install.sh"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is an error)", pytrace=False)
        pytest.skip(message)

    # Gres=gpu:4 on the node (fake devices): GPU job scripts are checked as a GPU cluster would check them
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm", numbered=True), gpus=4)
    saved = {key: os.environ.get(key) for key in cluster.env}
    try:
        cluster.start()
        phases = ", ".join(f"{k} {v:.1f}" for k, v in cluster.phase_seconds.items())
        _STARTUP_REPORT.append(
            f"local SLURM cluster: started in {cluster.startup_seconds:.1f} s ({phases}); "
            f"logs in {cluster.workdir / 'log'}"
        )
        os.environ.update(cluster.env)
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _package_root() -> Path:
    """The repository root: holds the ``rift_dist`` package and ``tests.harness`` (for PYTHONPATH in jobs)."""
    import tests.harness

    return Path(tests.harness.__file__).resolve().parents[2]


@pytest.fixture
def slurm_executor(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path
) -> Callable[..., Any]:
    """Factory ``make(name, **params)`` returning a submitit ``AutoExecutor`` for the cluster.

    Each executor gets its own folder ``tmp_path / name`` (job ids restart with
    every cluster, so folders must not be shared). ``params`` go to
    ``update_parameters``; jobs get ``PYTHONPATH`` pointing at this checkout so
    ``tests.harness.slurm_jobs`` is importable even if not installed.
    """
    import submitit

    def make(name: str, **params: Any) -> submitit.AutoExecutor:
        executor = submitit.AutoExecutor(folder=tmp_path / name, cluster="slurm")
        params.setdefault("timeout_min", 5)
        params.setdefault("cpus_per_task", 1)
        root = _package_root()
        params.setdefault("slurm_setup", [f'export PYTHONPATH="{root}${{PYTHONPATH:+:$PYTHONPATH}}"'])
        executor.update_parameters(**params)
        return executor

    return make


@pytest.fixture
def wait_result(slurm_cluster: LocalSlurmCluster) -> Callable[..., Any]:
    """Function ``wait(job, timeout_s=60)`` returning ``job.result()`` without hanging.

    Fails the test with ``squeue``/``sacct`` output and the job's logs if the
    job is not done within ``timeout_s``.
    """

    def wait(job: Any, timeout_s: float = 60.0) -> Any:
        return _wait_result(job, slurm_cluster, timeout_s)

    return wait


def _wait_result(job: Any, cluster: LocalSlurmCluster, timeout_s: float) -> Any:
    """Poll ``job.done()`` until ``timeout_s``; return ``job.result()`` or fail with diagnostics."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            squeue = cluster.run(["squeue", "-a"], check=False).stdout
            sacct = cluster.run(
                ["sacct", "-a", "--duplicates", "-o", "JobID,Partition,State,ExitCode,Start,End"],
                check=False,
            ).stdout
            pytest.fail(
                f"job {job.job_id} not done after {timeout_s} s\n--- squeue ---\n{squeue}"
                f"\n--- sacct ---\n{sacct}\n--- stdout ---\n{job.stdout()}"
                f"\n--- stderr ---\n{job.stderr()}",
                pytrace=False,
            )
        time.sleep(0.5)
    return job.result()
