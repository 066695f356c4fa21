"""`rift submit` on a real SLURM cluster (loopback, slurmdbd + MariaDB): arrays, failures, preemption, DDP.

Tiny models on real CIFAR-10 images (tests/integration/pipeline_helpers.tiny_config); every test has its
own run directory (its submitit folders are ``<run_dir>/jobs/<job>``).  The jobs run with this
interpreter (submitit uses ``sys.executable``: the project's .venv).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from rift_dist import cluster
from rift_dist.checkpoint_ids import checkpoint_id
from rift_dist.config import load_config
from rift_dist.pipeline import run_pipeline
from tests.integration.pipeline_helpers import ROOT, shared_data, tiny_config

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                       reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)"),
]

PROFILE = ROOT / "launch" / "local_test.yaml"


AT_TRAIN = {"epochs": 1, "milestones": [1], "max_steps_per_epoch": 2, "eval_attack_steps": 1}
"""The tiny adversarial training of the shared AT model (and of every config that reuses it)."""


def _cfg(tmp: Path, **sections):
    sections.setdefault("train", AT_TRAIN)
    return load_config(tiny_config(tmp, **sections))


@pytest.fixture(scope="module")
def at_run(tmp_path_factory) -> Path:
    """A run directory with a tiny adversarially trained model (train stage only), made once per module."""
    tmp = tmp_path_factory.mktemp("at")
    cfg = _cfg(tmp, tracking={"enabled": False})
    run_pipeline(cfg, tmp / "run", ["train"], progress=False, print_table=False)
    return tmp / "run"


def _wait(run_dir: Path, slurm_cluster, timeout_s: float) -> dict:
    try:
        return cluster.wait(run_dir, timeout_s=timeout_s, poll_s=1.0, log=lambda _: None)
    except cluster.ClusterError:
        out = slurm_cluster.run(["squeue", "-a"], check=False).stdout
        acct = slurm_cluster.run(["sacct", "-a", "-X", "-o", "JobID,JobName,State,ExitCode,Elapsed"], check=False).stdout
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(run_dir.glob("jobs/*/*.err")))
        pytest.fail(f"jobs of {run_dir} not done after {timeout_s}s\n{out}\n{acct}\n{logs}", pytrace=False)


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rift")
    return client.search_runs([exp.experiment_id], max_results=500)


def test_mrc_array_failed_task_resubmitted_alone_equals_local(at_run, slurm_cluster, tmp_path):
    """A 4-task MRC array: one task fails (a directory stands where one of its modules' result file goes, so the
    write fails; a merely corrupt piece would be recomputed with a warning), is named by
    `rift status`, re-submitted alone with the gather; the gathered table equals the one-process table,
    and the 4 concurrent tasks' runs are all in the SQLite store under the pipeline's parent run."""
    cfg = _cfg(tmp_path)
    profile = cluster.load_profile(PROFILE, ["stages.mrc.array_size=4"])
    # local reference (one process), which also makes the fixed adversarial set the cluster run reuses
    ref = tmp_path / "ref"
    shutil.copytree(at_run / "train", ref / "train")
    ref_cfg = _cfg(tmp_path, tracking={"enabled": False})
    run_pipeline(ref_cfg, ref, ["mrc"], progress=False, print_table=False)

    run_dir = tmp_path / "run"
    shutil.copytree(at_run / "train", run_dir / "train")
    (run_dir / "mrc").mkdir()
    shutil.copy(ref / "mrc" / "adversarial_set.pt", run_dir / "mrc" / "adversarial_set.pt")
    groups = cluster.plan_jobs(cfg, profile, run_dir, ["mrc"])[0].tasks
    broken = groups[1].names[-1]
    (run_dir / "mrc" / "modules").mkdir()
    (run_dir / "mrc" / "modules" / f"{broken}.json").mkdir()

    t0 = time.time()
    record = cluster.submit(cfg, profile, run_dir, stages=["mrc"], log=lambda _: None)
    jobs = record["submissions"][-1]["jobs"]
    assert [j["name"] for j in jobs] == ["mrc", "mrc-gather"]  # the adversarial set exists: no prepare job
    assert [t["names"] for t in jobs[0]["tasks"]] == [t.names for t in groups]
    assert jobs[1]["dependency"] == f"afterok:{jobs[0]['job_id']}"
    _wait(run_dir, slurm_cluster, 240)
    lines: list[str] = []
    st = cluster.status(run_dir, log=lines.append)
    text = "\n".join(lines)
    assert st["failed"] == [f"mrc:{groups[1].label}"], text
    assert f"--only mrc:{groups[1].names[0]}" in text and broken in text, text
    gather_id = jobs[1]["tasks"][0]["job_id"]
    assert st["states"][gather_id].startswith("CANCELLED"), text  # kill-on-invalid-dep

    (run_dir / "mrc" / "modules" / f"{broken}.json").rmdir()
    again = cluster.plan_jobs(cfg, profile, run_dir, ["mrc"])
    assert [(j.name, [t.index for t in j.tasks]) for j in again] == [("mrc", [1]), ("mrc-gather", [0])]
    cluster.submit(cfg, profile, run_dir, stages=["mrc"], log=lambda _: None)
    _wait(run_dir, slurm_cluster, 180)
    seconds = time.time() - t0
    assert cluster.status(run_dir, log=lambda _: None)["failed"] == []
    assert (run_dir / "mrc.csv").read_text() == (ref / "mrc.csv").read_text()
    info = json.loads((run_dir / "mrc" / "mrc.json").read_text())
    assert info["array_assignment"] == [t.names for t in groups]

    runs = _runs(cluster.read_submission(run_dir)["tracking"]["uri"])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    mrc_run = next(r for r in runs if r.info.run_name == "mrc")
    assert mrc_run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    tasks = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == mrc_run.info.run_id
                    and r.info.run_name.startswith("mrc-task-")), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in tasks] == [f"mrc-task-{i}" for i in range(4)]
    assert all(r.info.status == "FINISHED" for r in tasks), [r.info.status for r in tasks]
    for r, g in zip(tasks, groups):
        assert {f"mrc.{m}" for m in g.names} <= set(r.data.metrics), r.info.run_name
    assert len([k for k in mrc_run.data.metrics if k.startswith("mrc.")]) == 21
    print(f"\nMRC array on SLURM: 4 tasks, 1 failed and re-submitted alone, gathered in {seconds:.0f}s")


def _first_checkpoint(run_dir: Path, at_least: int, timeout_s: float, slurm_cluster) -> int:
    """Wait until train/checkpoints holds a checkpoint numbered >= at_least (epoch * 1e6 + step)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = [int(p.stem.split("-")[1]) for p in (run_dir / "train" / "checkpoints").glob("ckpt-*.pt")]
        if found and max(found) >= at_least:
            return max(found)
        if (run_dir / "train" / "done.json").is_file():
            pytest.fail("training finished before it could be interrupted", pytrace=False)
        time.sleep(0.2)
    logs = "\n".join(p.read_text()[-2000:] for p in run_dir.glob("jobs/*/*.err"))
    pytest.fail(f"no checkpoint >= {at_least} after {timeout_s}s\n{logs}", pytrace=False)


