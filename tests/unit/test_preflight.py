"""Inputs checked before the first stage: unset variables, data, corruption sets, checkpoints; worker cap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rift_dist.config import load_config
from rift_dist.pipeline import cap_num_workers
from rift_dist.config import ConfigError
from rift_dist.preflight import (PreflightError, check_config, check_inputs, check_module_names, input_problems, run_dir_problem,
                                   unresolved_variables)
from tests.conftest import PROJECT_ROOT

STAGES = ("train", "mrc", "finetune", "interpolate", "evaluate")


def test_unset_variable_in_a_path_is_named(monkeypatch):
    monkeypatch.delenv("RIFT_DATA_ROOT", raising=False)
    cfg = load_config(PROJECT_ROOT / "configs" / "tiny-imagenet_resnet18.yaml")
    lines = unresolved_variables(cfg)
    assert any(line.startswith("data.corruption_root") and "RIFT_DATA_ROOT is not set" in line for line in lines)
    with pytest.raises(PreflightError, match="RIFT_DATA_ROOT"):
        check_inputs(cfg, STAGES)


def test_each_missing_input_is_listed(tmp_path, monkeypatch):
    monkeypatch.delenv("RIFT_DATA_ROOT", raising=False)
    cfg = load_config(None, [f"data.root={tmp_path / 'nowhere'}", f"data.corruption_root={tmp_path / 'no-c'}",
                             f"from_checkpoint={tmp_path / 'none.pt'}"])
    problems = input_problems(cfg, STAGES)
    assert len(problems) == 3
    assert any("data.root" in p and "no such directory" in p for p in problems)
    assert any("data.corruption_root" in p for p in problems) and any("from_checkpoint" in p for p in problems)
    assert len(input_problems(cfg, ["mrc"])) == 1  # only the data matter to MRC
    (tmp_path / "nowhere").mkdir()
    assert input_problems(cfg, ["mrc", "finetune"]) == []
    empty = load_config(None, ["data.root=", "data.archive="])
    assert any("no data location" in p for p in input_problems(empty, ["train"]))
    archive = load_config(None, [f"data.archive={tmp_path / 'x.tar.gz'}"])
    assert any("data.archive" in p and "no such file" in p for p in input_problems(archive, ["train"]))
    assert not any("relative to" in p for p in input_problems(archive, ["train"]))
    # a relative path is read from the current directory: the message says which file that is
    monkeypatch.chdir(tmp_path)
    relative = load_config(None, ["data.archive=../shared/data/c.tar.gz"])
    assert any(f"relative to the current directory: {tmp_path}/../shared/data/c.tar.gz" in p
               for p in input_problems(relative, ["train"]))


def test_rift_run_refuses_before_writing_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RIFT_DATA_ROOT", "MLFLOW_TRACKING_URI")}
    run_dir = tmp_path / "runs" / "ti"
    proc = subprocess.run([sys.executable, "-m", "rift_dist.cli", "run", "configs/tiny-imagenet_resnet18.yaml",
                           "--run-dir", str(run_dir), "--no-progress"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "RIFT_DATA_ROOT is not set" in proc.stderr and "nothing was started" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_run_dir_that_cannot_be_used_is_named(tmp_path, monkeypatch):
    """A run directory that is a file, lies below a file or cannot be written is an input problem (it was a
    FileExistsError / NotADirectoryError traceback from the run lock, after the config checks)."""
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    assert "is a file, not a directory" in run_dir_problem(a_file)
    assert f"{a_file} is a file" in run_dir_problem(a_file / "sub" / "run")
    assert run_dir_problem(tmp_path / "new" / "run") is None and not (tmp_path / "new").exists()
    assert run_dir_problem(tmp_path) is None
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    assert "is not writable" in run_dir_problem(tmp_path)
    assert f"cannot be created: {tmp_path} is not writable" in run_dir_problem(tmp_path / "new")
    monkeypatch.setattr(os, "access", real_access)
    cfg = load_config(None, [f"run_dir={a_file}", f"data.root={tmp_path}"])
    problems = input_problems(cfg, ["train"])
    assert len(problems) == 1 and "is a file" in problems[0]
    assert a_file.read_text() == "mine"


def test_rift_run_on_a_file_refuses_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "rift_dist.cli", "run", "configs/default.yaml", "--run-dir",
                           str(a_file), "--no-progress"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and f"run directory {a_file} is a file" in proc.stderr
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_unknown_mrc_exclude_is_refused_before_training():
    """mrc.exclude was checked only when MRC chose the module, i.e. after the whole adversarial training."""
    with pytest.raises(ConfigError, match=r"mrc.exclude: no module named 'layer9.conv1'.*first, last, conv1"):
        check_module_names(load_config(None, ["mrc.exclude=[first, layer9.conv1]", "model.width=4"]))
    check_module_names(load_config(None, ["mrc.exclude=[first, last, layer1.0.conv1]", "model.width=4"]))


def test_unknown_corruption_is_refused_before_training():
    """data.corruptions was checked only when the evaluation built the sets, after every other stage."""
    with pytest.raises(ConfigError, match=r"data.corruptions: unknown corruption\(s\) 'gausian_noise'.*gaussian_noise"):
        check_config(load_config(None, ["data.corruptions=[gausian_noise, fog]"]), 1)
    check_config(load_config(None, ["data.corruptions=[gaussian_noise, spatter]"]), 1)  # an extra one is fine


def test_a_from_checkpoint_that_does_not_load_is_an_input_problem(tmp_path):
    """An unreadable or ill-fitting --from-checkpoint was refused by the train stage, after config.yaml,
    mlflow_run.json and the MLflow parent run had been written."""
    import torch

    from rift_dist.models import build_model

    small = load_config(None, ["model.width=4", f"data.root={tmp_path}"])
    good = tmp_path / "w4.pt"
    torch.save(build_model(small).state_dict(), good)
    not_one = tmp_path / "summary.json"
    not_one.write_text("{}")
    assert input_problems(load_config(None, ["model.width=4", f"data.root={tmp_path}", f"from_checkpoint={good}"]),
                          ["train"]) == []
    wide = input_problems(load_config(None, ["model.width=8", f"data.root={tmp_path}", f"from_checkpoint={good}"]),
                          ["train"])
    assert len(wide) == 1 and "from_checkpoint" in wide[0] and "set model.width: 4" in wide[0]
    junk = input_problems(load_config(None, ["model.width=4", f"data.root={tmp_path}", f"from_checkpoint={not_one}"]),
                          ["train"])
    assert len(junk) == 1 and "not a readable PyTorch checkpoint" in junk[0]
    assert input_problems(load_config(None, ["model.width=8", f"data.root={tmp_path}", f"from_checkpoint={good}"]),
                          ["mrc"]) == []  # only the train stage reads it


def test_num_workers_capped_at_usable_cpus(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    cpus = len(os.sched_getaffinity(0))
    cfg = load_config(None, [f"data.num_workers={cpus + 6}"])
    note = cap_num_workers(cfg)
    assert cfg.data.num_workers == cpus and f"{cpus + 6} -> {cpus}" in note
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cpus))
    cfg = load_config(None, ["data.num_workers=4"])
    cap_num_workers(cfg)
    assert cfg.data.num_workers == 1
    cfg = load_config(None, ["data.num_workers=0"])
    assert cap_num_workers(cfg) == "" and cfg.data.num_workers == 0
