"""The pipeline's one line per stage: elapsed time and an ETA for the whole pipeline from measured stage rates."""

from __future__ import annotations

import re

import pytest

from rift_dist.config import load_config
from rift_dist.progress import PipelineETA

STAGES = ("train", "mrc", "finetune", "interpolate", "evaluate")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_eta_scales_the_measured_rate_by_the_predicted_work_left():
    clock = Clock()
    eta = PipelineETA(STAGES, {"train": 4.0, "mrc": 2.0, "finetune": 1.0, "interpolate": 1.0, "evaluate": 2.0},
                      clock=clock)
    assert eta.eta_s() is None  # nothing measured yet
    clock.now += 80.0
    eta.finish("train", 80.0)  # 20 s per unit of work; 6 units left
    assert eta.eta_s() == pytest.approx(120.0)
    line = eta.line("train")
    assert line.startswith("[train] finished in 80.0s; pipeline 1/5 stage(s), 80s elapsed, ETA 2.0min")
    assert "total ~3.3min" in line and "for mrc, finetune, interpolate, evaluate" in line
    assert re.match(r"^\[(\w+)\] finished in ([\d.]+)s", line)  # the head log readers parse (tests/integration/chaos.py)
    clock.now += 60.0
    eta.finish("mrc", 60.0)  # (80 + 60) s over 6 units: 23.3 s per unit; 4 units left
    assert eta.eta_s() == pytest.approx(140.0 / 6.0 * 4.0)
    eta.finish("finetune", 10.0)
    eta.finish("interpolate", 10.0)
    eta.finish("evaluate", 30.0)
    assert eta.eta_s() == 0.0 and eta.line("evaluate").endswith("all stages done")


def test_skipped_and_weightless_stages_count_neither_as_measured_nor_as_left():
    clock = Clock()
    eta = PipelineETA(STAGES, {"train": 0.0, "mrc": 2.0, "finetune": 1.0, "interpolate": 1.0, "evaluate": 4.0},
                      clock=clock)
    eta.finish("train", 0.5)  # imported from a checkpoint: weight 0, its 0.5 s says nothing about the rate
    assert eta.eta_s() is None and "ETA after the first measured stage" in eta.line("train")
    eta.skip("mrc")  # already done in the run directory
    eta.finish("finetune", 5.0)  # 5 s per unit; interpolate + evaluate = 5 units
    assert eta.remaining() == ["interpolate", "evaluate"] and eta.eta_s() == pytest.approx(25.0)
    assert "pipeline 3/5 stage(s)" in eta.line("finetune")


def test_stage_weights_follow_the_plan_model_and_zero_an_imported_training(tmp_path):
    from rift_dist.pipeline import stage_weights

    cfg = load_config(None, ["model.width=4"])
    weights = stage_weights(cfg)
    assert list(weights) == list(STAGES) and all(w > 0 for w in weights.values())
    more = stage_weights(load_config(None, ["model.width=4", f"train.epochs={2 * cfg.train.epochs}"]))
    assert more["train"] > weights["train"] and more["mrc"] == weights["mrc"]
    ckpt = tmp_path / "at.pt"
    ckpt.write_bytes(b"")
    assert stage_weights(load_config(None, ["model.width=4", f"from_checkpoint={ckpt}"]))["train"] == 0.0


def test_run_stages_logs_one_eta_line_per_stage(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rift_dist import pipeline

    lines: list[str] = []
    ctx = SimpleNamespace(cfg=load_config(None, ["model.width=4"]), run_dir=tmp_path, log=lines.append,
                          runtime=SimpleNamespace(world_size=1))
    monkeypatch.setattr(pipeline.interrupts, "check", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "read_done", lambda ctx, name: {"outputs": {}} if name == "train" else None)
    monkeypatch.setattr(pipeline, "stage_function", lambda name, cfg: (lambda ctx: {"stage": name}))
    out = pipeline.run_stages(ctx, ["train", "mrc", "finetune"])
    assert out == {"train": {}, "mrc": {"stage": "mrc"}, "finetune": {"stage": "finetune"}}
    done = [x for x in lines if " finished in " in x]
    assert len(done) == 2 and done[0].startswith("[mrc] finished in") and "pipeline 2/3 stage(s)" in done[0]
    assert "ETA" in done[0] and "for finetune" in done[0] and done[1].endswith("all stages done")
