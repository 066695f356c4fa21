"""The three figures a researcher shows: labelled axes, the rule and the settings written on them."""

from __future__ import annotations

from rift_dist.stages.criticality import plot_table
from rift_dist.stages.evaluation import plot_at_vs_rift
from rift_dist.stages.interpolation import plot_curve


def test_mrc_figure_labels_legend_and_caption(tmp_path):
    rows = [{"module": m, "mrc": v} for m, v in (("conv1", 0.0), ("layer1.0.conv1", 0.2), ("linear", 0.9))]
    texts = plot_table(tmp_path / "mrc.png", rows, ["conv1", "layer1.0.conv1", "linear"], ["conv1"],
                       "eps_w = 0.1 (relative), 512 images; cifar10, resnet18")
    assert (tmp_path / "mrc.png").stat().st_size > 10_000
    assert texts["xlabel"].startswith("module") and "cross-entropy" in texts["ylabel"]
    assert any("conv1" in t and "fine-tuned" in t for t in texts["legend"])
    assert "eps_w = 0.1" in texts["caption"] and "512 images" in texts["caption"] and "cifar10" in texts["caption"]


def test_interpolation_figure_draws_the_selection_rule_and_names_split_n_and_attack(tmp_path):
    rows = [{"alpha": a, "clean_accuracy": c, "robust_accuracy": r}
            for a, c, r in ((0.0, 0.80, 0.50), (0.5, 0.84, 0.50), (1.0, 0.86, 0.40))]
    texts = plot_curve(tmp_path / "interp.png", rows, 0.5, at_robust=0.50, tolerance=0.001, split="val", n=1000,
                       attack="PGD-10, worst of 1")
    assert (tmp_path / "interp.png").stat().st_size > 10_000
    assert any("AT robust - 0.1 pp" in t for t in texts["legend"])
    assert any("PGD-10" in t for t in texts["legend"]) and any("alpha* = 0.5" in t for t in texts["legend"])
    assert "val split" in texts["title"] and "n = 1000" in texts["title"] and "s.e." in texts["title"]


def test_at_vs_rift_figure(tmp_path):
    summary = {"at": {"clean_accuracy": 0.80, "robust_accuracy": 0.50, "corruption_accuracy": 0.70},
               "rift": {"clean_accuracy": 0.83, "robust_accuracy": 0.50, "corruption_accuracy": 0.72},
               "test_examples": 10000, "modules": ["layer2.1.conv2"], "alpha": 0.6,
               "pgd": {"num_steps": 10, "restarts": 3}}
    texts = plot_at_vs_rift(tmp_path / "avr.png", summary)
    assert (tmp_path / "avr.png").stat().st_size > 10_000
    assert texts["legend"] == ["AT", "RiFT"] and "n = 10000" in texts["title"] and "layer2.1.conv2" in texts["title"]
    same = plot_at_vs_rift(tmp_path / "same.png", {**summary, "alpha": 0.0})
    assert "RiFT = AT" in same["title"]
