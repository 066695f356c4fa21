"""The transactional ``rift submit`` without a cluster: cluster limits parsed from fake ``scontrol`` text,
refusals before the first sbatch, arrays split to fit MaxArraySize, the undo of a submit whose sbatch
fails half-way, and rendezvous ports that do not collide (issue 13)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from rift_dist import cluster
from rift_dist.cluster import job as cluster_job
from rift_dist.cluster import plan as cluster_plan
from rift_dist.cluster import submission as cluster_submission
from rift_dist.config import load_config
from rift_dist.parallel.runtime import read_launch_env

ROOT_DIR = Path(__file__).resolve().parents[2]

SCONTROL_CONFIG = """Configuration data as of 2026-12-02T07:00:00
AccountingStorageType   = accounting_storage/slurmdbd
MaxArraySize            = 16
MaxJobCount             = 40
MinJobAge               = 300 sec
SLURM_VERSION           = 22.05.8
"""
SCONTROL_PARTITIONS = (
    "PartitionName=debug AllowGroups=ALL Default=YES MaxNodes=UNLIMITED Nodes=localhost State=UP\n"
    "PartitionName=big AllowGroups=ALL Default=NO MaxNodes=1 Nodes=localhost State=UP\n"
    "PartitionName=old AllowGroups=ALL Default=NO MaxNodes=UNLIMITED Nodes=localhost State=DOWN\n")


def fake_runner(config=SCONTROL_CONFIG, partitions=SCONTROL_PARTITIONS, qos="normal\nhigh\n"):
    def run(argv):
        if argv[:3] == ["scontrol", "show", "config"]:
            return 0, config, ""
        if argv[:3] == ["scontrol", "show", "partition"]:
            return 0, partitions, ""
        if argv[0] == "sacctmgr":
            return 0, qos, ""
        raise AssertionError(argv)
    return run


def wrn(*overrides):
    """WRN-34 (width 4: the planner only counts modules; 35 MRC modules as WRN-34-10)."""
    return load_config(None, ["model.arch=wrn34_10", "model.width=4", "tracking.enabled=false", *overrides])


@pytest.fixture(scope="module")
def wrn_cfg():
    return wrn()


def test_scontrol_config_and_partitions_are_parsed():
    conf = cluster_plan.parse_scontrol_config(SCONTROL_CONFIG)
    assert conf["MaxArraySize"] == "16" and conf["MinJobAge"] == "300 sec"
    limits = cluster.query_cluster_limits(fake_runner())
    assert (limits.max_array_size, limits.max_job_count, limits.default_partition) == (16, 40, "debug")
    assert limits.partitions["big"]["max_nodes"] == 1 and limits.partitions["old"]["state"] == "DOWN"
    assert limits.qos == ["high", "normal"] and limits.notes == []


def test_no_scontrol_is_skipped_with_a_note():
    def missing(argv):
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    limits = cluster.query_cluster_limits(missing)
    assert limits.max_array_size is None and limits.partitions is None and limits.qos is None
    assert len(limits.notes) == 1 and "no scontrol on this machine" in limits.notes[0] and "not checked" in limits.notes[0]


def test_35_module_mrc_array_is_split_into_three_with_the_graph_kept(wrn_cfg, tmp_path):
    profile = cluster.load_profile(None)
    jobs = cluster.plan_jobs(wrn_cfg, profile, tmp_path, ["train", "mrc"])
    assert [j.name for j in jobs] == ["train", "mrc-prepare", "mrc", "mrc-gather"]
    assert len(jobs[2].tasks) == 35
    split = cluster.split_arrays(jobs, 16)
    names = [j.name for j in split]
    assert names == ["train", "mrc-prepare", "mrc-part1", "mrc-part2", "mrc-part3", "mrc-gather"]
    parts = split[2:5]
    assert [len(j.tasks) for j in parts] == [16, 16, 3]
    assert all(j.family == "mrc" and j.array and j.depends_on == ["mrc-prepare"] for j in parts)
    assert split[-1].depends_on == ["mrc-part1", "mrc-part2", "mrc-part3"]  # the gather waits for all parts
    assert split[1].depends_on == ["train"]
    # every module exactly once, in order, with the task indices (= MLflow runs) of the unsplit plan
    assert [t.index for j in parts for t in j.tasks] == list(range(35))
    assert cluster.check_plan(split, cluster.ClusterLimits(max_array_size=16), profile) == []
    unsplit = cluster.check_plan(jobs, cluster.ClusterLimits(max_array_size=16), profile)
    assert len(unsplit) == 1 and "35 tasks" in unsplit[0] and "MaxArraySize is 16" in unsplit[0]


def test_split_keeps_small_arrays_and_chains_plain_jobs(tmp_path):
    cfg = load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]"])
    jobs = cluster.plan_jobs(cfg, cluster.load_profile(None), tmp_path)
    before = [(j.name, list(j.depends_on)) for j in jobs]
    after = cluster.split_arrays(jobs, 10_000)
    assert [(j.name, j.depends_on) for j in after] == before


@pytest.mark.parametrize("k", [100, 36, 0])
def test_candidates_outside_one_to_the_module_count_are_refused(wrn_cfg, tmp_path, k):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"executor": "local", "stages": {"finetune": {"candidates": k}}}))
    with pytest.raises(cluster.ClusterError) as err:
        profile = cluster.load_profile(path)
        cluster.plan_jobs(wrn_cfg, profile, tmp_path / "run")
    text = str(err.value)
    assert "candidates" in text and str(path) in text
    if k:
        assert "35 MRC module(s)" in text and "between 1 and 35" in text


def test_candidates_count_modules_after_exclude(tmp_path):
    cfg = wrn("mrc.exclude=[first,last]")
    profile = cluster.load_profile(None, ["stages.finetune.candidates=34"])
    with pytest.raises(cluster.ClusterError, match="33 after mrc.exclude"):
        cluster.plan_jobs(cfg, profile, tmp_path)
    profile = cluster.load_profile(None, ["stages.finetune.candidates=33"])
    jobs = cluster.plan_jobs(cfg, profile, tmp_path)
    assert len(next(j for j in jobs if j.name == "finetune").tasks) == 33


@pytest.mark.parametrize("data, where", [
    ({"sbatch": {"array": "0-15%4"}}, "sbatch.array"),
    ({"sbatch": {"--dependency": "afterok:1"}}, "sbatch.--dependency"),
    ({"sbatch": {"d": "singleton"}}, "sbatch.d"),
    ({"stages": {"train": {"sbatch": {"job_name": "x"}}}}, "stages.train.sbatch.job_name"),
    ({"stages": {"mrc": {"sbatch": {"time": 10}}}}, "stages.mrc.sbatch.time"),
])
def test_profile_sbatch_keys_the_planner_owns_are_refused(tmp_path, data, where):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(cluster.ClusterError) as err:
        cluster.load_profile(path)
    text = str(err.value)
    assert where in text and str(path) in text and "remove" in text
    assert "rift submit sets itself" in text


def test_other_sbatch_keys_still_pass(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"sbatch": {"mail-type": "FAIL", "reservation": "rift"}}))
    assert cluster.load_profile(path).resources("train").sbatch == {"mail-type": "FAIL", "reservation": "rift"}


def test_check_plan_names_partition_qos_nodes_and_job_count(tmp_path):
    cfg = load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]"])
    limits = cluster.query_cluster_limits(fake_runner())
    ok = cluster.load_profile(None)
    jobs = cluster.split_arrays(cluster.plan_jobs(cfg, ok, tmp_path), limits.max_array_size)
    assert cluster.check_plan(jobs, limits, ok) == []
    for overrides, needle in [(["partition=nope"], "partition 'nope' does not exist"),
                              (["partition=old"], "partition 'old' is DOWN"),
                              (["partition=big", "nodes=2"], "asks for 2 nodes, partition 'big' allows 1"),
                              (["qos=gold"], "QOS 'gold' does not exist")]:
        bad = cluster.load_profile(None, overrides)
        planned = cluster.split_arrays(cluster.plan_jobs(cfg, bad, tmp_path), limits.max_array_size)
        problems = cluster.check_plan(planned, limits, bad)
        assert problems and needle in problems[0], (overrides, problems)
    small = cluster.ClusterLimits(max_job_count=5)
    problems = cluster.check_plan(jobs, small, ok)
    assert len(problems) == 1 and "MaxJobCount is 5" in problems[0]


# ------------------------------------------------------------------------------------ a submit that fails


class FakeJob:
    def __init__(self, job_id):
        self.job_id = job_id


class FakeExecutor:
    """Stands in for submitit's SlurmExecutor: queues jobs until ``fail_at``, then raises like sbatch."""

    def __init__(self, log, fail_at):
        self.log, self.fail_at = log, fail_at

    def _next(self):
        if len(self.log) == self.fail_at:
            raise RuntimeError("Could not submit job\nsbatch: error: invalid partition specified: nope")
        self.log.append(str(1000 + len(self.log)))
        return self.log[-1]

    def submit(self, fn, spec):
        return FakeJob(self._next())

    def map_array(self, fn, specs):
        base = self._next()
        return [FakeJob(f"{base}_{i}") for i in range(len(specs))]


