"""rift compare (issue 16): trainable sets, logit mixing, the Pareto front, the paired-difference intervals."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rift_dist import compare
from rift_dist.config import ConfigError, load_config
from rift_dist.models import build_model, get_module, module_names
from rift_dist.stages import finetune

ROOT = Path(__file__).resolve().parents[2]


def tiny_model():
    cfg = load_config(None, ["model.width=4"])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def fake_mrc(names):
    return [{"module": n, "mrc": float(i), "num_params": 1} for i, n in enumerate(names)]  # network order = MRC order


def test_each_method_chooses_what_it_claims():
    _, model = tiny_model()
    names = module_names(model)
    rows = fake_mrc(names)
    assert compare.method_modules("rift", rows, names, [], 0) == [names[0]]
    assert compare.method_modules("rift", rows, names, ["first"], 0) == [names[1]]
    assert compare.method_modules("rift", rows, names, [], 0, ["layer2.1.conv2"]) == ["layer2.1.conv2"]
    assert compare.method_modules("most-critical", rows, names, [], 0) == [names[-1]]
    assert compare.method_modules("most-critical", rows, names, ["last"], 0) == [names[-2]]
    assert compare.method_modules("top-3", rows, names, [], 0) == names[:3]
    assert compare.method_modules("all-layers", rows, names, [], 0) is None
    draws = {tuple(compare.method_modules("random-module", rows, names, [], s)) for s in range(8)}
    assert compare.method_modules("random-module", rows, names, [], 3) == compare.method_modules(
        "random-module", rows, names, [], 3)  # seeded
    assert len(draws) > 1  # and not a constant
    with pytest.raises(compare.CompareError, match="top-<k> with k <= 21"):
        compare.method_modules("top-40", rows, names, [], 0)


def test_the_config_refuses_an_unknown_method():
    with pytest.raises(ConfigError, match="compare.methods.*top-1.*each method must be one of"):
        load_config(None, ["compare.methods=[rift,top-1]"])
    assert load_config(None, ["compare.methods=[rift,top-7]"]).compare.methods == ["rift", "top-7"]


@pytest.mark.parametrize("method,freeze_bn", [("rift", False), ("top-2", True), ("all-layers", False)])
def test_only_the_trainable_set_moves_and_bn_follows_the_setting(method, freeze_bn):
    """A few SGD steps on random data with finetune.trainable_parameters, the stage's own selection."""
    _, model = tiny_model()
    names = module_names(model)
    modules = compare.method_modules(method, fake_mrc(names), names, [], 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = finetune.trainable_parameters(model, modules or [], all_parameters=modules is None)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    if freeze_bn:
        model.apply(lambda m: m.eval() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None)
    for _ in range(2):
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    trained = {f"{m}.weight" for m in modules} if modules is not None else {n for n, _ in model.named_parameters()}
    for key, value in after.items():
        is_bn_stat = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        if is_bn_stat:
            assert torch.equal(value, before[key]) == freeze_bn, key
        elif key in trained:
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key  # bit-identical
    assert sum(p.requires_grad for p in model.parameters()) == len(trained)


def test_logit_mix_at_0_and_1_is_exactly_the_at_and_ft_model():
    _, at = tiny_model()
    torch.manual_seed(1)
    _, ft = tiny_model()
    for p in ft.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    at.eval(), ft.eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        za, zf = at(x), ft(x)
        assert torch.equal(compare.LogitMix(at, ft, 0.0)(x), za)
        assert torch.equal(compare.LogitMix(at, ft, 1.0)(x), zf)
        assert torch.allclose(compare.LogitMix(at, ft, 0.25)(x), 0.75 * za + 0.25 * zf)
    with pytest.raises(ValueError, match="alpha must be in"):
        compare.LogitMix(at, ft, 1.5)


def test_pareto_front_of_a_hand_made_table():
    pts = [(0.80, 0.50), (0.82, 0.49), (0.79, 0.51), (0.78, 0.49), (0.82, 0.48), (0.80, 0.50)]
    # (0.78, 0.49) is dominated by (0.80, 0.50); (0.82, 0.48) by (0.82, 0.49); the duplicate (0.80, 0.50) stays
    assert compare.pareto_front(pts) == [True, True, True, False, False, True]


def test_paired_difference_matches_a_hand_computation():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    b = np.array([1, 0, 0, 1, 1, 1, 0, 0, 1, 0], dtype=float)
    d = compare.paired_difference(a, b, 0.95, per_image=True)
    n, disc_b, disc_c = 10, 3, 1  # a right / b wrong: 3 images, a wrong / b right: 1
    assert d["mean"] == pytest.approx((disc_b - disc_c) / n)
    se = math.sqrt(disc_b + disc_c - (disc_b - disc_c) ** 2 / n) / n  # McNemar-style
    assert d["se"] == pytest.approx(se)
    assert d["high"] - d["mean"] == pytest.approx(1.959964 * se, rel=1e-5)
    seeds = compare.paired_difference([0.84, 0.83, 0.85], [0.82, 0.82, 0.82], 0.95, per_image=False)
    diffs = [0.02, 0.01, 0.03]
    sd = math.sqrt(sum((x - 0.02) ** 2 for x in diffs) / 2)
    assert seeds["mean"] == pytest.approx(0.02) and seeds["se"] == pytest.approx(sd / math.sqrt(3))
    assert seeds["high"] - seeds["mean"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        compare.paired_difference([0.8], [0.7], per_image=False)


def test_noise_verdict_reads_the_intervals():
    inside = [{"method": "top-2", "delta_rift_clean": {"mean": 0.01, "low": -0.01, "high": 0.03}}]
    outside = [{"method": "all-layers", "delta_rift_robust": {"mean": -0.05, "low": -0.08, "high": -0.02}}]
    assert "inside the sampling noise" in compare.noise_verdict(inside)[0]
    text, out = compare.noise_verdict(outside)
    assert out == ["all-layers robust -5.00 pp"] and "outside" in text


def test_dry_run_of_a_paper_config_prints_the_plan_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rift_dist.cli", "compare", "configs/cifar10_resnet18.yaml",
                           "--run-dir", str(tmp_path / "run"), "--dry-run"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "resnet18 (21 modules, 11,173,962 parameters)" in out and "110 epochs" in out
    for m in ("rift", "most-critical", "random-module", "top-2", "top-3", "top-5", "all-layers", "logit-mix"):
        assert f"    {m} " in out
    assert "fine-tunings per seed: 7" in out and "81 validation evaluations" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, named", [("data.corruptions=[nosuch]", "nosuch"),
                                            ("eval.corruption_protocol=bogus", "corruption_protocol")])
def test_compare_refuses_what_rift_run_refuses_and_writes_nothing(tmp_path, setting, named):
    """rift compare makes rift run's checks (corruption names, the eval section) before it writes anything;
    it accepted both settings and would have failed at the first evaluation."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rift_dist.cli", "compare", "configs/compare_default.yaml",
                           "--run-dir", str(run_dir), "--set", setting], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not run_dir.exists()
