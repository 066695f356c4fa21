"""Trusted evaluation (issue: evaluation a reviewer trusts): AutoAttack, aggregation, resume, sanity checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from rift_dist.config import ConfigError, from_dict
from rift_dist.data.sources import ArrayDataset
from rift_dist.parallel.runtime import Runtime
from rift_dist.models import build_model_from
from rift_dist.precision import resolve_precision
from rift_dist.eval.autoattack import autoattack_steps
from rift_dist.eval.protocol import (
    CLEAN_WRONG, NOT_DONE, ROBUST, PGDAttack, ProgressFile, evaluate_model, evaluate_sequence, robustness_suite,
    run_attack_sequence, validate_eval_config,
)
from rift_dist.eval.sanity import sanity_checks
from rift_dist.stages.context import StageContext
from rift_dist.tracking import Tracker

EPS = 8 / 255


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is several times faster than many on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_ctx(tmp_path, eval_cfg=None, batch=8) -> StageContext:
    cfg = from_dict({"eval": eval_cfg or {}, "data": {"eval_batch_size": batch, "loader": "torch"},
                     "tracking": {"enabled": False}, "precision": {"autocast": "none", "channels_last": "off"},
                     "device": "cpu"})
    return StageContext(cfg, tmp_path, Runtime(cfg), Tracker(cfg, tmp_path, active=False),
                        resolve_precision(cfg.precision, "cpu"), progress=False)


def linear_model(classes=4, size=8, seed=0) -> nn.Module:
    """A linear classifier on size x size images: attacks succeed on some samples and not others."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, classes))
    with torch.no_grad():
        model[1].weight.normal_(0, 0.1)
        model[1].bias.zero_()
    return model