def test_failed_sbatch_cancels_what_was_queued_and_writes_nothing(tmp_path, monkeypatch, capsys):
    cfg = load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]", "tracking.enabled=false",
                             f"data.root={tmp_path}"])
    run_dir = tmp_path / "run"
    queued: list[str] = []
    cancelled: list[list[str]] = []
    monkeypatch.setattr(cluster_submission, "query_cluster_limits", lambda runner=None: cluster.ClusterLimits())
    monkeypatch.setattr(cluster_submission, "_executor", lambda kind, folder, *a: (folder.mkdir(parents=True, exist_ok=True),
                                                                         FakeExecutor(queued, 3))[1])
    monkeypatch.setattr(cluster_submission, "_scancel", lambda ids: (cancelled.append(list(ids)), (list(ids), ""))[1])
    with pytest.raises(cluster.ClusterError) as err:
        cluster.submit(cfg, cluster.load_profile(None), run_dir, executor="slurm")
    text = str(err.value)
    assert queued == ["1000", "1001", "1002"] and cancelled == [["1000", "1001", "1002"]]
    assert "sbatch refused job mrc-gather" in text and "invalid partition specified: nope" in text
    assert "train 1000, mrc-prepare 1001, mrc 1002" in text and "cancelled: 1000, 1001, 1002" in text
    assert "run the same command again" in text and "Traceback" not in text
    assert not run_dir.exists()  # a fresh run directory: nothing of the submission is left

    # a run directory that existed: its files stay as they were (config.yaml restored, no submission.json)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("old: 1\n")
    (run_dir / "notes.txt").write_text("mine")
    queued.clear()
    with pytest.raises(cluster.ClusterError):
        cluster.submit(cfg, cluster.load_profile(None), run_dir, executor="slurm")
    assert sorted(p.name for p in run_dir.rglob("*")) == ["config.yaml", "notes.txt"]
    assert (run_dir / "config.yaml").read_text() == "old: 1\n"


