"""The MRC stage as a SLURM array over 1, 2 and 3 nodes of the multi-node test cluster (issue 14).

Starts tests/integration/multinode/netns_cluster.NetnsSlurmCluster (controller + 3 nodes, each slurmd in its
own network namespace, ONE CPU slot per node so a node runs one task at a time), trains a ResNet-18 for one
step, runs ``rift mrc`` on it in one process (the baseline, which also makes the fixed adversarial set of
``--examples`` real CIFAR-10 images that every array reuses; config of benchmarks/bench_mrc_ranks.py),
then for N = 1, 2, 3 submits ``rift submit --stages mrc`` with ``array_size = N`` and the other nodes excluded
(one task per node, one thread per task), waits, and reads the jobs' events (``jobs/events.jsonl``) and sacct:

* wall: first MRC task's start (rift's "start" event) to the gather's end;
* load imbalance: max(task compute) / mean(task compute), compute = a task's "start" to "end" event;
* queueing overhead per task: sacct Eligible -> Start (SLURM scheduling) and Start -> rift "start" (process
  start, imports, data and model loading), averaged over the tasks;
* speed-up = wall(1 node) / wall(N nodes), efficiency = speed-up / N, and whether every table is identical
  to the one-process ``rift mrc`` table (also timed, as the baseline without SLURM).

What this machine can show: the scheduling and launch overheads and the load balance are real (real
slurmctld, real slurmd per node, real array tasks).  What it cannot: the nodes share this machine's cores
(2 here, and other work may use them), so N nodes cannot run faster than the free cores allow; an efficiency
above ~2/N here says nothing about real nodes and below it mostly measures core contention.  The load average
is printed before and after.  ``--width`` defaults to 64 (full width, as the paper's ResNet-18) with only
``--examples 64`` images and 2 ascent passes, so one MRC search takes about a minute on one core; ``--width 16``
is ~16x cheaper (then the fixed overheads dominate: the ratios show that too).

Usage:  .venv/bin/python benchmarks/bench_multinode_mrc.py [--width 64] [--examples 64] [--iterations 2]
        [--nodes 1,2,3] [--data-dir D] [--keep]
Needs root, the SLURM packages (scripts/slurm/install.sh) and network namespaces; exits 0 with a note when
those or the data are missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _make_base(cfg_path: Path, base: Path) -> None:
    """Add a one-step adversarial training to the config and run it into ``base`` (the MRC search costs the same
    whatever the weights; the train stage's done marker is what ``rift submit --stages mrc`` needs)."""
    import yaml

    from rift_dist.config import load_config
    from rift_dist.pipeline import run_pipeline

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"] = {"epochs": 1, "milestones": [1], "max_steps_per_epoch": 1, "attack": {"num_steps": 1},
                    "eval_attack_steps": 1}
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_pipeline(load_config(str(cfg_path)), base, ["train"], progress=False, print_table=False)


def _sacct(mn, job_id: str) -> dict[str, dict]:
    """{array task id: {eligible, start, end (epoch seconds), nodes}} of an array job (sacct -X)."""
    out = mn.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,Eligible,Start,End,NodeList"]).stdout
    rows = {}
    for line in out.strip().splitlines():
        jid, *times, nodes = line.split("|")
        stamp = [datetime.fromisoformat(t).timestamp() if t[:1].isdigit() else float("nan") for t in times]
        rows[jid.split("_")[-1]] = {"eligible": stamp[0], "start": stamp[1], "end": stamp[2], "nodes": nodes}
    return rows


def _measure(mn, cfg_path: Path, base: Path, run_dir: Path, n: int) -> dict:
    """Submit the MRC stage of ``base``'s model as an array of ``n`` tasks on nodes 1..n; wait; collect times."""
    from rift_dist import cluster
    from rift_dist.config import load_config

    (run_dir / "mrc").mkdir(parents=True)
    shutil.copytree(base / "train", run_dir / "train")
    shutil.copy(base / "mrc" / "adversarial_set.pt", run_dir / "mrc" / "adversarial_set.pt")
    excluded = ",".join(mn.node_names[n:])
    sets = [f"stages.mrc.array_size={n}", "cpus_per_task=1", "array_parallelism=8"] + (
        [f"stages.mrc.exclude={excluded}"] if excluded else [])
    profile = cluster.load_profile(ROOT / "launch" / "local_test.yaml", sets)
    t_submit = time.time()
    record = cluster.submit(load_config(str(cfg_path)), profile, run_dir, stages=["mrc"], log=lambda _: None)
    states = cluster.wait(run_dir, timeout_s=3600, poll_s=1.0, log=lambda _: None)
    if set(states.values()) != {"COMPLETED"}:
        raise SystemExit(f"N={n}: jobs ended {states}; see {run_dir}/jobs")
    jobs = {j["name"]: j for j in record["submissions"][-1]["jobs"]}
    events = cluster.read_events(run_dir)
    starts = {e["task"]: e["time"] for e in events if e["job"] == "mrc" and e["event"] == "start"}
    ends = {e["task"]: e["time"] for e in events if e["job"] == "mrc" and e["event"] == "end"}
    gather_end = max(e["time"] for e in events if e["job"] == "mrc-gather" and e["event"] == "end")
    acct = _sacct(mn, jobs["mrc"]["job_id"])
    compute = [ends[t] - starts[t] for t in sorted(starts)]
    sched = [a["start"] - a["eligible"] for a in acct.values()]
    if len(acct) == 1 and len(starts) == 1:  # one task: submitted as a plain job, not an array
        acct = {"0": next(iter(acct.values()))}
    launch = [starts[int(t)] - a["start"] for t, a in acct.items() if t.isdigit() and int(t) in starts]
    return {"n": n, "wall": gather_end - min(starts.values()), "submit_to_gather": gather_end - t_submit,
            "span": max(ends.values()) - min(starts.values()), "gather": gather_end - max(ends.values()),
            "compute": compute, "imbalance": max(compute) / (sum(compute) / len(compute)),
            "sched": sum(sched) / len(sched), "launch": sum(launch) / max(len(launch), 1),
            "nodes": sorted({a["nodes"] for a in acct.values()}), "table": (run_dir / "mrc.csv").read_text(),
            "modules": [len(t["names"]) for t in jobs["mrc"]["tasks"]]}