def dataset_for(model, n=40, size=8, seed=1, classes=4) -> ArrayDataset:
    """Random uint8 images labelled with the model's own prediction (clean accuracy 100%), a few flipped."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        labels = model(x).argmax(1).numpy().astype(np.int64)
    labels[::7] = (labels[::7] + 1) % classes  # some clean mistakes
    return ArrayDataset(images, labels, [str(c) for c in range(classes)], "test fixture")


# ------------------------------------------------------------------------------ aggregation


class Marker(nn.Module):
    """Two classes decided by one pixel: class 0 when x[0, 0, 0] > 0.5."""

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack([v - 0.5, 0.5 - v], 1) * 100


class FakeAttack:
    """Succeeds exactly on the samples whose global index is in ``targets`` (moves the marker pixel by ``shift``)."""

    def __init__(self, name, targets, shift=EPS):
        self.name, self.targets, self.shift, self.epsilon, self.settings = name, set(targets), shift, EPS, {}
        self.seen: list[int] = []

    def __call__(self, model, images, labels, indices, seed):
        self.seen += indices.tolist()
        out = images.clone()
        for row, i in enumerate(indices.tolist()):
            if i in self.targets:
                out[row, 0, 0, 0] -= self.shift
        return out


def marker_batch(n=12):
    x = torch.full((n, 3, 4, 4), 0.2)
    x[:, 0, 0, 0] = 0.51
    x[4, 0, 0, 0] = 0.49  # misclassified on the clean input
    x[10, 0, 0, 0] = 0.55  # out of reach of a legal perturbation
    return x, torch.zeros(n, dtype=torch.int64)


def test_robust_only_if_survives_every_attack():
    x, y = marker_batch()
    attacks = [FakeAttack("a", {0, 1, 2}), FakeAttack("b", {5, 6}), FakeAttack("c", {9})]
    outcome, outside = run_attack_sequence(Marker(), x, y, attacks)
    # later attacks only see samples still robust
    assert not set(attacks[1].seen) & {0, 1, 2, 4} and not set(attacks[2].seen) & {0, 1, 2, 4, 5, 6}
    assert outcome[4] == CLEAN_WRONG
    assert outcome[[0, 1, 2]].tolist() == [0, 0, 0] and outcome[[5, 6]].tolist() == [1, 1] and outcome[9] == 2
    robust = (outcome == ROBUST).float().mean().item()
    assert robust == pytest.approx(5 / 12)  # 12 - 1 wrong - 3 - 2 - 1
    singles = [(run_attack_sequence(Marker(), x, y, [a])[0] == ROBUST).float().mean().item() for a in attacks]
    assert singles == pytest.approx([8 / 12, 9 / 12, 10 / 12])
    assert robust <= min(singles)  # never an average of per-attack accuracies
    assert outside.sum() == 0


def test_attack_leaving_the_threat_model_is_clamped_and_counted():
    x, y = marker_batch()
    cheat = FakeAttack("cheat", {10}, shift=2 * EPS)  # would cross 0.5 only from outside the ball
    outcome, outside = run_attack_sequence(Marker(), x, y, [cheat])
    assert outcome[10] == ROBUST and outside[10] == 1 and outside.sum() == 1


def test_evaluate_sequence_counts_and_breakdown(tmp_path):
    x, y = marker_batch()
    images = (x.permute(0, 2, 3, 1) * 255).round().numpy().astype(np.uint8)
    ds = ArrayDataset(images, y.numpy(), ["0", "1"])
    # uint8 rounding: 0.51 -> 130/255 = 0.5098, 0.49 -> 125/255; a shift of 8/255 still crosses 0.5
    res = evaluate_sequence(make_ctx(tmp_path, batch=5), Marker(), ds,
                            [FakeAttack("a", {0, 1, 2}), FakeAttack("b", {5, 6})], "marker")
    assert res["clean_accuracy"] == pytest.approx(11 / 12) and res["robust_accuracy"] == pytest.approx(6 / 12)
    assert [r["robust_after"] for r in res["attacks"]] == pytest.approx([8 / 12, 6 / 12])
    assert res["robust_accuracy"] <= min(r["robust_after"] for r in res["attacks"])


# ------------------------------------------------------------------------------ AutoAttack


def test_autoattack_runs_on_a_four_class_resnet():
    torch.manual_seed(0)
    model = build_model_from("resnet18", 4, width=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    model.train()
    model.layer1.eval()  # a mixed mode must come back as it was
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    attacks, notes = autoattack_steps(EPS, 4, steps=3, queries=10)
    assert [a.name for a in attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"] and not notes
    assert attacks[1].settings["n_target_classes"] == 3 and attacks[2].settings["n_target_classes"] == 3
    rng = torch.get_rng_state()
    outcome, outside = run_attack_sequence(model, x, y, attacks, seed=5)
    assert outcome.shape == (4,) and outside.sum() == 0
    assert torch.equal(rng, torch.get_rng_state())  # torchattacks' global re-seeding is undone
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert autoattack_steps(EPS, 10)[0][1].settings["n_target_classes"] == 9
    assert autoattack_steps(EPS, 3)[1]  # APGD-T's DLR loss needs 4 classes: skipped with a note


def test_autoattack_outputs_in_box_ball_and_seeded():
    model = linear_model()
    ds = dataset_for(model, n=12)
    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(ds.labels)
    for attack in autoattack_steps(EPS, 4, steps=4, queries=30)[0]:
        a1 = attack(model, x, y, torch.arange(12), 7)
        a2 = attack(model, x, y, torch.arange(12), 7)
        assert torch.equal(a1, a2), attack.name  # explicit seed: reproducible
        assert a1.min() >= 0 and a1.max() <= 1, attack.name
        assert (a1 - x).abs().max() <= EPS + 1e-6, attack.name
    outcome, _ = run_attack_sequence(model, x, y, autoattack_steps(EPS, 4, steps=4, queries=30)[0])
    assert (outcome >= 0).any()  # it does break the linear model


# ------------------------------------------------------------------------------ PGD protocol


def test_sequence_pgd_equals_evaluate_model(tmp_path):
    model = linear_model()
    ds = dataset_for(model, n=24)
    ctx = make_ctx(tmp_path, {"restarts": 3})
    cfg = ctx.cfg
    ref = evaluate_model(ctx, model, ds, cfg.eval.attack, cfg.eval.restarts, seed=11)
    attack = PGDAttack(EPS, 2 / 255, cfg.eval.attack.num_steps, 3, "ce", noise_seed=11)
    res = evaluate_sequence(ctx, model, ds, [attack], "pgd", 11)
    assert res["clean_accuracy"] == ref["clean_accuracy"] and res["robust_accuracy"] == ref["robust_accuracy"]
    assert attack.settings["restarts"] == 3 and attack.name == "pgd-10"
    assert PGDAttack(EPS, 2 / 255, 20, loss="margin").name == "pgd-20-margin"


# ------------------------------------------------------------------------------ resume


class Killed(RuntimeError):
    pass


def test_killed_evaluation_resumes_to_the_same_result(tmp_path):
    model = linear_model()
    ds = dataset_for(model, n=40)
    attacks = autoattack_steps(2 / 255, 4, steps=4, queries=20)[0]
    full = evaluate_sequence(make_ctx(tmp_path / "a"), model, ds, attacks, "aa", 3, tmp_path / "a" / "progress")

    def kill_after_two(done):
        if done == 2:
            raise Killed

    ctx = make_ctx(tmp_path / "b")
    with pytest.raises(Killed):
        evaluate_sequence(ctx, model, ds, attacks, "aa", 3, tmp_path / "b" / "progress", on_batch=kill_after_two)
    saved = np.load(tmp_path / "b" / "progress" / "aa.rank0.npz")
    assert (saved["outcome"] != NOT_DONE).sum() == 16  # two batches of 8 recorded, the rest not done
    calls = []
    resumed = evaluate_sequence(ctx, model, ds, attacks, "aa", 3, tmp_path / "b" / "progress", on_batch=calls.append)
    assert resumed["resumed_examples"] == 16 and len(calls) == 3  # only the 24 remaining images were attacked
    for key in ("clean_accuracy", "robust_accuracy", "num_examples"):
        assert resumed[key] == full[key]
    assert [r["robust_after"] for r in resumed["attacks"]] == [r["robust_after"] for r in full["attacks"]]
    # other weights: the progress file is ignored, not reused
    other = linear_model(seed=5)
    fresh = evaluate_sequence(ctx, other, ds, attacks[:1], "aa", 3, tmp_path / "b" / "progress")
    assert fresh["resumed_examples"] == 0


class OneRankOf:
    """A runtime that is rank ``rank`` of ``world_size`` (collectives are identities): one shard of a sharded run."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.device, self.is_main = rank, world_size, torch.device("cpu"), rank == 0

    def all_reduce_sum(self, t):
        return t

    def barrier(self):
        pass