def _train_cfg(tmp: Path, **extra):
    return _cfg(tmp, train={"epochs": 8, "milestones": [6], "checkpoint_every": 1, "attack": {"num_steps": 6},
                            "eval_attack_steps": 1}, tracking={"enabled": False}, **extra)


def _same_state(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _interruption(slurm_cluster, tmp_path, interrupt, profile_set=()) -> tuple[list[dict], Path]:
    cfg = _train_cfg(tmp_path)
    ref = tmp_path / "ref"
    run_pipeline(_train_cfg(tmp_path), ref, ["train"], progress=False, print_table=False)
    run_dir = tmp_path / "run"
    profile = cluster.load_profile(PROFILE, list(profile_set))
    record = cluster.submit(cfg, profile, run_dir, stages=["train"], log=lambda _: None)
    job_id = record["submissions"][-1]["jobs"][0]["job_id"]
    step_before = _first_checkpoint(run_dir, 2, 180, slurm_cluster)
    interrupt(job_id)
    _wait(run_dir, slurm_cluster, 240)
    events = [e for e in cluster.read_events(run_dir) if e["job"] == "train"]
    assert (run_dir / "train" / "done.json").is_file(), events
    _same_state(run_dir / "train" / "model.pt", ref / "train" / "model.pt")
    starts = [e for e in events if e["event"] == "start"]
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert len(starts) >= 2 and checkpoints, events
    assert starts[0]["progress"] == {"epoch": 0, "step": 0}
    resumed = starts[-1]["progress"]
    assert checkpoint_id(resumed["epoch"], resumed["step"]) >= step_before > 0, (step_before, events)
    # history: validation numbers of every epoch equal; the training-loss average of an epoch resumed mid-way
    # covers only its steps after the resume (the AT checkpoint does not carry partial-epoch sums)
    partial = {s["progress"]["epoch"] + 1 for s in starts[1:] if s["progress"]["step"] > 0}
    got = json.loads((run_dir / "train" / "history.json").read_text())
    want = json.loads((ref / "train" / "history.json").read_text())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        keys = [k for k in w if k != "epoch_seconds" and not (w["epoch"] in partial and k.startswith("train_"))]
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, (g, w)
    lines: list[str] = []
    cluster.status(run_dir, log=lines.append)
    assert "COMPLETED, requeued 1x" in "\n".join(lines), lines
    print(f"\ncheckpoint on disk when interrupted: {checkpoints[0]['progress']}; resumed at {resumed} "
          f"(restart count {starts[-1]['restart_count']}); result equal to the uninterrupted run")
    return events, run_dir


@pytest.mark.slow
def test_preempted_training_checkpoints_requeues_and_matches_uninterrupted(slurm_cluster, tmp_path):
    """AT in the preemptable `debug` partition, preempted by a `high` job that needs every CPU: USR2 ->
    StageJob.checkpoint (rank 0) -> requeue -> resume from the newest checkpoint (a later step than 0)
    -> the same weights and history as an uninterrupted run."""
    import submitit

    from tests.harness import slurm_jobs

    def preempt(job_id):
        ex = submitit.AutoExecutor(folder=tmp_path / "high", cluster="slurm")
        root = Path(slurm_jobs.__file__).resolve().parents[2]  # tests.harness is not installed: the job needs the repo
        ex.update_parameters(slurm_partition="high", timeout_min=5, cpus_per_task=slurm_cluster.cpus,
                             slurm_setup=[f'export PYTHONPATH="{root}${{PYTHONPATH:+:$PYTHONPATH}}"'])
        high = ex.submit(slurm_jobs.hold_cpus, 1.0)
        assert high.result() == slurm_cluster.cpus

    events, run_dir = _interruption(slurm_cluster, tmp_path, preempt)
    assert "this job is preempted" in "".join(p.read_text() for p in run_dir.glob("jobs/train/*.err"))


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_matches_uninterrupted(slurm_cluster, tmp_path):
    """The time-limit warning (USR2 on a job with a short limit) counts as a time-out: requeued, resumed, same result."""
    def warn(job_id):
        # SLURM checks limits only every ~30 s: deliver its warning signal ourselves; with a 3-minute limit
        # submitit counts a USR2 as a time-out (one of max_requeues)
        slurm_cluster.run(["scancel", "--signal=USR2", job_id])

    events, run_dir = _interruption(slurm_cluster, tmp_path, warn, ["stages.train.time_min=3"])
    err = "".join(p.read_text() for p in run_dir.glob("jobs/train/*.err"))
    assert "this job is timed-out" in err


DDP_SECTIONS = {  # deterministic parity settings (as tests/integration/test_distributed_ddp.py): fp32 NCHW, SyncBN
    "data": {"loader": "torch", "val_size": 50},
    "train": {"epochs": 1, "max_steps_per_epoch": 2, "lr": 0.01, "milestones": [10], "attack": {"num_steps": 2},
              "eval_attack_steps": 1},
    "precision": {"threads": 1, "autocast": "none", "channels_last": "off"},
    "distributed": {"sync_bn": True, "timeout_s": 60},
    "tracking": {"enabled": False},
}


def test_two_task_job_trains_with_ddp_over_gloo_like_one_task(slurm_cluster, tmp_path):
    """A 2-task SLURM job (srun; SLURM_PROCID / SLURM_NTASKS, MASTER_PORT from the job id) trains with DDP over
    gloo and SyncBatchNorm; weights and loss equal a one-process run's up to float summation order (PGD's
    sign steps amplify it to ~1e-4 after 2 steps: see test_distributed_ddp.py)."""
    ref = tmp_path / "ref"
    run_pipeline(_cfg(tmp_path, **DDP_SECTIONS), ref, ["train"], progress=False, print_table=False)
    run_dir = tmp_path / "run"
    profile = cluster.load_profile(PROFILE, ["stages.train.tasks_per_node=2"])
    cluster.submit(_cfg(tmp_path, **DDP_SECTIONS), profile, run_dir, stages=["train"], log=lambda _: None)
    _wait(run_dir, slurm_cluster, 240)
    start = next(e for e in cluster.read_events(run_dir) if e["event"] == "start")
    assert start["world_size"] == 2
    out = "".join(p.read_text() for p in run_dir.glob("jobs/train/*_log.out"))
    assert "starts: 2 rank(s)" in out and out.count("[train] epoch 1/1") == 1, out[-3000:]  # rank 0 prints
    a = torch.load(run_dir / "train" / "model.pt", weights_only=True)
    b = torch.load(ref / "train" / "model.pt", weights_only=True)
    diff = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    h1 = json.loads((run_dir / "train" / "history.json").read_text())[0]
    h0 = json.loads((ref / "train" / "history.json").read_text())[0]
    print(f"\n2-task SLURM job vs one process after 2 AT steps: max|dW| {diff:.2e}, "
          f"loss {h1['train_loss']:.7f} vs {h0['train_loss']:.7f}")
    assert diff < 2e-3
    assert abs(h1["train_loss"] - h0["train_loss"]) <= 1e-4 * abs(h0["train_loss"])


def test_pending_jobs_block_resubmission_and_are_cancelled(slurm_cluster, tmp_path):
    """While jobs of a run are queued, `rift submit RUN` refuses; `rift cancel RUN` cancels every one of them
    (the array too) and marks the MLflow parent run KILLED."""
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    profile = cluster.load_profile(PROFILE, ["sbatch.begin=now+3600", "stages.mrc.array_size=0"])  # stay pending: nothing runs
    record = cluster.submit(cfg, profile, run_dir, stages=["train", "mrc"], log=lambda _: None)
    ids = [t["job_id"] for j in record["submissions"][-1]["jobs"] for t in j["tasks"]]
    assert len(ids) == 1 + 1 + 21 + 1  # train, prepare, one MRC task per module (array_size 0), gather
    with pytest.raises(cluster.ClusterError, match="still queued or running"):
        cluster.submit(_cfg(tmp_path), profile, run_dir, stages=["train", "mrc"], log=lambda _: None)
    cancelled = cluster.cancel(run_dir, log=lambda _: None)
    assert set(cancelled) == set(ids)
    deadline = time.time() + 60
    while time.time() < deadline:
        states = cluster.job_states(cluster.read_submission(run_dir))
        if all(s.startswith("CANCELLED") for s in states.values()):
            break
        time.sleep(1)
    assert all(s.startswith("CANCELLED") for s in states.values()), states
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=record["tracking"]["uri"])
    assert client.get_run(record["tracking"]["parent_run_id"]).info.status == "KILLED"