def test_refused_plan_queues_and_writes_nothing(tmp_path, monkeypatch):
    cfg = load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]", "tracking.enabled=false",
                             f"data.root={tmp_path}"])
    real = cluster.query_cluster_limits
    monkeypatch.setattr(cluster_submission, "query_cluster_limits", lambda runner=None: real(fake_runner()))
    monkeypatch.setattr(cluster_submission, "_executor", lambda *a: pytest.fail("sbatch must not run"))
    with pytest.raises(cluster.ClusterError, match="nothing was submitted or written:\n  job train: partition 'nope'"):
        cluster.submit(cfg, cluster.load_profile(None, ["partition=nope"]), tmp_path / "run", executor="slurm")
    assert not (tmp_path / "run").exists()


def test_dry_run_splits_without_slurm(tmp_path, monkeypatch, wrn_cfg):
    monkeypatch.setattr(cluster_submission, "query_cluster_limits",
                        lambda runner=None: cluster.ClusterLimits(max_array_size=16))
    lines: list[str] = []
    out = cluster.submit(wrn_cfg, cluster.load_profile(None), tmp_path / "run", executor="slurm",
                         stages=["train", "mrc"], dry_run=True, log=lines.append)
    assert [j["name"] for j in out["jobs"]][2:5] == ["mrc-part1", "mrc-part2", "mrc-part3"]
    assert any("are split" in x for x in lines) and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ rift submit checks what rift run checks


