"""``rift plan``: module and parameter counts, FLOPs scaling with input size, the H200 time formula, no side effects."""

import subprocess
import sys

import pytest
import torch

from rift_dist.config import from_dict
from rift_dist.data.datasets import DATASETS
from rift_dist.models import build_model, module_names
from rift_dist.plan import (H200_BF16_DENSE_FLOPS, UTILISATION, format_plan, forward_flops,
                            plan_config, predicted_seconds, state_dict_bytes)

TINY = {"model": {"arch": "resnet18", "width": 4}, "data": {"dataset": "cifar10", "train_subset": 200, "val_size": 50,
                                                             "test_subset": 100}}


def _cfg(**data):
    d = {"model": dict(TINY["model"]), "data": {**TINY["data"], **data}}
    return from_dict(d, "<test>")


@pytest.mark.parametrize("arch,modules", [("resnet18", 21), ("resnet34", 37), ("wrn34_10", 35)])
def test_tiny_plan_counts_modules_and_parameters(arch, modules):
    cfg = from_dict({"model": {"arch": arch, "width": 4, "widen_factor": 2}, "data": {"dataset": "cifar100"}})
    plan = plan_config(cfg)
    model = build_model(cfg)
    assert plan.modules == modules == len(module_names(model))
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    assert plan.num_classes == 100 and plan.input_size == 32


def test_checkpoint_size_is_the_saved_state_dict():
    cfg = _cfg()
    model = build_model(cfg)
    plan = plan_config(cfg)
    assert plan.checkpoint_bytes == state_dict_bytes(model)
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert tensor_bytes <= plan.checkpoint_bytes < tensor_bytes + 200_000


def test_flops_scale_about_4x_from_32_to_64_pixels():
    model = build_model(_cfg())
    f32, f64 = forward_flops(model, 32), forward_flops(model, 64)
    assert f32 > 0
    assert 3.8 < f64 / f32 < 4.05  # convolutions scale with the pixel count; the classifier does not
    # the tiny-imagenet plan uses 64x64 images
    tiny = from_dict({"model": TINY["model"], "data": {"dataset": "tiny-imagenet"}})
    plan = plan_config(tiny)
    assert plan.input_size == DATASETS["tiny-imagenet"].image_size == 64


def test_flops_match_a_hand_count_of_one_convolution():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert forward_flops(conv, 32) == 2 * 8 * 3 * 9 * 32 * 32  # FlopCounterMode: a multiply-add is 2 FLOPs


def test_predicted_time_is_flops_over_40_percent_of_h200_peak():
    plan = plan_config(_cfg())
    assert H200_BF16_DENSE_FLOPS == 989e12 and UTILISATION == 0.4
    for stage in plan.stages:
        assert stage.seconds == pytest.approx(stage.flops / (0.4 * 989e12), rel=1e-12)
        assert stage.flops > 0
    assert predicted_seconds(0.4 * 989e12) == pytest.approx(1.0)
    assert [s.name for s in plan.stages] == ["training", "MRC", "fine-tuning", "interpolation", "evaluation"]


def test_stage_formulas_follow_the_config_counts():
    cfg = _cfg()
    cfg.train.epochs, cfg.train.attack.num_steps, cfg.train.eval_attack_steps = 3, 5, 2
    cfg.mrc.num_iterations, cfg.mrc.num_examples, cfg.mrc.attack.num_steps = 2, 64, 4
    cfg.finetune.epochs = 4
    cfg.interpolation.alphas = [0.0, 0.5, 1.0]
    cfg.eval.selection_attack_steps, cfg.eval.selection_restarts = 3, 1
    plan = plan_config(cfg)
    f = plan.forward_flops
    by = {s.name: s.flops for s in plan.stages}
    assert by["training"] == pytest.approx(3 * (200 * 6 * 3 * f + 50 * 3 * 3 * f))
    assert by["MRC"] == pytest.approx(21 * 2 * 64 * 3 * f + 64 * 4 * 3 * f)
    assert by["fine-tuning"] == pytest.approx(4 * 200 * 3 * f)
    assert by["interpolation"] == pytest.approx(3 * 50 * 4 * 3 * f)
    # more attack steps make evaluation dearer
    cfg.eval.attack.num_steps = 20
    assert {s.name: s.flops for s in plan_config(cfg).stages}["evaluation"] > by["evaluation"]


def test_full_dataset_size_when_no_subset():
    cfg = from_dict({"model": TINY["model"], "data": {"dataset": "tiny-imagenet", "val_size": 1000}})
    cfg.finetune.epochs = 1
    plan = plan_config(cfg)
    ft = next(s for s in plan.stages if s.name == "fine-tuning")
    assert ft.flops == pytest.approx(99_000 * 3 * plan.forward_flops)
    assert "99,000 img" in ft.work


def test_format_has_every_row():
    text = format_plan(plan_config(_cfg()))
    for row in ("| MRC modules | 21 |", "| parameters |", "| checkpoint size |", "| forward FLOPs / image |",
                "| training |", "| MRC |", "| fine-tuning |", "| interpolation |", "| evaluation |", "| total |"):
        assert row in text


def test_plan_cli_touches_nothing_and_refuses_bad_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {arch: resnet18, width: 4}\nrun_dir: " + str(tmp_path / "run") + "\n"
                   "data: {root: " + str(tmp_path / "nodata") + "}\n")
    ok = subprocess.run([sys.executable, "-m", "rift_dist.cli", "plan", str(cfg), "--set", "data.train_subset=100"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| MRC modules | 21 |" in ok.stdout and "100 img" in ok.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no run dir, no MLflow store, no data
    bad = subprocess.run([sys.executable, "-m", "rift_dist.cli", "plan", str(cfg), "--set", "train.epochs=0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "train.epochs" in bad.stderr
