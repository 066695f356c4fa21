"""The stage contract: which config changes make a finished stage stale (refused before anything is written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rift_dist.config import load_config
from rift_dist.pipeline import check_stages_current
from rift_dist.stages import STAGES, StageError
from rift_dist.stages.done_markers import stage_signature


def finished_run(run_dir: Path, *overrides: str):
    """A run directory whose five stages all have done markers for the config ``overrides`` give."""
    cfg = load_config(None, ["model.width=4", *overrides])
    for stage in STAGES:
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        (run_dir / stage / "done.json").write_text(
            json.dumps({"outputs": {}, "signature": stage_signature(cfg, stage)}, default=str))
    return cfg


def stale_stages(run_dir: Path, *overrides: str) -> list[str]:
    cfg = load_config(None, ["model.width=4", *overrides])
    stale = []
    for stage in STAGES:
        try:
            check_stages_current(cfg, run_dir, [stage])
        except StageError as exc:
            assert "produced with a different config" in str(exc)
            stale.append(stage)
    return stale


@pytest.mark.parametrize("change,first_stale", [
    # training picks its best epoch with the evaluation attack: a new epsilon redoes the selection (and all after)
    ("eval.attack.epsilon=0.0156862745", "train"),
    ("eval.attack.num_steps=20", "train"),
    ("precision.autocast=off", "train"),
    ("distributed.sync_bn=true", "train"),
    ("train.epochs=3", "train"),
    ("mrc.epsilon_w=0.2", "mrc"),
    ("finetune.lr=0.05", "finetune"),
    ("interpolation.tolerance=0.002", "interpolate"),
    ("eval.selection_attack_steps=5", "interpolate"),
    ("eval.restarts=1", "evaluate"),
])
def test_a_change_makes_its_stage_and_every_later_stage_stale(tmp_path, change, first_stale):
    finished_run(tmp_path)
    assert stale_stages(tmp_path, change) == list(STAGES[STAGES.index(first_stale):])


@pytest.mark.parametrize("change", ["data.num_workers=2", "data.loader=torch", "tracking.enabled=off",
                                    "precision.threads=1", "distributed.engine=deepspeed", "data.eval_batch_size=64"])
def test_speed_and_bookkeeping_settings_never_make_a_stage_stale(tmp_path, change):
    finished_run(tmp_path)
    assert stale_stages(tmp_path, change) == []


def test_the_refusal_names_the_changed_key(tmp_path):
    finished_run(tmp_path)
    cfg = load_config(None, ["model.width=4", "eval.attack.epsilon=0.0156862745"])
    with pytest.raises(StageError, match=r"stage 'train'.*eval\.attack\.epsilon"):
        check_stages_current(cfg, tmp_path, STAGES)


def test_the_test_subset_is_a_key_of_training_only_when_it_selects_on_the_test_split(tmp_path):
    # selection_split: val -> training never reads the test split: a new test subset redoes the sweep and after
    finished_run(tmp_path / "val")
    assert stale_stages(tmp_path / "val", "data.test_subset=100") == ["interpolate", "evaluate"]
    # selection_split: test -> the best epoch is picked on the test subset: every stage is stale
    finished_run(tmp_path / "test", "selection_split=test")
    assert stale_stages(tmp_path / "test", "selection_split=test", "data.test_subset=100") == list(STAGES)