def _tiny(tmp_path, *overrides):
    return load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]", "tracking.enabled=false",
                              f"data.root={tmp_path}", *overrides])


def _no_sbatch(monkeypatch):
    monkeypatch.setattr(cluster_submission, "query_cluster_limits", lambda runner=None: cluster.ClusterLimits())
    monkeypatch.setattr(cluster_submission, "_executor", lambda *a, **k: pytest.fail("no job may be queued"))


@pytest.mark.parametrize("override, message", [
    ("eval.corruption_protocol=bogus", "'eval.corruption_protocol' is 'bogus'; choose one of"),
    ("eval.autoattack_attacks=[apgd-dlr]", "'eval.autoattack_attacks' has unknown attack(s) ['apgd-dlr']"),
    ("finetune.modules=[layer9.conv1]", "finetune.modules: no module named 'layer9.conv1' in resnet18"),
    ("mrc.modules=[nope]", "mrc.modules: no module named 'nope'"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_submit_refuses_what_rift_run_refuses_before_any_job(tmp_path, monkeypatch, override, message, dry_run):
    from rift_dist.config import ConfigError

    _no_sbatch(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        cluster.submit(_tiny(tmp_path, override), cluster.load_profile(None), run_dir, executor="slurm",
                       dry_run=dry_run, log=lambda _: None)
    assert message in str(err.value)
    assert not run_dir.exists()
    # rift run refuses the same config with the same message, before anything is written (it used to train,
    # search, fine-tune and sweep, and fail on eval.corruption_protocol in the evaluation stage)
    from rift_dist.pipeline import run_pipeline

    with pytest.raises(ConfigError) as run_err:
        run_pipeline(_tiny(tmp_path, override), run_dir, progress=False)
    assert str(run_err.value) == str(err.value) and not run_dir.exists()


def test_cli_submit_dry_run_and_submit_refuse_a_bad_corruption_protocol(tmp_path, monkeypatch, capsys):
    from rift_dist.cli import main

    _no_sbatch(monkeypatch)
    run_dir = tmp_path / "run"
    base = ["submit", str(ROOT_DIR / "configs" / "default.yaml"), "--profile", str(ROOT_DIR / "launch" /
            "example_cluster.yaml"), "--run-dir", str(run_dir), "--set", "eval.corruption_protocol=bogus",
            "--set", "tracking.enabled=false"]
    for extra in (["--dry-run"], []):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert "config error: 'eval.corruption_protocol' is 'bogus'" in err and "Traceback" not in err
        assert not run_dir.exists()


def test_submit_checks_ffcv_against_the_largest_job(tmp_path, monkeypatch):
    from rift_dist.config import ConfigError
    from rift_dist.data.ffcv import loader as ffcv_loader

    _no_sbatch(monkeypatch)
    cfg = _tiny(tmp_path, "data.order=quasi_random")
    two_ranks = cluster.load_profile(None, ["stages.train.tasks_per_node=2"])
    assert cluster_submission.max_ranks(two_ranks) == 2 and cluster_submission.max_ranks(two_ranks, "debug") == 1
    with pytest.raises(ConfigError, match="quasi_random with 2 processes"):
        cluster.submit(cfg, two_ranks, tmp_path / "run", executor="slurm", dry_run=True, log=lambda _: None)
    monkeypatch.setattr(ffcv_loader, "ffcv_available", lambda: (False, "ffcv is not installed (test)"))
    with pytest.raises(ConfigError, match="'data.loader' is ffcv but ffcv is not installed"):
        cluster.submit(_tiny(tmp_path, "data.loader=ffcv"), cluster.load_profile(None), tmp_path / "run",
                       executor="slurm", dry_run=True, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_missing_inputs_warn_in_a_dry_run_and_refuse_a_submit(tmp_path, monkeypatch):
    from rift_dist.preflight import PreflightError

    _no_sbatch(monkeypatch)
    cfg = _tiny(tmp_path, f"data.corruption_root={tmp_path / 'no-CIFAR-10-C'}")
    lines: list[str] = []
    out = cluster.submit(cfg, cluster.load_profile(None), tmp_path / "run", executor="slurm", dry_run=True,
                         log=lines.append)
    warned = [x for x in lines if x.startswith("rift: warning:")]
    assert len(warned) == 1 and "data.corruption_root" in warned[0] and "no-CIFAR-10-C" in warned[0]
    assert out["jobs"] and not (tmp_path / "run").exists()
    with pytest.raises(PreflightError) as err:
        cluster.submit(cfg, cluster.load_profile(None), tmp_path / "run", executor="slurm", log=lines.append)
    assert "data.corruption_root" in str(err.value) and "check_paths: false" in str(err.value)
    assert not (tmp_path / "run").exists()
    # the corruption set matters only to the evaluation job: a submit of train + mrc does not need it
    monkeypatch.setattr(cluster_submission, "_executor", lambda kind, folder, *a: (folder.mkdir(parents=True, exist_ok=True),
                                                                         FakeExecutor([], 99))[1])
    record = cluster.submit(cfg, cluster.load_profile(None), tmp_path / "run", executor="slurm",
                            stages=["train", "mrc"], log=lambda _: None)
    assert [j["name"] for j in record["submissions"][0]["jobs"]] == ["train", "mrc-prepare", "mrc", "mrc-gather"]
    # check_paths: false (the nodes see paths this machine does not): the whole graph, with a warning
    lines.clear()
    cluster.submit(cfg, cluster.load_profile(None, ["check_paths=false"]), tmp_path / "run2", executor="slurm",
                   log=lines.append)
    assert any(x.startswith("rift: warning:") and "data.corruption_root" in x for x in lines)


# ------------------------------------------------------------------------------------------- ports


def test_ports_of_jobs_4123_and_24123_differ():
    assert cluster_job.derived_port(4123) != cluster_job.derived_port(24123)
    ports = []
    for job_id in ("4123", "24123"):
        env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "n1"}
        ports.append(read_launch_env(env).master_port)
    assert ports[0] != ports[1]
    assert all(cluster_job.PORT_BASE <= p < cluster_job.PORT_BASE + cluster_job.PORT_SPAN for p in ports)


def test_rendezvous_port_taken_falls_back_and_is_shared_through_the_run_dir(tmp_path):
    import random

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        # another job's rendezvous holds the port this job would derive: a free port inside the derived range
        # (an ephemeral port from bind(0) may lie above it: 32768-60999 vs 20000-59999)
        for busy in random.Random(0).sample(range(cluster_job.PORT_BASE, cluster_job.PORT_BASE + cluster_job.PORT_SPAN), 50):
            try:
                other.bind(("", busy))
                break
            except OSError:
                continue
        other.listen()
        job_id = busy - cluster_job.PORT_BASE
        assert cluster_job.derived_port(job_id) == busy
        port0 = cluster_job.rendezvous_port(tmp_path, f"{job_id}-r0", 0, job_id)
        assert port0 != busy and cluster_job.port_is_free(port0)
        assert cluster_job.rendezvous_port(tmp_path, f"{job_id}-r0", 1, job_id, timeout_s=5) == port0
    with pytest.raises(cluster.ClusterError, match="did not write its rendezvous port"):
        cluster_job.rendezvous_port(tmp_path, "7-r1", 1, 7, timeout_s=0.3)


def test_slurm_ranks_get_the_shared_port_and_the_profile_overrides_it(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "24123")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    import os

    cluster_job._prepare_environment({"run_dir": str(tmp_path)})
    assert int(os.environ["MASTER_PORT"]) == int((tmp_path / "jobs/rendezvous/24123-r0.port").read_text())
    monkeypatch.delenv("MASTER_PORT")
    cluster_job._prepare_environment({"run_dir": str(tmp_path), "master_port": 31555})
    assert os.environ["MASTER_PORT"] == "31555"
    assert cluster.load_profile(None, ["master_port=31555"]).resources("train").master_port == 31555