def test_shards_add_up_and_resume_across_world_sizes(tmp_path):
    model = linear_model()
    ds = dataset_for(model, n=30)
    attacks = [PGDAttack(EPS, 2 / 255, 5, 2, noise_seed=4)]
    single = evaluate_sequence(make_ctx(tmp_path / "s"), model, ds, attacks, "pgd", 4)
    shards = []
    for rank in range(3):
        ctx = make_ctx(tmp_path / "r")
        ctx.runtime = OneRankOf(rank, 3)
        shards.append(evaluate_sequence(ctx, model, ds, attacks, "pgd", 4, tmp_path / "r" / "progress"))
    assert sum(s["num_examples"] for s in shards) == 30
    robust = sum(s["robust_accuracy"] * s["num_examples"] for s in shards) / 30
    assert robust == pytest.approx(single["robust_accuracy"])  # summed counts equal one process
    # a 1-process run over the 3-rank progress files resumes all of it, with the same result
    ctx = make_ctx(tmp_path / "r")
    again = evaluate_sequence(ctx, model, ds, attacks, "pgd", 4, tmp_path / "r" / "progress")
    assert again["resumed_examples"] == 30 and again["robust_accuracy"] == single["robust_accuracy"]


def test_progress_merges_rank_files(tmp_path):
    sig = {"x": 1}
    ProgressFile(tmp_path, "e", sig, 6, rank=0).save(np.array([0, -1, -3, -3, -3, -3], np.int8), np.zeros(6, np.int64))
    ProgressFile(tmp_path, "e", sig, 6, rank=1).save(np.array([-3, -3, -3, -2, 1, -3], np.int8), np.zeros(6, np.int64))
    ProgressFile(tmp_path, "e", {"x": 2}, 6, rank=2).save(np.zeros(6, np.int8), np.zeros(6, np.int64))
    outcome, _, notes = ProgressFile(tmp_path, "e", sig, 6).load()
    assert outcome.tolist() == [0, -1, -3, -2, 1, -3] and len(notes) == 1


