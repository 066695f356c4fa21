"""Fixtures of the multi-node tests: a controller and 3 compute nodes in network namespaces (netns_cluster.py).

``mn_cluster`` (session) starts :class:`~tests.integration.multinode.netns_cluster.NetnsSlurmCluster` once and
removes its daemons, namespaces, veths and bridge at the end of the session, also when a test failed.  It is
skipped (with the reason) only when the machine cannot create network namespaces or lacks the SLURM binaries;
with ``CI`` set those are failures.

``SLURM_CONF`` is NOT exported for the whole session (tests/integration/slurm/ exports its own one-node
cluster's): the autouse ``_mn_env`` fixture points ``SLURM_CONF`` at the multi-node cluster for each test of
this directory only, and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rift_dist import cluster as rift_cluster
from tests.harness.slurm_cluster import missing_binaries
from tests.integration.multinode.netns_cluster import (
    NetnsSlurmCluster,
    namespaces_unavailable,
)

_REPORT: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``slurm`` marker (also registered by tests/integration/slurm/conftest.py)."""
    config.addinivalue_line("markers", "slurm: test runs jobs on a real local SLURM cluster (scripts/slurm/install.sh)")


def pytest_terminal_summary(terminalreporter) -> None:
    """Print how long the multi-node cluster took to start and stop."""
    for line in _REPORT:
        terminalreporter.write_line(line)


def _skip_or_fail(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so this is an error)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mn_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsSlurmCluster]:
    """A running 3-node cluster (``node1..node3``: 2 CPUs and ``Gres=gpu:2`` each; partitions debug, high)."""
    missing = missing_binaries()
    if missing:
        _skip_or_fail(f"multi-node SLURM cluster unavailable, missing executables: {', '.join(missing)}; "
                      "install them as root with scripts/slurm/install.sh")
    why = namespaces_unavailable()
    if why:
        _skip_or_fail(f"multi-node SLURM cluster unavailable: this machine cannot create network namespaces ({why})")
    mn = NetnsSlurmCluster(tmp_path_factory.mktemp("mnslurm", numbered=True), nodes=3, cpus_per_node=2,
                           gpus_per_node=2)
    try:
        mn.start()
        phases = ", ".join(f"{k} {v:.1f}" for k, v in mn.phase_seconds.items())
        _REPORT.append(f"multi-node SLURM cluster (3 nodes in network namespaces, {mn.controller_addr}/24): started "
                       f"in {mn.startup_seconds:.1f} s ({phases}); logs in {mn.workdir / 'log'}")
        yield mn
    finally:
        t0 = time.monotonic()
        mn.stop()
        _REPORT.append(f"multi-node SLURM cluster: stopped and its namespaces removed in {time.monotonic() - t0:.1f} s")


@contextlib.contextmanager
def mn_env(mn: NetnsSlurmCluster) -> Iterator[None]:
    """Within: SLURM_CONF of the multi-node cluster, no launcher variables, no MLFLOW_TRACKING_URI (restored after)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in mn.env.items():
            mp.setenv(key, value)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
            mp.delenv(key, raising=False)
        yield


@pytest.fixture(autouse=True)
def _mn_env(request) -> Iterator[None]:
    """For tests using ``mn_cluster``: :func:`mn_env` for this test only (module fixtures use mn_env themselves)."""
    if "mn_cluster" not in request.fixturenames:
        yield
        return
    with mn_env(request.getfixturevalue("mn_cluster")):
        yield


@pytest.fixture
def healthy_nodes(mn_cluster: NetnsSlurmCluster) -> NetnsSlurmCluster:
    """``mn_cluster`` with every node idle and no job left (a test that killed a node revives it afterwards)."""
    for node, state in mn_cluster.node_states().items():
        if not state.rstrip("*~#").startswith(("idle", "mix", "alloc")):
            mn_cluster.revive_node(node)
    return mn_cluster


def wait_run(run_dir: Path, mn: NetnsSlurmCluster, timeout_s: float) -> dict:
    """``rift_dist.cluster.wait`` on ``run_dir``; on a time-out fail with squeue, sacct and the jobs' stderr."""
    try:
        return rift_cluster.wait(run_dir, timeout_s=timeout_s, poll_s=1.0, log=lambda _: None)
    except rift_cluster.ClusterError:
        pytest.fail(f"jobs of {run_dir} not done after {timeout_s}s\n{diagnostics(run_dir, mn)}", pytrace=False)


def diagnostics(run_dir: Path, mn: NetnsSlurmCluster) -> str:
    """squeue, sacct (with node lists) and the tail of every job's stderr, for failure messages."""
    out = mn.run(["squeue", "-a"], check=False).stdout
    acct = mn.run(["sacct", "-a", "--duplicates", "-o", "JobID%18,JobName%22,State,ExitCode,NodeList%20,Elapsed"],
                  check=False).stdout
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2500:]}" for p in sorted(Path(run_dir).glob("jobs/*/*.err")))
    return f"{out}\n{acct}\n{logs}"
