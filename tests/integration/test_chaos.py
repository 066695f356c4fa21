"""The chaos suite: SIGKILL the whole process group at random moments of every stage (and inside a
checkpoint write), re-run until done, and require every artefact to equal an uninterrupted run's."""

from __future__ import annotations

import pytest

from tests.integration.chaos import (
    compare,
    duplicate_metric_steps,
    leftover_temporaries,
    run_reference,
    run_with_kills,
    stage_runs,
)
from tests.integration.pipeline_helpers import shared_data, tiny_config

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def _config(tmp_path, tracking: bool):
    return tiny_config(tmp_path, train={"epochs": 2, "milestones": [1], "attack": {"num_steps": 2},
                                        "eval_attack_steps": 2, "checkpoint_every": 1},
                       tracking={"enabled": tracking})


def _report(result, unequal, leftovers) -> str:
    per_stage = result.kills_per_stage()
    kinds = {}
    for f in result.faults:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return (f"chaos: {len([f for f in result.faults if f.kind != 'missed'])} faults injected "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) over {result.attempts} attempts in "
            f"{result.wall_s:.0f}s; per stage {per_stage}; artefacts unequal: {unequal or 'none'}; "
            f"temporary files left: {len(leftovers)}")


def test_sigkills_in_training_and_mrc_resume_to_identical_artefacts(tmp_path):
    """Short version for the default run: a kill inside a checkpoint write, one in training, one in MRC."""
    cfg = _config(tmp_path, tracking=False)
    durations = run_reference(cfg, tmp_path / "reference")
    result = run_with_kills(cfg, tmp_path / "chaos", [("train", 0.4), ("mrc", 0.4)], durations, seed=1)
    unequal = compare(tmp_path / "reference", tmp_path / "chaos")
    leftovers = leftover_temporaries(tmp_path / "chaos")
    print(_report(result, unequal, leftovers))
    assert [f.kind for f in result.faults][:1] == ["sigkill-in-save"]
    assert sum(f.kind == "sigkill" for f in result.faults) >= 1
    assert unequal == [] and leftovers == []


@pytest.mark.slow
def test_chaos_twelve_kills_over_all_stages(tmp_path):
    """At least 12 SIGKILLs spread over all five stages (two inside training after one resume), one inside a
    checkpoint write; MLflow on (its SQLite store is written by every attempt); every artefact bitwise equal, and
    no metric logged twice at one step (resumed stages re-log what they had logged before a kill), each stage's
    MLflow run once and FINISHED."""
    cfg = _config(tmp_path, tracking=True)
    durations = run_reference(cfg, tmp_path / "reference")
    plan = [("train", 0.2), ("train", 0.25), ("mrc", 0.3), ("mrc", 0.3), ("finetune", 0.2), ("finetune", 0.3),
            ("interpolate", 0.2), ("interpolate", 0.3), ("evaluate", 0.15), ("evaluate", 0.25), ("evaluate", 0.3),
            ("evaluate", 0.35)]
    result = run_with_kills(cfg, tmp_path / "chaos", plan, durations, seed=0)
    unequal = compare(tmp_path / "reference", tmp_path / "chaos")
    leftovers = leftover_temporaries(tmp_path / "chaos")
    print(_report(result, unequal, leftovers))
    kills = [f for f in result.faults if f.kind == "sigkill"]
    assert len(kills) >= 10, _report(result, unequal, leftovers)
    assert {f.stage for f in kills} == {"train", "mrc", "finetune", "interpolate", "evaluate"}
    assert unequal == [] and leftovers == []
    duplicates = duplicate_metric_steps(f"sqlite:///{tmp_path / 'mlflow.db'}")
    print(f"chaos: metrics logged twice at one step: {len(duplicates)}")
    assert duplicates == [], duplicates[:20]
    runs = stage_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "chaos")
    assert runs == {name: ["FINISHED"] for name in
                    ("adversarial_training", "mrc", "finetune", "interpolation", "evaluation")}, runs
