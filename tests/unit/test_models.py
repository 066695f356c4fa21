"""Models: module counts and names (RIFT.md), normalisation, units chain equals forward."""

import pytest
import torch
from torch import nn

from rift_dist.models import build_model_from, get_module, list_modules, module_names, unwrap
from rift_dist.stages.criticality import forward_from


@pytest.mark.parametrize("arch,count", [("resnet18", 21), ("resnet34", 37), ("wrn34_10", 35)])
def test_module_counts(arch, count):
    # widen factor 2 keeps block1's 1x1 shortcut (16 -> 32 channels), as in WRN-34-10 (16 -> 160)
    model = build_model_from(arch, 10, width=4, widen_factor=2)
    assert len(list_modules(model)) == count


def test_stable_names_and_wrappers():
    model = build_model_from("resnet18", 10, width=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    names = module_names(model)
    assert "layer2.1.conv2" in names and "layer2.0.shortcut.0" in names and names[-1] == "linear"
    assert names[0] == "conv1"
    wrapped = nn.DataParallel(model)
    assert module_names(wrapped) == names
    assert unwrap(wrapped) is model
    wrn = build_model_from("wrn34_10", 10, widen_factor=2)
    assert "block1.layer.3.conv2" in module_names(wrn) and "block1.layer.0.convShortcut" in module_names(wrn)
    with pytest.raises(KeyError, match="layer9.conv"):
        get_module(model, "layer9.conv")


def test_state_dict_has_no_normaliser_keys():
    a = build_model_from("resnet18", 10, width=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    b = build_model_from("resnet18", 10, width=4)
    assert a.state_dict().keys() == b.state_dict().keys()


def test_normalisation_is_first_layer():
    torch.manual_seed(0)
    plain = build_model_from("resnet18", 10, width=4).eval()
    norm = build_model_from("resnet18", 10, width=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    norm.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), plain((x - mean) / std))


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("wrn34_10", 32), ("resnet34", 64)])
def test_units_chain_equals_forward(arch, size):
    torch.manual_seed(0)
    model = build_model_from(arch, 7, width=4, widen_factor=1, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        full = model(x)
        assert full.shape == (3, 7)
        torch.testing.assert_close(forward_from(model, 0, x), full)
        units = model.units()
        owned = [p for _, prefixes, _ in units for p in prefixes]
        for name, _ in list_modules(model):
            assert sum((name + ".").startswith(p) for p in owned) == 1, name


def test_unknown_module_names_fail_before_any_work(tmp_path):
    from rift_dist.config import ConfigError, RunConfig
    from rift_dist.pipeline import check_module_names, run_pipeline

    cfg = RunConfig()
    cfg.model.width = 4
    cfg.tracking.enabled = False
    cfg.finetune.modules = ["layer2.1.conv2", "layer9.9.conv9"]
    with pytest.raises(ConfigError, match=r"finetune.modules: no module named 'layer9.9.conv9' in resnet18; valid modules: conv1"):
        check_module_names(cfg)
    with pytest.raises(ConfigError, match="finetune.modules"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory or MLflow was touched
    cfg.finetune.modules = ["layer2.1.conv2"]
    cfg.mrc.modules = ["linear", "fc"]
    with pytest.raises(ConfigError, match="mrc.modules: no module named 'fc'"):
        check_module_names(cfg)
    cfg.mrc.modules = ["linear"]
    check_module_names(cfg)  # valid names pass
