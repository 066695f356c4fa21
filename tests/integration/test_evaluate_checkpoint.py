"""``rift evaluate CONFIG --checkpoint PATH`` (rift_dist/evaluate_checkpoint.py): a checkpoint made elsewhere,
evaluated end to end through the CLI on a tiny CIFAR-10 pickle directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rift_dist.models import build_model_from
from tests.conftest import write_cifar_pickles

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_an_external_checkpoint_through_the_cli(tmp_path, monkeypatch):
    from rift_dist.cli import main

    torch.set_num_threads(1)
    data_root = write_cifar_pickles(tmp_path / "data", per_class_train=1, per_class_test=2)  # 20 test images
    model = build_model_from("resnet18", 10, width=4, mean=None, std=None)
    ckpt = tmp_path / "external.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)  # a DDP-style dump
    run_dir = tmp_path / "run"
    overrides = [f"data.root={data_root}", "data.archive=", "model.width=4", "model.normalize=false",
                 "eval.restarts=1", "eval.attack.num_steps=2", "eval.extra_pgd_steps=[]", "eval.margin_pgd_steps=0",
                 "eval.sanity_checks=false", "eval.autoattack=false", "data.corruptions=[]", "data.corruption_root=",
                 "tracking.enabled=false", "precision.autocast=none", "data.val_size=10", "data.train_subset=0", "data.test_subset=0"]
    rc = main(["evaluate", str(ROOT / "configs" / "default.yaml"), "--run-dir", str(run_dir), "--checkpoint", str(ckpt),
               "--n-examples", "12", "--no-progress", *[a for o in overrides for a in ("--set", o)]])
    assert rc == 0
    report = json.loads((run_dir / "checkpoint_eval" / "report.json").read_text())
    result = report["result"]
    assert result["num_examples"] == 12
    assert 0.0 <= result["robust_accuracy"] <= result["clean_accuracy"] <= 1.0
    # the external weights were used as they are: the clean accuracy is that of the saved model
    model.eval()
    from rift_dist.data.sources import load_split

    test = load_split("cifar10", data_root, "test")
    x = torch.tensor(test.images[:12].copy()).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expect = (model(x).argmax(1) == torch.as_tensor(test.labels[:12])).float().mean().item()
    assert abs(result["clean_accuracy"] - expect) < 1e-6
    for name in ("report.md", "report.csv", "import_report.json", "config.yaml"):
        assert (run_dir / "checkpoint_eval" / name).is_file()


def test_a_bad_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys):
    """A missing, unreadable or ill-fitting --checkpoint used to be refused only after the run directory got
    checkpoint_eval/config.yaml and mlflow_run.json."""
    from rift_dist.cli import main

    torch.set_num_threads(1)
    data_root = write_cifar_pickles(tmp_path / "data", per_class_train=1, per_class_test=2)
    wide = tmp_path / "width8.pt"
    torch.save(build_model_from("resnet18", 10, width=8, mean=None, std=None).state_dict(), wide)
    not_a_checkpoint = tmp_path / "summary.json"
    not_a_checkpoint.write_text('{"clean_accuracy": 0.5}')
    overrides = [f"data.root={data_root}", "data.archive=", "model.width=4", "data.corruptions=[]",
                 "data.corruption_root=", "tracking.enabled=false", "data.val_size=10"]
    for ckpt, what in ((tmp_path / "missing.pt", "not found"), (not_a_checkpoint, "not a readable PyTorch checkpoint"),
                       (wide, "shape")):
        run_dir = tmp_path / f"run-{ckpt.stem}"
        rc = main(["evaluate", str(ROOT / "configs" / "default.yaml"), "--run-dir", str(run_dir), "--checkpoint",
                   str(ckpt), "--no-progress", *[a for o in overrides for a in ("--set", o)]])
        err = capsys.readouterr().err
        assert rc != 0 and what in err and str(ckpt) in err, err
        assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))
