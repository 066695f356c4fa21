"""Inputs checked before the first stage: unset variables, data, corruption sets, checkpoints; worker cap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rift_dist.config import load_config
from rift_dist.pipeline import cap_num_workers
from rift_dist.preflight import PreflightError, check_inputs, input_problems, unresolved_variables
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


def test_rift_run_refuses_before_writing_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RIFT_DATA_ROOT", "MLFLOW_TRACKING_URI")}
    run_dir = tmp_path / "runs" / "ti"
    proc = subprocess.run([sys.executable, "-m", "rift_dist.cli", "run", "configs/tiny-imagenet_resnet18.yaml",
                           "--run-dir", str(run_dir), "--no-progress"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "RIFT_DATA_ROOT is not set" in proc.stderr and "nothing was started" in proc.stderr
    assert not (tmp_path / "runs").exists()


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
