"""Bring your own AT model: the checkpoint layouts people have load into our models with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rift_dist.checkpoint import CheckpointError
from rift_dist.config import from_dict
from rift_dist.parallel.runtime import Runtime
from rift_dist.models import build_model_from
from rift_dist.models.convert import CheckpointConversionError, convert_state_dict, load_external_checkpoint
from rift_dist.precision import resolve_precision
from rift_dist.stages.context import StageContext
from rift_dist.tracking import Tracker

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained(arch="resnet18", **kw):
    """A model with non-trivial weights and BN statistics (so a wrong mapping changes the outputs)."""
    torch.manual_seed(0)
    model = build_model_from(arch, 10, width=4, widen_factor=2, mean=MEAN, std=STD, **kw)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model(torch.rand(8, 3, 16, 16))
    return model.eval()


def same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def fresh(arch="resnet18", normalize=True):
    torch.manual_seed(99)
    return build_model_from(arch, 10, width=4, widen_factor=2,
                            mean=MEAN if normalize else None, std=STD if normalize else None)


def as_torchvision(sd):
    return {k.replace(".shortcut.", ".downsample.").replace("linear.", "fc."): v for k, v in sd.items()}


LAYOUTS = {
    "raw": lambda sd: sd,
    "state_dict+ddp": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 110},
    "net+sequential-normalizer": lambda sd: {"net": {**{f"1.{k}": v for k, v in sd.items()},
                                                     "0.mean": torch.tensor(MEAN), "0.std": torch.tensor(STD)},
                                             "acc": 53.6},
    "model+prefix+norm": lambda sd: {"model": {**{f"model.{k}": v for k, v in sd.items()},
                                               "norm.mean": torch.tensor(MEAN).view(1, 3, 1, 1),
                                               "norm.std": torch.tensor(STD).view(1, 3, 1, 1)}},
    "ddp+normalize-module": lambda sd: {**{f"module.model.{k}": v for k, v in sd.items()},
                                        "module.normalize.mean": torch.tensor(MEAN),
                                        "module.normalize.std": torch.tensor(STD)},
    "torchvision-names": as_torchvision,
    "compiled+no-bn-counter": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()
                                          if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resnet_layouts_load_with_identical_outputs(layout, tmp_path):
    src = trained()
    path = tmp_path / "ckpt.pt"
    torch.save(LAYOUTS[layout](src.state_dict()), path)
    dst = fresh()
    state, report = load_external_checkpoint(path, dst)
    assert same_outputs(src, dst), report
    assert set(state) == set(dst.state_dict()) and report["num_tensors"] == len(state)
    json.dumps(report)
    if layout == "state_dict+ddp":
        assert report["stripped_prefixes"] == ["module."] and "['epoch']" in report["ignored_entries"]
    if layout == "net+sequential-normalizer":
        assert report["stripped_prefixes"] == ["1."] and report["normalizer"]["keys"] == ["0.mean", "0.std"]
        assert "matches" in report["normalization"]
    if layout == "torchvision-names":
        assert any("downsample" in k for k in report["renamed"]) and any("fc" in k for k in report["renamed"])
    if layout == "compiled+no-bn-counter":
        assert report["filled"] and report["stripped_prefixes"] == ["_orig_mod."]


def test_trades_wrn_with_sub_block1(tmp_path):
    src = trained("wrn34_10")
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd.update({f"module.sub_block1.{k[len('block1.'):]}": v.clone() for k, v in src.state_dict().items()
               if k.startswith("block1.")})  # TRADES' WideResNet builds an unused sub_block1
    path = tmp_path / "trades.pt"
    torch.save(sd, path)
    dst = fresh("wrn34_10")
    _, report = load_external_checkpoint(path, dst)
    assert same_outputs(src, dst)
    assert report["dropped"] and all(k.startswith("sub_block1.") for k in report["dropped"])


def test_shape_mismatch_names_key_both_shapes_and_width():
    src = build_model_from("resnet18", 10, width=8)
    with pytest.raises(CheckpointConversionError) as err:
        convert_state_dict(src.state_dict(), fresh())
    msg = str(err.value)
    assert "conv1.weight: checkpoint [8, 3, 3, 3] vs model [4, 3, 3, 3]" in msg
    assert "set model.width: 8" in msg


def test_wrong_arch_and_classes_hints():
    wrn = build_model_from("wrn34_10", 10, widen_factor=2)
    with pytest.raises(CheckpointConversionError, match="set model.arch: wrn34_10") as err:
        convert_state_dict(wrn.state_dict(), fresh())
    assert "unexpected key(s): block1.layer.0" in str(err.value) and "missing from the checkpoint" in str(err.value)
    r34 = build_model_from("resnet34", 10, width=4)
    with pytest.raises(CheckpointConversionError, match="resnet34"):
        convert_state_dict(r34.state_dict(), fresh())
    c100 = build_model_from("resnet18", 100, width=4)
    with pytest.raises(CheckpointConversionError, match="100 classes"):
        convert_state_dict(c100.state_dict(), fresh())


def test_normalisation_mismatch_says_what_to_set():
    sd = {**{f"1.{k}": v for k, v in trained().state_dict().items()},
          "0.mean": torch.tensor((0.5, 0.5, 0.5)), "0.std": torch.tensor((0.5, 0.5, 0.5))}
    with pytest.raises(CheckpointConversionError, match=r"model.mean: \[0.5000, 0.5000, 0.5000\]"):
        convert_state_dict(sd, fresh())
    with pytest.raises(CheckpointConversionError, match="model.normalize is false"):
        convert_state_dict(sd, fresh(normalize=False))
    _, report = convert_state_dict(trained().state_dict(), fresh(normalize=False))
    assert "raw [0, 1] pixels" in report["normalization"]


class Holder:
    """A pickled object: loading it would need arbitrary code."""

    def __init__(self):
        self.weights = torch.zeros(3)


def test_pickled_object_checkpoint_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": Holder()}, path)
    with pytest.raises(CheckpointError, match="arbitrary Python code"):
        load_external_checkpoint(path, fresh())
    torch.save({"epoch": 3, "acc": 0.5}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointConversionError, match="no state dict found"):
        load_external_checkpoint(tmp_path / "empty.pt", fresh())


def test_import_checkpoint_writes_the_train_artefact(tmp_path):
    from rift_dist.checkpoint import load
    from rift_dist.stages.adversarial_training import import_checkpoint

    src = trained()
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "at.pt")
    cfg = from_dict({"model": {"width": 4}, "tracking": {"enabled": False},
                     "precision": {"autocast": "none", "channels_last": "off"}, "device": "cpu"})
    ctx = StageContext(cfg, tmp_path / "run", Runtime(cfg), Tracker(cfg, tmp_path, active=False),
                       resolve_precision(cfg.precision, "cpu"), progress=False)
    out = import_checkpoint(ctx, str(tmp_path / "at.pt"))
    dst = fresh()
    dst.load_state_dict(load(out["model"]))
    assert same_outputs(src, dst)
    assert json.loads((tmp_path / "run" / "train" / "import_report.json").read_text())["stripped_prefixes"] == ["module."]
