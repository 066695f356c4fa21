"""rift_dist.cluster without a cluster: profiles, the job plan, sbatch scripts, launcher variables, status."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from rift_dist import cluster
from rift_dist.cluster import job as cluster_job
from rift_dist.cluster import monitor as cluster_monitor
from rift_dist.cluster import submission as cluster_submission
from rift_dist.config import load_config
from rift_dist.parallel.runtime import read_launch_env
from rift_dist.stages import criticality, criticality_array, interpolation
from rift_dist.stages.done_markers import stage_signature

ROOT = Path(__file__).resolve().parents[2]


def tiny(*overrides: str):
    """A config that builds a width-4 ResNet-18 (no data is read by the planner)."""
    return load_config(None, ["model.width=4", "interpolation.alphas=[0.0,0.5,1.0]", *overrides])


def mark_done(cfg, run_dir: Path, stage: str) -> None:
    """A finished stage: its done marker and (empty) files in place of the outputs a done stage must have."""
    from rift_dist.stages.done_markers import essential_outputs

    (run_dir / stage).mkdir(parents=True, exist_ok=True)
    for rel in essential_outputs(stage):
        if not (run_dir / rel).exists():
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / rel).write_bytes(b"")
    (run_dir / stage / "done.json").write_text(json.dumps({"outputs": {}, "signature": stage_signature(cfg, stage)},
                                                          default=str))


# ------------------------------------------------------------------------------------------ profiles


@pytest.mark.parametrize("name", ["example_cluster.yaml", "local_test.yaml"])
def test_shipped_profiles_load(name):
    profile = cluster.load_profile(ROOT / "launch" / name)
    for key in cluster.PROFILE_STAGES:
        assert profile.resources(key).time_min >= 1


def test_profile_overrides_and_gather_defaults():
    p = cluster.load_profile(ROOT / "launch" / "example_cluster.yaml", ["stages.mrc.array_size=3", "partition=big"])
    assert p.option("mrc", "array_size") == 3 and p.option("finetune", "candidates") == 1
    train = p.resources("train")
    assert (train.nodes, train.gpus_per_node, train.ranks_per_node(), train.partition) == (2, 4, 4, "big")
    gather = p.resources("gather")
    assert gather.gpus_per_node == 0 and gather.ranks_per_node() == 1 and gather.cpus_per_task == 4
    assert p.resources("mrc_prepare").gpus_per_node == 1


@pytest.mark.parametrize("data, message", [
    ({"partiton": "gpu"}, "unknown key(s) ['partiton']"),
    ({"nodes": "two"}, "'nodes' must be int"),
    ({"stages": {"trian": {}}}, "unknown stage 'trian'"),
    ({"stages": {"mrc": {"array": 4}}}, "unknown key stages.mrc.array"),
    ({"stages": {"mrc": {"mode": "both"}}}, "stages.mrc.mode must be array or job"),
    ({"executor": "pbs"}, "executor must be one of"),
    ({"time_min": 0}, "must be >= 1"),
])
def test_bad_profiles_name_the_key_and_the_file(tmp_path, data, message):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(cluster.ClusterError) as err:
        cluster.load_profile(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_profile_says_where_profiles_live(tmp_path):
    with pytest.raises(cluster.ClusterError, match="launch/"):
        cluster.load_profile(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ sbatch


def test_sbatch_script_carries_resources_dependency_and_array(tmp_path):
    p = cluster.load_profile(ROOT / "launch" / "example_cluster.yaml")
    text = cluster_submission.sbatch_script(p.resources("mrc"), "mrc", tmp_path, "/venv/bin/python", ["123"], array_size=8)
    for flag in ("--partition=gpu", "--account=myproject", "--constraint=a100", "--gpus-per-node=1",
                 "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=64GB", "--time=60", "--array=0-7%8",
                 "--dependency=afterok:123", "--kill-on-invalid-dep=yes", "--signal=USR2@180", "--mail-type=FAIL"):
        assert flag in text, flag
    assert "module load cuda/13.0" in text and "/venv/bin/python -u -m submitit.core._submit" in text
    assert text.index("export NCCL_DEBUG=WARN") < text.index("module load")  # env: first, then setup:
    train = cluster_submission.sbatch_script(p.resources("train"), "train", tmp_path, "python")
    assert "--nodes=2" in train and "--ntasks-per-node=4" in train and "dependency" not in train


GPU_PROFILE = {"partition": "gpu", "cpu_partition": "cpu", "nodes": 1, "gpus_per_node": 4, "cpus_per_task": 6,
               "constraint": "a100", "sbatch": {"gpu-bind": "closest", "mail-type": "FAIL"},
               "env": {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_DISABLE": 1, "NCCL_DEBUG": "WARN"},
               "stages": {"train": {"nodes": 2}, "mrc": {"gpus_per_node": 1},
                          "evaluate": {"env": {"NCCL_DEBUG": "INFO"}}}}


def _flags(text: str) -> dict[str, str]:
    """{option: value} of the #SBATCH lines of a script."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def test_gpu_job_asks_for_one_rank_per_gpu_and_exports_the_profile_env(tmp_path):
    p = cluster.profile_from_dict(GPU_PROFILE, "gpu.yaml")
    train = cluster_submission.sbatch_script(p.resources("train"), "train", tmp_path, "python")
    flags = _flags(train)
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"], flags["cpus-per-task"]) == (
        "2", "4", "4", "6")
    assert flags["partition"] == "gpu" and flags["constraint"] == "a100" and flags["gpu-bind"] == "closest"
    assert "gres" not in flags
    exports = [line for line in train.splitlines() if line.startswith("export NCCL")]
    assert exports == ["export NCCL_SOCKET_IFNAME=ib0", "export NCCL_IB_DISABLE=1", "export NCCL_DEBUG=WARN"]
    # a stage's env is merged over the top-level one (evaluate changes NCCL_DEBUG only)
    assert p.resources("evaluate").env == {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_DISABLE": 1, "NCCL_DEBUG": "INFO"}
    # --gres for clusters without cons_tres, with a GPU model
    old = cluster.profile_from_dict({**GPU_PROFILE, "gpu_request": "gres", "gpu_type": "a100"}, "gpu.yaml")
    flags = _flags(cluster_submission.sbatch_script(old.resources("train"), "train", tmp_path, "python"))
    assert flags["gres"] == "gpu:a100:4" and "gpus-per-node" not in flags and flags["ntasks-per-node"] == "4"
    typed = cluster.profile_from_dict({**GPU_PROFILE, "gpu_type": "h100"}, "gpu.yaml")
    assert _flags(cluster_submission.sbatch_script(typed.resources("mrc"), "mrc", tmp_path, "python"))["gpus-per-node"] == "h100:1"


def test_jobs_without_gpus_go_to_the_cpu_partition_and_inherit_no_gpu_option(tmp_path):
    p = cluster.profile_from_dict(GPU_PROFILE, "gpu.yaml")
    gather = p.resources("gather")
    flags = _flags(cluster_submission.sbatch_script(gather, "mrc-gather", tmp_path, "python"))
    assert flags["partition"] == "cpu" and flags["ntasks-per-node"] == "1" and flags["mail-type"] == "FAIL"
    for gpu_only in ("constraint", "gpus-per-node", "gres", "gpu-bind"):
        assert gpu_only not in flags, gpu_only
    # a stage that names its own partition / constraint keeps them; GPU stages keep the GPU partition
    own = cluster.profile_from_dict({**GPU_PROFILE, "stages": {"gather": {"partition": "short", "constraint": "amd"}}},
                                    "gpu.yaml")
    assert (own.resources("gather").partition, own.resources("gather").constraint) == ("short", "amd")
    assert own.resources("mrc").partition == "gpu" and own.resources("mrc").constraint == "a100"
    # without cpu_partition a gather stays in the top-level partition, still without the GPU constraint
    plain = cluster.profile_from_dict({k: v for k, v in GPU_PROFILE.items() if k != "cpu_partition"}, "gpu.yaml")
    assert (plain.resources("gather").partition, plain.resources("gather").constraint) == ("gpu", "")
    # a stage made CPU-only (gpus_per_node: 0) is treated the same way
    cpu_prep = cluster.profile_from_dict({**GPU_PROFILE, "stages": {"mrc_prepare": {"gpus_per_node": 0}}}, "gpu.yaml")
    assert (cpu_prep.resources("mrc_prepare").partition, cpu_prep.resources("mrc_prepare").constraint) == ("cpu", "")
    # the example profile: gathers in its cpu partition, GPU jobs with the a100 constraint
    ex = cluster.load_profile(ROOT / "launch" / "example_cluster.yaml")
    assert (ex.resources("gather").partition, ex.resources("gather").constraint) == ("cpu", "")
    assert (ex.resources("train").partition, ex.resources("train").constraint) == ("gpu", "a100")
    # cpu_partition and check_paths survive the round trip through submission.json
    back = cluster.profile_from_dict({k: v for k, v in ex.to_dict().items() if k != "name"}, "stored")
    assert back.cpu_partition == "cpu" and back.check_paths is True and back.resources("gather").partition == "cpu"


@pytest.mark.parametrize("data, message", [
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "tasks_per_node=2: every rank drives one GPU"),
    ({"gpus_per_node": 2, "tasks_per_node": 4}, "set tasks_per_node: 0 (= one per GPU) or 2"),
    ({"stages": {"mrc": {"gpus_per_node": 1}}, "gpus_per_node": 4, "tasks_per_node": 4}, "stage mrc_prepare asks for 1 GPU(s) per node but tasks_per_node=4"),
    ({"gpu_request": "gpus"}, "gpu_request of stage train is 'gpus'; choose one of gpus-per-node, gres"),
    ({"env": {"MASTER_ADDR": "n1"}}, "env.MASTER_ADDR may not be set in a profile: rift sets the launcher"),
    ({"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "SLURM sets it to the GPUs it allocated"),
    ({"stages": {"train": {"env": {"1BAD": "x"}}}}, "stages.train.env.1BAD is not an environment variable name"),
    ({"env": {"NCCL_IB_HCA": ["mlx5"]}}, "env.NCCL_IB_HCA must be a string or a number"),
    ({"env": "NCCL_DEBUG=INFO"}, "'env' must be dict"),
    ({"sbatch": {"gpus-per-task": 1}}, "--gpus-per-task, which rift submit sets"),
    ({"sbatch": {"G": 4}}, "--gpus, which rift submit sets"),
    ({"sbatch": {"cpus_per_gpu": 4}}, "--cpus-per-gpu, which rift submit sets"),
    ({"cpu_partition": 3}, "'cpu_partition' must be str"),
])
def test_bad_gpu_settings_are_refused_naming_the_key_and_the_fix(tmp_path, data, message):
    with pytest.raises(cluster.ClusterError) as err:
        cluster.profile_from_dict(data, "gpu.yaml")
    assert message in str(err.value) and "gpu.yaml" in str(err.value)


def test_script_header_says_stage_config_run_dir_and_array_task_mapping(tmp_path):
    cfg = tiny()
    p = cluster.profile_from_dict({**GPU_PROFILE, "stages": {**GPU_PROFILE["stages"], "mrc": {
        "gpus_per_node": 1, "array_size": 4}}}, "gpu.yaml")
    jobs = {j.name: j for j in cluster.plan_jobs(cfg, p, tmp_path / "run")}
    script = cluster_submission.sbatch_script(jobs["mrc"].resources, "mrc", tmp_path, "python", ["<mrc-prepare>"], 4,
                                   cluster_submission.script_header(jobs["mrc"], tmp_path / "run", "/cfg/tiny.yaml"))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("# rift mrc: job mrc - MRC of a group of modules")
    assert f"# config:  /cfg/tiny.yaml" in lines and f"# run dir: {tmp_path / 'run'}" in lines
    header = lines[:lines.index("# Parameters")]
    assert all(line.startswith("#") or not line for line in header)  # sbatch still reads the #SBATCH lines
    mapping = [line for line in header if "-> MRC group" in line]
    assert len(mapping) == 4
    for i, (line, task) in enumerate(zip(mapping, jobs["mrc"].tasks)):
        assert line == f"#   {i:>3} -> MRC group {task.index}: {', '.join(task.names)}"
    assert _flags(script)["job-name"] == "rift-mrc"
    interp = "\n".join(cluster_submission.script_header(jobs["interpolate"], tmp_path / "run"))
    assert "#     1 -> sweep part 1: alpha=0.5" in interp and "3 tasks; SLURM_ARRAY_TASK_ID" in interp
    train = "\n".join(cluster_submission.script_header(jobs["train"], tmp_path / "run", "/cfg/tiny.yaml"))
    assert "2 node(s) x 4 rank(s) = 8 ranks" in train and "cuda:LOCAL_RANK" in train and "WORLD_SIZE = 8" in train
    gather = "\n".join(cluster_submission.script_header(jobs["mrc-gather"], tmp_path / "run"))
    assert "no GPU" in gather and "cuda" not in gather and "after:   mrc succeeded" in gather
    assert "# shape:   1 node(s) x 1 rank(s), 6 CPU(s) per rank, no GPU" in gather
    # the script submitit submits carries the same header (RiftSlurmExecutor)
    ex = cluster_submission.RiftSlurmExecutor.__new__(cluster_submission.RiftSlurmExecutor)
    ex.folder, ex.parameters, ex.header = tmp_path, {"job_name": "rift-mrc"}, ["# rift mrc: a test header"]
    text = ex._make_submission_file_text("python -m x", "uid")
    assert text.splitlines()[:2] == ["#!/bin/bash", "# rift mrc: a test header"] and "#SBATCH --job-name=rift-mrc" in text


def test_example_profile_cuda_module_matches_the_pinned_torch_build():
    import re

    import torch

    text = (ROOT / "launch" / "example_cluster.yaml").read_text()
    modules = re.findall(r"module load cuda/(\d+\.\d+)", text)
    assert modules, "the example profile should show the CUDA module to load"
    if torch.version.cuda is None:
        pytest.skip("this torch build has no CUDA: nothing to match")
    assert set(modules) == {torch.version.cuda}, (modules, torch.version.cuda)


# ------------------------------------------------------------------------------------------ plans


def test_full_plan_chains_every_job(tmp_path):
    plan = cluster.plan_jobs(tiny(), cluster.load_profile(None, ["stages.mrc.array_size=4"]), tmp_path)
    assert [j.name for j in plan] == ["train", "mrc-prepare", "mrc", "mrc-gather", "finetune", "interpolate",
                                      "interpolate-gather", "evaluate"]
    assert all(j.depends_on == [plan[i - 1].name] for i, j in enumerate(plan) if i)
    mrc = plan[2]
    assert mrc.array and len(mrc.tasks) == 4
    names = [m for t in mrc.tasks for m in t.names]
    assert names == criticality.mrc_module_names(tiny()) and len(names) == 21  # each module once, network order
    assert [t.args["pairs"] for t in plan[5].tasks] == [[[None, 0.0]], [[None, 0.5]], [[None, 1.0]]]
    assert plan[3].tasks[0].args["assignment"] == [t.names for t in mrc.tasks]


def test_array_groups_are_balanced_contiguous_assignments():
    cfg = tiny()
    groups = criticality_array.mrc_groups(cfg, 4)
    from rift_dist.models import build_model
    from rift_dist.stages.criticality import assign_modules, module_costs

    names = criticality.mrc_module_names(cfg)
    costs = module_costs(build_model(cfg), names, (3, 32, 32))
    assert groups == assign_modules(names, costs, 4)
    assert criticality_array.mrc_groups(cfg, 100) == [[n] for n in names]  # more tasks than modules: one each


def test_plan_skips_what_is_done_and_checks_inputs(tmp_path):
    cfg = tiny()
    profile = cluster.load_profile(None, ["stages.mrc.array_size=4"])
    with pytest.raises(cluster.ClusterError, match="stage mrc needs the output of stage.s. train"):
        cluster.plan_jobs(cfg, profile, tmp_path, ["mrc"])
    mark_done(cfg, tmp_path, "train")
    (tmp_path / "mrc").mkdir()
    (tmp_path / "mrc" / "adversarial_set.pt").write_bytes(b"")
    groups = criticality_array.mrc_groups(cfg, 4)
    (tmp_path / "mrc" / "modules").mkdir()
    for name in groups[0] + groups[2]:
        (tmp_path / "mrc" / "modules" / f"{name}.json").write_text("{}")
    plan = cluster.plan_jobs(cfg, profile, tmp_path, ["mrc"])
    assert [j.name for j in plan] == ["mrc", "mrc-gather"]
    assert [t.index for t in plan[0].tasks] == [1, 3]
    for name in groups[1] + groups[3]:
        (tmp_path / "mrc" / "modules" / f"{name}.json").write_text("{}")
    with pytest.raises(cluster.ClusterError, match=r"--only mrc: every task of job mrc is done in"):
        cluster.plan_jobs(cfg, profile, tmp_path, ["mrc"], only=["mrc"])
    mark_done(cfg, tmp_path, "mrc")
    assert cluster.plan_jobs(cfg, profile, tmp_path, ["mrc"]) == []
    changed = tiny("mrc.num_iterations=3")
    from rift_dist.stages import StageError

    with pytest.raises(StageError, match="mrc.num_iterations"):
        cluster.plan_jobs(changed, profile, tmp_path, ["mrc"])


def test_only_submits_single_tasks_without_what_follows(tmp_path):
    cfg = tiny()
    profile = cluster.load_profile(None, ["stages.mrc.array_size=4"])
    mark_done(cfg, tmp_path, "train")
    module = criticality_array.mrc_groups(cfg, 4)[2][1]
    plan = cluster.plan_jobs(cfg, profile, tmp_path, only=[f"mrc:{module}"])
    assert [j.name for j in plan] == ["mrc"] and [t.args["modules"] for t in plan[0].tasks] == [[module]]
    assert plan[0].depends_on == []
    plan = cluster.plan_jobs(cfg, profile, tmp_path, only=["mrc:2"])
    assert plan[0].tasks[0].args["modules"] == criticality_array.mrc_groups(cfg, 4)[2]
    plan = cluster.plan_jobs(cfg, profile, tmp_path, only=["interpolate:0.5", "mrc-gather"])
    assert [j.name for j in plan] == ["mrc-gather", "interpolate"]
    assert plan[1].tasks[0].args["pairs"] == [[None, 0.5]]
    with pytest.raises(cluster.ClusterError, match="not part of stages"):
        cluster.plan_jobs(cfg, profile, tmp_path, only=["mrc-gathr"])
    # a task name that matches no task is named as such (it said the job 'mrc' was not part of the stages)
    with pytest.raises(cluster.ClusterError, match=r"--only mrc:layer9.conv1 matches no task of job mrc"):
        cluster.plan_jobs(cfg, profile, tmp_path, only=["mrc:layer9.conv1"])
    with pytest.raises(cluster.ClusterError, match=r"--only interpolate:0.55 matches no task of job interpolate"):
        cluster.plan_jobs(cfg, profile, tmp_path, only=["interpolate:0.55"])


def test_candidate_plan_shares_alpha_zero(tmp_path):
    cfg = tiny()
    profile = cluster.load_profile(None, ["stages.finetune.candidates=3"])
    plan = {j.name: j for j in cluster.plan_jobs(cfg, profile, tmp_path)}
    assert plan["finetune"].array and [t.args["candidate"] for t in plan["finetune"].tasks] == [0, 1, 2]
    pairs = [p for t in plan["interpolate"].tasks for p in t.args["pairs"]]
    assert pairs[0] == [None, 0.0] and len(pairs) == 1 + 3 * 2
    assert plan["mrc-gather"].tasks[0].args["candidates"] == 3
    with pytest.raises(cluster.ClusterError, match="mrc.top_k"):
        cluster.plan_jobs(tiny("mrc.top_k=2"), profile, tmp_path)


def test_choose_candidate_applies_the_alpha_rule_over_all_pairs():
    at = {"alpha": 0.0, "clean_accuracy": 0.80, "robust_accuracy": 0.50}
    per = {
        "layer2.1.conv2": [at, {"alpha": 0.5, "clean_accuracy": 0.82, "robust_accuracy": 0.50},
                           {"alpha": 1.0, "clean_accuracy": 0.90, "robust_accuracy": 0.40}],
        "layer3.0.conv1": [at, {"alpha": 0.5, "clean_accuracy": 0.83, "robust_accuracy": 0.4995},
                           {"alpha": 1.0, "clean_accuracy": 0.85, "robust_accuracy": 0.45}],
    }
    module, row = interpolation.choose_candidate(per, at, 0.001)
    assert module == "layer3.0.conv1" and row["alpha"] == 0.5  # within 0.1 pp of AT's robust accuracy
    per["layer3.0.conv1"][1] = {"alpha": 0.5, "clean_accuracy": 0.82, "robust_accuracy": 0.50}
    assert interpolation.choose_candidate(per, at, 0.001)[0] == "layer2.1.conv2"  # full tie: the lower-MRC candidate


# ------------------------------------------------------------------------------------------ launcher env


def test_submitit_slurm_multitask_variables_give_the_rank_layout():
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_JOB_ID": "31337", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    le = read_launch_env(env)
    assert (le.rank, le.local_rank, le.world_size, le.source) == (1, 1, 2, "slurm")
    assert (le.master_addr, le.master_port) == ("gpu07", cluster_job.derived_port(31337))


def test_inherited_launcher_variables_are_dropped_and_local_tasks_mapped(monkeypatch, tmp_path):
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "3")
    for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    chosen = cluster_job.rendezvous_port(tmp_path, "local-4242", 0, 4242)  # what rank 0 of the job writes
    cluster_job._prepare_environment({"submit_env": {"MASTER_PORT": "29500", "RANK": "3"}, "run_dir": str(tmp_path)})
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_PORT"] == str(chosen) and os.environ["MASTER_ADDR"] == "127.0.0.1"


# ------------------------------------------------------------------------------------------ status


def test_expand_array_ids():
    assert cluster_monitor._expand_array_id("12_[0-2,5%4]") == ["12_0", "12_1", "12_2", "12_5"]
    assert cluster_monitor._expand_array_id("12_3") == ["12_3"] and cluster_monitor._expand_array_id("9") == ["9"]


def test_status_names_failed_tasks_and_how_to_resubmit(tmp_path):
    run_dir = tmp_path / "run"
    folder = run_dir / "jobs" / "mrc"
    folder.mkdir(parents=True)
    for jid, outcome in (("101", ("success", {})), ("102", ("error", "Traceback ...\nValueError: bad module file"))):
        with (folder / f"{jid}_0_result.pkl").open("wb") as fh:
            pickle.dump(outcome, fh)
    tasks = [{"index": 0, "label": "conv1,layer1.0.conv1", "names": ["conv1", "layer1.0.conv1"],
              "args": {"modules": ["conv1", "layer1.0.conv1"]}, "job_id": "101"},
             {"index": 1, "label": "layer1.0.conv2", "names": ["layer1.0.conv2"],
              "args": {"modules": ["layer1.0.conv2"]}, "job_id": "102"}]
    record = {"run_dir": str(run_dir), "executor": "local", "profile": {"name": "p"}, "tracking": {},
              "submissions": [{"time": "now", "only": [], "jobs": [
                  {"name": "mrc", "stage": "mrc", "part": "mrc_modules", "array": True, "job_id": "101",
                   "folder": str(folder), "depends_on": [], "dependency": "", "tasks": tasks}]}]}
    cluster_monitor.write_submission(run_dir, record)
    lines = []
    result = cluster.status(run_dir, log=lines.append)
    text = "\n".join(lines)
    assert result["failed"] == ["mrc:layer1.0.conv2"]
    assert "FAILED: mrc task 1 (layer1.0.conv2): FAILED — ValueError: bad module file" in text
    assert f"rift submit {run_dir.resolve()} --only mrc:layer1.0.conv2 --local" in text
    # once its module's result exists (e.g. after a re-submission), it is no longer reported
    (run_dir / "mrc" / "modules").mkdir(parents=True)
    (run_dir / "mrc" / "modules" / "layer1.0.conv2.json").write_text("{}")
    assert cluster.status(run_dir, log=lambda _: None)["failed"] == []


def test_status_without_submission_says_so(tmp_path):
    with pytest.raises(cluster.ClusterError, match="rift submit"):
        cluster.status(tmp_path)


def test_slurm_executor_unavailable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(cluster.ClusterError, match="--local"):
        cluster_submission._executor("slurm", tmp_path / "jobs", cluster.Resources(), "train", "python", [])


def test_cli_parses_the_cluster_commands():
    from rift_dist.cli import build_parser

    args = build_parser().parse_args(["submit", "c.yaml", "--profile", "launch/x.yaml", "--set", "seed=1",
                                      "--profile-set", "stages.mrc.array_size=4", "--only", "mrc:conv1", "--local"])
    assert (args.command, args.local, args.only, args.profile_overrides) == ("submit", True, ["mrc:conv1"],
                                                                           ["stages.mrc.array_size=4"])
    assert build_parser().parse_args(["report", "rift", "--out", "r"]).out == "r"


def test_jobs_submitted_before_the_split_still_unpickle():
    """submitit pickles the StageJob of every submitted job; jobs queued before rift_dist.cluster became a
    package name it rift_dist.cluster.StageJob (protocol-0 GLOBAL opcode below), which must still load."""
    old = b"crift_dist.cluster\nStageJob\n)\x81."
    job = pickle.loads(old)
    assert isinstance(job, cluster.StageJob) and type(job).__module__ == "rift_dist.cluster.job"
    assert callable(pickle.loads(pickle.dumps(job)))
