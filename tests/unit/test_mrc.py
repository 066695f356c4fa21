"""MRC (RiFT Eq. 2): the ball, eps_w = 0, a module that barely matters vs a critical one, the table,
cached == plain computation, and the distributed assignment."""

import math

import pytest
import torch
from torch import nn

from rift_dist.models import build_model_from, list_modules
from rift_dist.stages.criticality import (
    assign_modules, choose_modules, module_costs, module_criticality, unit_index, unit_inputs,
)


class Toy(nn.Module):
    """A tiny net with the units() chain the MRC cache needs."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def units(self):
        return [("fc1", ["fc1."], lambda x: torch.relu(self.fc1(x))),
                ("fc2", ["fc2."], lambda x: torch.relu(self.fc2(x))),
                ("head", ["head."], self.head)]

    def forward(self, x):
        for _, _, f in self.units():
            x = f(x)
        return x


def _toy_data():
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = torch.randint(0, 4, (256,))
    return x, y


def test_perturbation_stays_in_ball():
    model = Toy()
    x, y = _toy_data()
    norms = []
    module_criticality(model, "fc2", x, y, k=0, epsilon_w=0.1, num_iterations=5, batch_size=64,
                       on_pass=lambda t, dw, r: norms.append((dw.norm().item(), r)))
    assert len(norms) == 5
    assert all(n <= r * (1 + 1e-5) for n, r in norms)
    assert norms[-1][0] > 0.5 * norms[-1][1]  # lr 1 ascent reaches the boundary


def test_weights_restored_and_zero_radius():
    model = Toy()
    x, y = _toy_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = module_criticality(model, "fc1", x, y, k=0, epsilon_w=0.0, num_iterations=3)
    assert row["mrc"] == 0.0 and row["robust_accuracy_drop"] == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in model.parameters())


def test_barely_used_module_is_less_critical():
    model = Toy()
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)   # fc2 barely matters: its relative ball is tiny in absolute size
        model.fc2.bias.zero_()
        model.fc2.bias.add_(1.0)
    x, y = _toy_data()
    low = module_criticality(model, "fc2", x, y, k=0, num_iterations=5)["mrc"]
    high = module_criticality(model, "head", x, y, k=0, num_iterations=5)["mrc"]
    assert 0 <= low < high


def test_zero_initialised_last_layer_vs_critical_layer():
    torch.manual_seed(0)
    model = Toy()
    x, y = _toy_data()
    with torch.no_grad():
        model.head.weight.zero_()  # ||W0|| = 0: no room to perturb
    mrc_head = module_criticality(model, "head", x, y, k=0, num_iterations=3)["mrc"]
    mrc_fc1 = module_criticality(model, "fc1", x, y, k=0, num_iterations=3)["mrc"]
    assert mrc_head == 0.0
    assert mrc_fc1 >= 0.0


@pytest.mark.parametrize("arch", ["resnet18", "wrn34_10"])
def test_cached_equals_plain(arch):
    torch.manual_seed(0)
    model = build_model_from(arch, 10, width=4, widen_factor=1, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    x = torch.rand(48, 3, 32, 32)
    y = torch.randint(0, 10, (48,))
    names = [n for n, _ in list_modules(model)]
    picks = [names[0], names[len(names) // 2], names[-2], names[-1]]
    for name in picks:
        k = unit_index(model, name)
        cache = unit_inputs(model, k, x, 16, __import__("contextlib").nullcontext, torch.float32)
        kw = dict(num_iterations=3, batch_size=16, seed=5)
        plain = module_criticality(model, name, x, y, k=0, **kw)
        cached = module_criticality(model, name, cache, y, k=k, **kw)
        assert math.isclose(plain["mrc"], cached["mrc"], rel_tol=1e-4, abs_tol=1e-5), (name, plain, cached)
        assert plain["robust_accuracy_drop"] == pytest.approx(cached["robust_accuracy_drop"], abs=1 / 48 + 1e-9)


def test_assignment_balanced_contiguous_and_complete():
    model = build_model_from("wrn34_10", 10, widen_factor=1)
    names = [n for n, _ in list_modules(model)]
    costs = module_costs(model, names, (3, 32, 32))
    assert costs[names[0]] > costs[names[-1]]  # the stem's MRC runs the whole net
    for world in (1, 2, 3, 7, 40):
        groups = assign_modules(names, costs, world)
        flat = [n for g in groups for n in g]
        assert flat == names and len(groups) == world  # each module once, contiguous order
    groups = assign_modules(names, costs, 2)
    loads = [sum(costs[n] for n in g) for g in groups]
    assert max(loads) / (sum(loads) / 2) < 1.3


def test_choose_modules():
    rows = [{"module": m, "mrc": v} for m, v in [("conv1", 0.01), ("a", 0.5), ("b", 0.2), ("linear", 0.05)]]
    order = ["conv1", "a", "b", "linear"]
    assert choose_modules(rows, order, [], 1) == ["conv1"]
    assert choose_modules(rows, order, ["first", "last"], 1) == ["b"]
    assert choose_modules(rows, order, ["first"], 2) == ["linear", "b"]
    with pytest.raises(Exception, match="not a module"):
        choose_modules(rows, order, ["nope"], 1)


# ------------------------------------------------------------------------------ the fast engine


def _small_resnet(width=4, seed=0):
    torch.manual_seed(seed)
    model = build_model_from("resnet18", 10, width=width, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        model(torch.rand(64, 3, 32, 32))
    return model.eval()


def test_fused_evaluation_equals_separate_evaluations():
    """One mini-batch holds the set: pass t+1's forward is pass t's evaluation (same iterates, same values)."""
    model = _small_resnet()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for name in ("conv1", "layer3.0.shortcut.0", "linear"):
        for early in (False, True):
            seen = {True: [], False: []}
            rows = {f: module_criticality(model, name, x, y, k=0, num_iterations=3, batch_size=32, seed=2,
                                          fuse_eval=f, early_stop=early,
                                          on_pass=lambda t, dw, r, f=f: seen[f].append(dw))
                    for f in (True, False)}
            assert all(torch.equal(a, b) for a, b in zip(seen[True], seen[False]))  # bitwise the same ascent
            assert rows[True]["passes"] == rows[False]["passes"]
            assert math.isclose(rows[True]["mrc"], rows[False]["mrc"], rel_tol=1e-4, abs_tol=1e-6)
            assert rows[True]["robust_accuracy_drop"] == pytest.approx(rows[False]["robust_accuracy_drop"], abs=1e-9)


def test_engine_equals_plain_whole_network_computation():
    """iter_criticality (cache advanced unit by unit, fused evaluation, fp32) == the plain computation."""
    from rift_dist.config import MRCConfig
    from rift_dist.precision import Precision
    from rift_dist.stages.criticality import iter_criticality

    model = _small_resnet()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    names = [n for n, _ in list_modules(model)]
    rows = dict(iter_criticality(model, names, x, y, MRCConfig(num_iterations=2, batch_size=32),
                                 Precision("cpu", None, False), seed=4))
    for name in names:
        plain = module_criticality(model, name, x, y, k=0, num_iterations=2, batch_size=32, seed=4, fuse_eval=False)
        assert math.isclose(plain["mrc"], rows[name]["mrc"], rel_tol=1e-4, abs_tol=1e-6), (name, plain, rows[name])
    assert rows["conv1"]["cache_bytes"] == 0 and rows["layer1.0.conv1"]["cache_bytes"] == 32 * 4 * 32 * 32 * 4
    assert rows["linear"]["unit"] == unit_index(model, "linear")


def test_low_precision_cache_without_autocast():
    """A bf16 cache with float32 compute is cast up per batch (no dtype mismatch), values close to fp32's."""
    from rift_dist.config import MRCConfig
    from rift_dist.precision import Precision
    from rift_dist.stages.criticality import iter_criticality

    model = _small_resnet()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    names = ["layer2.0.conv1", "layer4.1.conv2", "linear"]
    prec = Precision("cpu", None, False)
    f32 = dict(iter_criticality(model, names, x, y, MRCConfig(num_iterations=2, batch_size=32), prec))
    for fuse in (True, False):
        cfg = MRCConfig(num_iterations=2, batch_size=32 if fuse else 16, cache_dtype="bfloat16", fuse_eval=fuse)
        b16 = dict(iter_criticality(model, names, x, y, cfg, prec))
        for n in names:
            assert b16[n]["cache_bytes"] == f32[n]["cache_bytes"] // 2
            if fuse:
                assert b16[n]["mrc"] == pytest.approx(f32[n]["mrc"], rel=0.05, abs=1e-3)


def test_cache_over_budget_runs_from_images():
    from rift_dist.config import MRCConfig
    from rift_dist.precision import Precision
    from rift_dist.stages.criticality import iter_criticality

    model = _small_resnet()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    names = ["layer1.0.conv1", "layer3.1.conv2"]
    prec = Precision("cpu", None, False)
    logs = []
    small = dict(iter_criticality(model, names, x, y, MRCConfig(num_iterations=2, batch_size=16, max_cache_bytes=1),
                                  prec, log=logs.append))
    big = dict(iter_criticality(model, names, x, y, MRCConfig(num_iterations=2, batch_size=16), prec))
    assert all(small[n]["unit"] == 0 and small[n]["cache_bytes"] == 0 for n in names) and len(logs) == 2
    for n in names:
        assert math.isclose(small[n]["mrc"], big[n]["mrc"], rel_tol=1e-4, abs_tol=1e-6)