def main() -> int:
    """Run the benchmark; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--nodes", default="1,2,3", help="node counts to measure (at most 3)")
    p.add_argument("--data-dir", default=os.environ.get("RIFT_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--work-dir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory (and the cluster's logs)")
    args = p.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    counts = [int(x) for x in args.nodes.split(",")]
    if not counts or any(not 1 <= c <= 3 for c in counts):
        raise SystemExit(f"--nodes takes counts between 1 and 3, got {args.nodes!r}")
    archive = Path(args.data_dir) / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        print(f"bench_multinode_mrc: {archive} not found; nothing measured")
        return 0
    from tests.harness.slurm_cluster import missing_binaries
    from tests.integration.multinode.netns_cluster import (
        NetnsSlurmCluster,
        namespaces_unavailable,
    )

    missing = missing_binaries()
    why = f"missing {', '.join(missing)}" if missing else namespaces_unavailable()
    if why:
        print(f"bench_multinode_mrc: no multi-node cluster on this machine ({why}); nothing measured")
        return 0
    from bench_mrc_ranks import _config, _run

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_multinode_mrc_"))
    work.mkdir(parents=True, exist_ok=True)
    mn = NetnsSlurmCluster(work / "slurm", nodes=3, cpus_per_node=1, gpus_per_node=0)
    try:
        cfg_path = _config(work / "bench.yaml", archive, ROOT / ".cache" / "test-data", args)
        base, local = work / "base", work / "local"
        load0 = os.getloadavg()
        print(f"MRC stage as a SLURM array, ResNet-18 width {args.width} (the paper's is 64), "
              f"{args.examples} fixed adversarial CIFAR-10 images, {args.iterations} ascent passes per module, "
              f"1 thread per task, 1 task per node; {os.cpu_count()} cores, load average {load0[0]:.2f}")
        _make_base(cfg_path, base)
        shutil.copytree(base, local)
        one = _run(cfg_path, local, 1)  # rift mrc in one process; makes the fixed adversarial set every run reuses
        (base / "mrc").mkdir()
        shutil.copy(local / "mrc" / "adversarial_set.pt", base / "mrc" / "adversarial_set.pt")
        print(f"  one process, no SLURM: MRC stage {one['stage_s']:.1f}s (process {one['process_s']:.1f}s)")
        mn.start()
        for key, value in mn.env.items():
            os.environ[key] = value
        print(f"  cluster: 3 nodes in network namespaces, started in {mn.startup_seconds:.1f}s")
        results = [_measure(mn, cfg_path, base, work / f"n{n}", n) for n in counts]
        load1 = os.getloadavg()
        ref = next((r for r in results if r["n"] == 1), None)
        print(f"  {'nodes':>5} {'wall s':>7} {'speed-up':>8} {'effic.':>6} {'array s':>7} {'speed-up':>8} "
              f"{'gather s':>8} {'imbal.':>6} {'contention':>10} {'sched s':>7} {'launch s':>8}  modules/task  nodes used")
        for r in results:
            speed = ref["wall"] / r["wall"] if ref else float("nan")
            aspeed = ref["span"] / r["span"] if ref else float("nan")
            contention = sum(r["compute"]) / sum(ref["compute"]) if ref else float("nan")
            print(f"  {r['n']:>5} {r['wall']:>7.1f} {speed:>8.2f} {speed / r['n']:>6.2f} {r['span']:>7.1f} "
                  f"{aspeed:>8.2f} {r['gather']:>8.1f} {r['imbalance']:>6.2f} {contention:>10.2f} {r['sched']:>7.1f} {r['launch']:>8.1f}  "
                  f"{r['modules']}  {r['nodes']}")
        print("  wall = first MRC task start -> gather end (speed-up and efficiency = speed-up / nodes from it); "
              "array = first task start -> last task end; gather = last task end -> gather end (a dependent job: "
              "scheduling + launch + gather); imbal. = max/mean task compute (start -> end event); contention = sum of the tasks' compute / the 1-node task's (1.0 = the tasks had a core each; N = they shared one); sched = sacct "
              "Eligible -> Start (1 s resolution); launch = Start -> rift task start (python, imports, data, model)")
        same = all(r["table"] == one["table"] for r in results)
        print(f"  every table identical to the one-process table: {same}; load average after {load1[0]:.2f}")
        print(f"  this machine has {os.cpu_count()} cores for all nodes: N > {os.cpu_count()} cannot be faster, and "
              f"other work on the cores lowers every ratio; overheads and balance carry over to real nodes, the "
              f"efficiency does not")
        return 0 if same else 1
    finally:
        mn.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