# ------------------------------------------------------------------------------ sanity checks


class ZeroGrad(torch.autograd.Function):
    """Identity forward, zero backward: masks every input gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Masked(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(ZeroGrad.apply(x))


def suite_for(tmp_path, model, ds, **eval_cfg):
    cfg = {"autoattack": False, "extra_pgd_steps": [], "margin_pgd_steps": 0, "restarts": 1,
           "sanity_square_queries": 300, "sanity_examples": 40, **eval_cfg}
    return robustness_suite(make_ctx(tmp_path, cfg), model, ds, "m", tmp_path / "progress")


def test_gradient_masking_is_flagged(tmp_path):
    net = linear_model()
    ds = dataset_for(net, n=40)
    honest = suite_for(tmp_path / "honest", net, ds)
    masked = suite_for(tmp_path / "masked", Masked(net), ds)
    assert honest["sanity"]["passed"], honest["sanity"]
    assert not masked["sanity"]["passed"]
    assert "square_not_better_than_gradients" in masked["sanity"]["failed"]
    # masking inflates PGD robustness; the checks still hold the structural facts
    assert masked["robust_accuracy"] > honest["robust_accuracy"]
    checks = {c["name"]: c["passed"] for c in masked["sanity"]["checks"]}
    assert checks["robust_le_clean"] and checks["epsilon0_equals_clean"]


def test_sanity_checks_on_figures():
    good = {"clean_accuracy": 0.8, "robust": {"pgd-10": 0.5, "autoattack": 0.47},
            "epsilon_sweep": [(0.0, 0.8), (4 / 255, 0.65), (8 / 255, 0.5), (16 / 255, 0.2)],
            "epsilon0_accuracy": 0.8, "square_gain": 0.001, "autoattack_accuracy": 0.47, "pgd_accuracy": 0.5}
    assert sanity_checks(good)["passed"]
    bad = {**good, "robust": {"pgd-10": 0.85}, "epsilon_sweep": [(4 / 255, 0.5), (8 / 255, 0.6), (16 / 255, 0.8)],
           "epsilon0_accuracy": 0.79, "square_gain": 0.2, "autoattack_accuracy": 0.7, "violations": 3}
    failed = set(sanity_checks(bad)["failed"])
    assert failed == {"robust_le_clean", "falls_with_epsilon", "largest_epsilon_breaks", "epsilon0_equals_clean",
                      "square_not_better_than_gradients", "autoattack_le_pgd", "attacks_in_threat_model"}


def test_sanity_checks_compare_margin_pgd_with_ce_pgd():
    """A model at 8.6 % CE-PGD but 3.1 % margin-PGD used to pass every check; the CE attack is weak there."""
    base = {"clean_accuracy": 0.40, "robust": {"pgd-10": 0.086, "pgd-20-margin": 0.031},
            "epsilon_sweep": [(4 / 255, 0.2), (8 / 255, 0.086), (16 / 255, 0.01)], "epsilon0_accuracy": 0.40,
            "square_gain": 0.0, "pgd_accuracy": 0.086, "margin_accuracy": 0.031}
    result = sanity_checks(base)
    assert result["failed"] == ["margin_pgd_agrees_with_ce_pgd"]
    detail = next(c["detail"] for c in result["checks"] if c["name"] == "margin_pgd_agrees_with_ce_pgd")
    assert "margin" in detail and "report the margin-loss figure" in detail
    assert sanity_checks({**base, "margin_accuracy": 0.080})["passed"]  # within 2 pp: agrees
    unrun = sanity_checks({**base, "margin_accuracy": None})
    assert unrun["passed"] and any(c["passed"] is None for c in unrun["checks"]
                                   if c["name"] == "margin_pgd_agrees_with_ce_pgd")


def test_suite_reports_settings_and_autoattack(tmp_path):
    net = linear_model()
    ds = dataset_for(net, n=16)
    res = suite_for(tmp_path, net, ds, autoattack=True, autoattack_steps=3, autoattack_queries=20,
                    extra_pgd_steps=[20], margin_pgd_steps=5, n_examples=16)
    assert set(res["pgd"]) == {"pgd-10", "pgd-20", "pgd-5-margin"}
    assert res["pgd"]["pgd-5-margin"]["attacks"][0]["settings"]["loss"] == "margin"
    assert [a["name"] for a in res["autoattack"]["attacks"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert res["autoattack_accuracy"] <= res["clean_accuracy"]
    assert [p["epsilon"] for p in res["epsilon_sweep"]] == sorted(p["epsilon"] for p in res["epsilon_sweep"])
    json.dumps(res)  # the report is JSON-able


def test_eval_config_validation():
    cfg = from_dict({"eval": {"corruption_protocol": "paper"}})
    with pytest.raises(ConfigError, match="corruption_protocol"):
        validate_eval_config(cfg)
    with pytest.raises(ConfigError, match="apgd-dlr"):
        validate_eval_config(from_dict({"eval": {"autoattack_attacks": ["apgd-dlr"]}}))
    validate_eval_config(from_dict({"eval": {"corruption_protocol": "both"}}))


# ------------------------------------------------------------------------------ corruption protocols


def test_corruption_protocols_and_resume(tmp_path):
    from rift_dist.data.corruptions import AUTHORS_USED_CORRUPTIONS
    from rift_dist.eval.corruption import corruption_plan, evaluate_corruptions

    cfg = from_dict({"data": {"dataset": "tiny-imagenet", "corruptions": ["fog"], "severities": [2, 5]},
                     "eval": {"corruption_protocol": "both"}})
    plan = corruption_plan(cfg)
    assert plan["standard"] == (["fog"], [2, 5])
    assert plan["authors"] == (list(AUTHORS_USED_CORRUPTIONS), [1]) and len(plan["authors"][0]) == 18
    assert "glass_blur" not in plan["authors"][0]

    model = linear_model()
    ctx = make_ctx(tmp_path, {"corruption_protocol": "both"})
    ctx.cfg.data.corruptions, ctx.cfg.data.severities = ["fog"], [1, 2]
    sets = [(name, s, dataset_for(model, n=8, seed=10 * s + len(name))) for name in ("fog", "snow") for s in (1, 2)]
    res = evaluate_corruptions(ctx, model, sets, "m", tmp_path / "progress")
    table = res["per_set"]
    assert set(res["per_corruption"]) == {"fog", "snow"} and set(res["per_severity"]) == {"1", "2"}
    assert res["protocols"]["standard"]["mean"] == pytest.approx((table["fog/1"] + table["fog/2"]) / 2)
    assert res["protocols"]["authors"]["mean"] == pytest.approx(sum(table.values()) / 4)  # fog, snow at 1-5
    assert res["corruption_accuracy"] == res["protocols"]["standard"]["mean"]
    saved = json.loads((tmp_path / "progress" / "m-corruptions.json").read_text())
    assert saved["per_set"] == table
    real = table["fog/1"]
    saved["per_set"]["fog/1"] = 0.123
    # an edit that does not match the file's checksum (a flipped byte) is found: the sets are evaluated again
    (tmp_path / "progress" / "m-corruptions.json").write_text(json.dumps(saved))
    assert evaluate_corruptions(ctx, model, sets, "m", tmp_path / "progress")["per_set"]["fog/1"] == real
    # a resumed run takes finished sets from a valid progress file
    from rift_dist.atomic import write_json

    write_json(tmp_path / "progress" / "m-corruptions.json", saved)
    assert evaluate_corruptions(ctx, model, sets, "m", tmp_path / "progress")["per_set"]["fog/1"] == 0.123


def test_missing_corruption_files_surface(tmp_path):
    from rift_dist.data.sources import DataError
    from rift_dist.eval.corruption import corruption_sets

    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    np.save(root / "labels.npy", np.zeros(10, np.uint8))
    np.save(root / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    ctx = make_ctx(tmp_path)
    ctx.cfg.data.corruption_root, ctx.cfg.data.corruptions = str(root), ["fog", "snow", "frost"]
    with pytest.raises(DataError, match=r"missing 2 file\(s\).*snow.npy.*frost.npy"):
        corruption_sets(ctx)
