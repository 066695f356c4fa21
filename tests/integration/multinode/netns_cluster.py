"""A real multi-node SLURM cluster on one machine: one ``slurmd`` per network + UTS namespace.

:class:`NetnsSlurmCluster` extends :class:`tests.harness.slurm_cluster.LocalSlurmCluster` (MariaDB,
``munged``, ``slurmdbd`` and ``slurmctld`` in the root namespace, as there) with ``nodes`` compute nodes
``node1 .. nodeN``.  Each node is

* a network namespace ``rift<tag>-nodeK`` (``ip netns add``) holding one end of a veth pair whose other end
  is a port of the bridge ``rbr<tag>``; the node's address is ``10.<a>.<b>.(10+K)/24``, the bridge's (the
  controller's, where ``slurmctld`` and the test's MLflow server listen) ``10.<a>.<b>.1``.  The /24 is
  picked among 10.77.0.0/16 so that no interface of the machine uses it already;
* a UTS namespace inside it (``unshare --uts``), whose hostname is the node name, so gloo's "my address"
  (the address of ``gethostname()``) is the node's own private address;
* its own ``/etc/hosts`` (``/etc/netns/<ns>/hosts`` bind-mounted in a mount namespace): every node name and
  ``ctl`` resolve to their private addresses, so ``MASTER_ADDR=node1`` (the first host of
  ``SLURM_JOB_NODELIST``) is reachable from every node;
* one ``slurmd -N nodeK`` with per-node spool, log and PID files (``%n`` in ``slurm.conf``) and
  ``Gres=gpu:<gpus>`` backed by fake device files (links to ``/dev/null`` under the work directory, listed
  in ``gres.conf``), so GPU requests are scheduled as on a GPU cluster while the jobs run on the CPU.

The file system is not isolated (network namespaces share it): the run directory, the virtual environment
and the munge socket (a path, not an abstract socket) are the same on every node, as on a cluster with a
shared file system.  Partitions ``debug`` (default, preemptable, ``LLN=YES``: jobs go to the least loaded
node, so arrays spread over the nodes) and ``high`` span every node.

Everything created outside the work directory (namespaces, the bridge and veths, ``/etc/netns/<ns>``) is
removed by :meth:`NetnsSlurmCluster.stop`, also after a failed start (and, when a test session was killed
before it could stop, by the next cluster's start: :func:`remove_stale_networks`); daemons and the jobs' processes are
signalled by pid (never by name).  Needs root, ``ip`` (iproute2) and ``unshare`` (util-linux).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.harness.slurm_cluster import LocalSlurmCluster, SlurmClusterError, _which

__all__ = ["NetnsSlurmCluster", "namespaces_unavailable", "remove_stale_networks"]

_NETNS_RUN = Path("/run/netns")
_NETNS_ETC = Path("/etc/netns")
_LEDGER = Path("/run/rift-netns")  # what each live cluster made outside its work directory (see remove_stale_networks)


def _ip(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (inside ``netns`` when given); raise :class:`SlurmClusterError` on failure with ``check``."""
    ip = _which("ip") or "ip"
    cmd = [ip, "netns", "exec", netns, ip, *args] if netns else [ip, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise SlurmClusterError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run :class:`NetnsSlurmCluster`, or None when it can.

    Probes, and removes at once, one network namespace, one bridge and one veth pair, and runs
    ``unshare --uts`` inside the namespace (the probe's names carry this process's id).

    Returns:
        None, or a sentence naming what is missing or refused (not root, no ``ip``/``unshare``, the kernel
        refused a namespace, a bridge or a veth pair: e.g. a container without CAP_SYS_ADMIN/CAP_NET_ADMIN).
    """
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for exe in ("ip", "unshare", "nsenter", "hostname", "mount"):
        if _which(exe) is None:
            return f"`{exe}` not found (install iproute2 / util-linux: scripts/slurm/install.sh)"
    tag = f"{os.getpid() % 100000:05d}"
    ns, br, veth = f"riftprobe{tag}", f"rpb{tag}", f"rpv{tag}"
    try:
        for args, what in ((("netns", "add", ns), "a network namespace"),
                           (("link", "add", br, "type", "bridge"), "a bridge"),
                           (("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p"), "a veth pair"),
                           (("link", "set", f"{veth}p", "netns", ns), "moving a veth into a namespace")):
            proc = _ip(*args, check=False)
            if proc.returncode != 0:
                return f"the kernel refused {what} (`ip {' '.join(args)}`: {proc.stderr.strip()})"
        proc = subprocess.run([_which("ip") or "ip", "netns", "exec", ns, _which("unshare") or "unshare", "--uts",
                               "hostname", "probe"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return f"`unshare --uts` inside a network namespace failed: {proc.stderr.strip()}"
        return None
    finally:
        _ip("link", "del", veth, check=False)
        _ip("link", "del", br, check=False)
        _ip("netns", "del", ns, check=False)


def _remove_items(items) -> None:
    """Delete recorded ("link" | "netns" | "etc", name) items, newest first; never raises."""
    for kind, name in reversed([tuple(i) for i in items]):
        if kind == "link":
            _ip("link", "del", name, check=False)
        elif kind == "netns":
            _ip("netns", "del", name, check=False)
        elif kind == "etc" and str(name).startswith(str(_NETNS_ETC) + "/"):
            shutil.rmtree(name, ignore_errors=True)


def remove_stale_networks() -> list[str]:
    """Remove the namespaces, links and /etc/netns entries of clusters whose process is gone (killed before
    :meth:`NetnsSlurmCluster.stop`), as recorded in ``/run/rift-netns/*.json``; the ledgers of live processes are
    left alone.

    Returns:
        The ledger files handled.
    """
    done = []
    for ledger in sorted(_LEDGER.glob("*.json")) if _LEDGER.is_dir() else []:
        try:
            record = json.loads(ledger.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if Path(f"/proc/{pid}").exists():
            continue
        _remove_items(record.get("items", []))
        with contextlib.suppress(OSError):
            ledger.unlink()
        done.append(str(ledger))
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of every interface of the root namespace (``ip -4 -o addr``)."""
    nets = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


class NetnsSlurmCluster(LocalSlurmCluster):
    """A controller and ``nodes`` compute nodes, each ``slurmd`` in its own network and UTS namespace.

    Args:
        workdir: as :class:`LocalSlurmCluster` (a fresh directory).
        nodes: compute nodes (``node1`` .. ``node<nodes>``), >= 1.
        cpus_per_node: CPU slots each node declares (``config_overrides``: more than the machine has is fine,
            ``task/none`` binds nothing).
        gpus_per_node: fake GPUs per node (``Gres=gpu:<n>``), >= 0.
        slurmd_timeout_s: ``SlurmdTimeout``: seconds after which the controller marks a silent node DOWN
            (and requeues its jobs, ``JobRequeue=1``).
        **kwargs: passed to :class:`LocalSlurmCluster` (``grace_time_s``, ``start_timeout_s``, ``db_in_memory``).

    Attributes:
        node_names: ``["node1", ...]``.  controller_addr: the bridge's address (``10.77.x.1``), where the
        controller answers and where tests bind servers the nodes must reach.  node_addrs: {node: address}.
        netns: {node: namespace name}.

    Raises:
        SlurmClusterError: bad arguments (here), or from :meth:`start` as :class:`LocalSlurmCluster` does, plus a
            network that cannot be created (the message names the ``ip`` command that failed).
    """

    def __init__(self, workdir: Path | str, *, nodes: int = 3, cpus_per_node: int = 2, gpus_per_node: int = 2,
                 slurmd_timeout_s: int = 30, **kwargs) -> None:
        if nodes < 1 or cpus_per_node < 1 or gpus_per_node < 0:
            raise SlurmClusterError(f"nodes and cpus_per_node must be >= 1 and gpus_per_node >= 0, got nodes={nodes}, "
                                    f"cpus_per_node={cpus_per_node}, gpus_per_node={gpus_per_node}")
        super().__init__(workdir, cpus=cpus_per_node, gpus=0, **kwargs)
        self.gpus_per_node = int(gpus_per_node)
        self.slurmd_timeout_s = int(slurmd_timeout_s)
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self.node = self.node_names[0]  # LocalSlurmCluster's spool-path check and node_state() default
        tag = secrets.token_hex(3)
        self.netns = {n: f"rift{tag}-{n}" for n in self.node_names}
        self._bridge = f"rbr{tag}"
        self._veths = {n: f"rv{tag}{i}" for i, n in enumerate(self.node_names, 1)}
        self._network: ipaddress.IPv4Network | None = None
        self.controller_addr = ""
        self.node_addrs: dict[str, str] = {}
        self._net_created: list[tuple[str, str]] = []  # ("netns"|"link"|"etc", name) in creation order
        self._slurmds: dict[str, object] = {}
        self._made_netns_etc = False

    # ------------------------------------------------------------------ public

    def node_state(self, node: str | None = None) -> str:
        """State of ``node`` (default ``node1``) as ``sinfo`` prints it (``idle``, ``mixed``, ``down*`` ...)."""
        out = self.run(["sinfo", "-h", "-N", "-n", node or self.node, "-o", "%T"]).stdout
        return out.split()[0] if out.split() else ""

    def node_states(self) -> dict[str, str]:
        """{node: state} for every node."""
        return {n: self.node_state(n) for n in self.node_names}

    def processes_on(self, node: str) -> list[int]:
        """Pids of every process whose network namespace is ``node``'s (its slurmd, slurmstepds, job ranks)."""
        try:
            want = os.stat(_NETNS_RUN / self.netns[node]).st_ino
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.stat(entry / "ns" / "net").st_ino == want:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def kill_node(self, node: str) -> list[int]:
        """Make ``node`` die as a crashed machine does: SIGKILL its slurmd and every process in its namespace.

        Returns:
            The pids killed.  The controller notices after ``SlurmdTimeout``; :meth:`mark_down` says so at once.
        """
        victims = self.processes_on(node)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        daemon = self._slurmds.get(node)
        if daemon is not None:
            with contextlib.suppress(Exception):
                daemon.popen.wait(timeout=10)
        return victims

    def mark_down(self, node: str, reason: str = "killed by test") -> None:
        """``scontrol update NodeName=<node> State=DOWN`` (what an admin or a health check does)."""
        self.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", f"Reason={reason}"])

    def revive_node(self, node: str) -> None:
        """Start ``node``'s slurmd again and resume the node; wait until it is idle (or running jobs).

        Raises:
            SlurmClusterError: the node does not come back within ``start_timeout_s``.
        """
        self._daemons = [d for d in self._daemons if d is not self._slurmds.get(node)]
        daemon = self._spawn_slurmd(node)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
            if self.node_state(node).rstrip("*~#").startswith(("idle", "mix", "alloc")):
                return
            if not daemon.alive() or time.monotonic() > deadline:
                raise SlurmClusterError(f"{node} did not come back (state {self.node_state(node)}).\n"
                                        + daemon.describe_failure())
            time.sleep(0.5)

    def in_node(self, node: str, args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside ``node``'s network and UTS namespaces (hostname = node name)."""
        cmd = [*self._enter(node), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env},
                              timeout=kwargs.pop("timeout", 60), **kwargs)

    # ------------------------------------------------------------------ network

    def _pick_network(self) -> ipaddress.IPv4Network:
        used = _used_networks()
        for _ in range(200):
            net = ipaddress.IPv4Network(f"10.77.{secrets.randbelow(250) + 1}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise SlurmClusterError("no free /24 in 10.77.0.0/16 for the cluster's private link (200 tries)")

    def _created(self, item: tuple[str, str]) -> None:
        """Remember one thing made outside the work directory, in memory and in the ledger
        ``/run/rift-netns/<bridge>.json`` (with this process's id), so that :func:`remove_stale_networks` can remove
        it if this process is killed before :meth:`stop`."""
        self._net_created.append(item)
        _LEDGER.mkdir(parents=True, exist_ok=True)
        (_LEDGER / f"{self._bridge}.json").write_text(json.dumps({"pid": os.getpid(), "items": self._net_created}))

    def _setup_network(self) -> None:
        """Bridge with the controller's address; per node a namespace, a veth pair into it, an address, /etc/hosts."""
        remove_stale_networks()
        self._network = net = self._pick_network()
        hosts = list(net.hosts())
        self.controller_addr = str(hosts[0])
        self.node_addrs = {n: str(hosts[9 + i]) for i, n in enumerate(self.node_names, 1)}
        _ip("link", "add", self._bridge, "type", "bridge")
        self._created(("link", self._bridge))
        _ip("addr", "add", f"{self.controller_addr}/{net.prefixlen}", "dev", self._bridge)
        _ip("link", "set", self._bridge, "up")
        hosts_text = "127.0.0.1 localhost\n" + f"{self.controller_addr} ctl\n" + "".join(
            f"{a} {n}\n" for n, a in self.node_addrs.items())
        if not _NETNS_ETC.is_dir():
            _NETNS_ETC.mkdir(parents=True)
            self._made_netns_etc = True
        for node in self.node_names:
            ns, veth = self.netns[node], self._veths[node]
            etc = _NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=False)
            self._created(("etc", str(etc)))
            (etc / "hosts").write_text(hosts_text)
            _ip("netns", "add", ns)
            self._created(("netns", ns))
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            self._created(("link", veth))
            _ip("link", "set", f"{veth}p", "netns", ns)
            _ip("link", "set", veth, "master", self._bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("link", "set", f"{veth}p", "name", "eth0", netns=ns)
            _ip("addr", "add", f"{self.node_addrs[node]}/{net.prefixlen}", "dev", "eth0", netns=ns)
            _ip("link", "set", "eth0", "up", netns=ns)

    def _teardown_network(self) -> None:
        """Remove what :meth:`_setup_network` made, newest first (never raises)."""
        _remove_items(self._net_created)
        self._net_created.clear()
        with contextlib.suppress(OSError):
            (_LEDGER / f"{self._bridge}.json").unlink()
        if self._made_netns_etc:
            with contextlib.suppress(OSError):
                _NETNS_ETC.rmdir()  # only when empty (another user's namespaces keep theirs)
            self._made_netns_etc = False

    def _enter(self, node: str) -> list[str]:
        """Command prefix that runs the rest inside ``node``: its network namespace, a new UTS namespace with
        hostname = node name, and a new mount namespace where the node's hosts file is bind-mounted on
        ``/etc/hosts``.  (``nsenter --net``, not ``ip netns exec``: that one remounts ``/sys`` without its
        cgroup file system, which slurmd needs.)  Every program in the chain execs: a Popen's pid is the
        command's own."""
        hosts = _NETNS_ETC / self.netns[node] / "hosts"
        return [_which("nsenter") or "nsenter", f"--net={_NETNS_RUN / self.netns[node]}",
                _which("unshare") or "unshare", "--uts", "--mount", "sh", "-c",
                f'mount --bind {hosts} /etc/hosts && hostname {node} && exec "$@"', "sh"]

    # ------------------------------------------------------------------ LocalSlurmCluster hooks

    def _prepare_dirs(self) -> None:
        super()._prepare_dirs()
        for node in self.node_names:
            (self._spool_dir / node).mkdir(parents=True, exist_ok=True)
        self._setup_network()

    def _cleanup_external_dirs(self) -> None:
        super()._cleanup_external_dirs()
        self._teardown_network()

    def _write_configs(self) -> None:
        super()._write_configs()
        names = f"node[1-{len(self.node_names)}]" if len(self.node_names) > 1 else self.node_names[0]
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        replace = {
            "SlurmctldHost": f"SlurmctldHost=localhost({self.controller_addr})",
            "SlurmdPidFile": f"SlurmdPidFile={self._run_dir / 'slurmd-%n.pid'}",
            "SlurmdLogFile": f"SlurmdLogFile={self._log_dir / 'slurmd-%n.log'}",
            "SlurmdTimeout": f"SlurmdTimeout={self.slurmd_timeout_s}",
            "KillWait": "KillWait=3",  # requeue / scancel: SIGKILL 3 s after SIGTERM (submitit ignores SIGTERM)
        }
        out = []
        for line in self.slurm_conf.read_text().splitlines():
            key = line.split("=", 1)[0]
            if key in replace:
                out.append(replace[key])
            elif key == "NodeName":
                if self.gpus_per_node:
                    out += ["GresTypes=gpu", "AccountingStorageTRES=gres/gpu"]
                out += [f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory={self.real_memory_mb // len(self.node_names)}"
                        f"{gres} State=UNKNOWN" for n, a in self.node_addrs.items()]
            elif key == "PartitionName":
                out.append(line.replace(f"Nodes={self.node} ", f"Nodes={names} ")
                           .replace("Default=YES", "Default=YES LLN=YES"))
            else:
                out.append(line)
        out.insert(1, "# (multi-node: tests/integration/multinode/netns_cluster.py, one slurmd per network namespace)")
        self.slurm_conf.write_text("\n".join(out) + "\n")
        if self.gpus_per_node:
            self._write_fake_gpus(names, self.gpus_per_node, "multi-node test cluster, the same GPUs on every node")

    def _spawn_slurmd(self, node: str):
        slurmd = _which("slurmd") or "slurmd"
        cmd = [*self._enter(node), slurmd, "-D", "-N", node, "-f", str(self.slurm_conf)]
        daemon = self._spawn(f"slurmd-{node}", cmd, logs=(self._log_dir / f"slurmd-{node}.log",))
        self._slurmds[node] = daemon
        return daemon

    def _start_slurmd(self) -> None:
        daemons = {n: self._spawn_slurmd(n) for n in self.node_names}
        for node, daemon in daemons.items():
            self._wait_until(daemon, f"bring node {node} to state idle",
                             lambda node=node: self.node_state(node).rstrip("*") == "idle")
