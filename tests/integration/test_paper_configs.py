"""The nine paper configs (``configs/<dataset>_<arch>.yaml``): cheap checks for all nine in the default suite,
and each row through every stage at its real architecture, width and input size in the slow suite.

Default suite (fast): the config loads, the model builds at full size with the module count of RIFT.md
(ResNet-18: 21, ResNet-34: 37, WRN-34-10: 35) and the parameter count of ``rift plan``, and
``rift submit CONFIG --profile launch/example_cluster.yaml --dry-run`` succeeds and writes nothing.

Slow suite: ``rift train|mrc|finetune|interpolate|evaluate CONFIG --set <tiny counts>`` one stage per process on
real data (CIFAR-10 JPEG archive and the Tiny-ImageNet-200 subset from ``../shared/data``; CIFAR-100 from a small
fixture in the official pickle layout), measuring each stage's wall time and peak resident memory
(``os.wait4`` of that process).  Set env ``RIFT_PAPER_MEASURE=FILE`` to append one JSON line per row to FILE.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration import pipeline_helpers
from tests.integration.pipeline_helpers import ROOT, shared_data

ARCHS = {"resnet18": 21, "resnet34": 37, "wrn34_10": 35}
DATASETS = ("cifar10", "cifar100", "tiny-imagenet")
ROWS = [(d, a) for d in DATASETS for a in ARCHS]
STAGE_COMMANDS = ("train", "mrc", "finetune", "interpolate", "evaluate")
ARTEFACTS = ("config.yaml", "mrc.csv", "interpolation.csv", "summary.json", "summary.md", "summary.csv",
             "train/model.pt", "train/history.json", "mrc/adversarial_set.pt", "mrc/mrc.json", "mrc/mrc.png",
             "finetune/model.pt", "interpolate/model.pt", "interpolate/alpha.json", "interpolate/interpolation.png",
             "evaluate/at_vs_rift.png")
"""What a finished run directory holds (checked after the five stages)."""


def config_path(dataset: str, arch: str) -> Path:
    """``configs/<dataset>_<arch>.yaml`` (the file must exist: a missing row is a failed test)."""
    return ROOT / "configs" / f"{dataset}_{arch}.yaml"


@pytest.mark.parametrize("dataset,arch", ROWS, ids=[f"{d}_{a}" for d, a in ROWS])
def test_paper_config_loads_builds_and_plans(dataset, arch):
    from torch import nn

    from rift_dist.config import load_config
    from rift_dist.data.datasets import dataset_spec
    from rift_dist.models import build_model, module_names
    from rift_dist.plan import plan_config

    path = config_path(dataset, arch)
    cfg = load_config(path)
    assert (cfg.data.dataset, cfg.model.arch) == (dataset, arch)
    assert cfg.model.width == 64 and cfg.model.widen_factor == 10  # the paper's full size
    assert cfg.train.epochs == 110 and cfg.train.attack.num_steps == 10

    model = build_model(cfg)
    names = module_names(model)
    assert len(names) == ARCHS[arch] and len(set(names)) == ARCHS[arch]
    params = sum(p.numel() for p in model.parameters())
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == dataset_spec(dataset).num_classes

    plan = plan_config(cfg)
    assert plan.parameters == params and plan.modules == ARCHS[arch]
    assert plan.input_size == (64 if dataset == "tiny-imagenet" else 32)
    assert plan.checkpoint_bytes > 4 * params  # float32 weights plus BatchNorm buffers and pickle framing
    assert plan.forward_flops > 0 and all(s.seconds > 0 for s in plan.stages)


@pytest.mark.parametrize("dataset,arch", ROWS, ids=[f"{d}_{a}" for d, a in ROWS])
def test_paper_config_submit_dry_run_and_plan(dataset, arch, tmp_path, monkeypatch, capsys):
    """``rift submit CONFIG --profile launch/example_cluster.yaml --dry-run`` and ``rift plan CONFIG`` through
    the CLI's ``main`` (in this process: torch is imported once for all nine)."""
    from rift_dist.cli import main

    monkeypatch.setenv("RIFT_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # No cluster to ask: the suite's own SLURM cluster (partitions debug, high) may be up for the session and
    # would rightly refuse the example profile's partition 'gpu'.  Without scontrol on PATH the dry run notes that
    # the limits are not checked (a missing slurm.conf instead makes scontrol hang ~60 s on its config lookup).
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                               if d and not (Path(d) / "scontrol").exists()))
    run_dir = tmp_path / "run"
    assert main(["submit", str(config_path(dataset, arch)), "--profile", str(ROOT / "launch" / "example_cluster.yaml"),
                 "--run-dir", str(run_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan for" in out and "#SBATCH" in out
    for job in ("train", "mrc", "finetune", "evaluate"):
        assert f"/jobs/{job}" in out
    assert not run_dir.exists()  # a dry run writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    assert main(["plan", str(config_path(dataset, arch))]) == 0
    out = capsys.readouterr().out
    assert f"| architecture | {arch} " in out and f"| data set | {dataset}, " in out
    assert f"| MRC modules | {ARCHS[arch]} |" in out
    for stage in ("training", "MRC", "fine-tuning", "interpolation", "evaluation", "total"):
        assert f"| {stage} |" in out


# --------------------------------------------------------------------------- slow: every stage, tiny counts


def tiny_overrides(dataset: str, data_root: Path | None = None) -> list[str]:
    """``--set`` items that shrink a paper row to a few dozen images and one or two steps per stage.

    Architecture, width and input size stay the paper's.  PGD-1 everywhere, 16 MRC images and 1 ascent pass,
    alphas {0, 1}, 1 corruption x 1 severity (re-generated), AutoAttack, extra PGD, the margin attack and the
    sanity checks off; tracking stays on (MLflow SQLite beside the run directory), as a user runs it.
    """
    sets = [
        f"data.cache_dir={pipeline_helpers.test_cache_dir()}", "data.num_workers=0",
        "data.train_subset=40", "data.val_size=20", "data.test_subset=20",
        "data.batch_size=20", "data.eval_batch_size=20",
        "data.corruption_root=", "data.corruption_generate=true", "data.corruptions=[gaussian_noise]",
        "data.severities=[1]",
        "train.epochs=1", "train.milestones=[]", "train.attack.num_steps=1", "train.eval_attack_steps=1",
        "mrc.num_examples=16", "mrc.batch_size=16", "mrc.num_iterations=1", "mrc.attack.num_steps=1",
        "finetune.epochs=1", "finetune.milestones=[]", "finetune.max_steps_per_epoch=1",
        "interpolation.alphas=[0.0,1.0]",
        "eval.restarts=1", "eval.attack.num_steps=1", "eval.selection_attack_steps=1", "eval.extra_pgd_steps=[]",
        "eval.margin_pgd_steps=0", "eval.sanity_checks=false", "eval.autoattack=false",
        "precision.threads=1",
    ]
    if dataset == "cifar10":
        sets.append(f"data.archive={shared_data() / 'cifar10-jpeg.tar.gz'}")
    elif dataset == "tiny-imagenet":
        sets.append(f"data.archive={shared_data() / 'tiny-imagenet-200-sub100.tar.gz'}")
    else:
        sets.append(f"data.root={data_root}")
    return sets


def run_stage(args: list[str], timeout: int = 3000) -> dict:
    """Run ``python -m rift_dist.cli ARGS --no-progress`` to its end; returns wall seconds, peak RSS, output.

    Peak RSS is the child's own ``ru_maxrss`` from :func:`os.wait4` (KiB on Linux), reported in MiB.

    Raises:
        AssertionError: when the command fails (with the tail of its output).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rift_paper_{os.getpid()}_{time.monotonic_ns()}.log"
    t0 = time.monotonic()
    with out_path.open("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rift_dist.cli", *args, "--no-progress"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        text = out.read()
    out_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise AssertionError(f"rift {' '.join(args[:2])} failed ({proc.returncode}):\n{text[-6000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "output": text}


def _needs_data(dataset: str) -> None:
    name = {"cifar10": "cifar10-jpeg.tar.gz", "tiny-imagenet": "tiny-imagenet-200-sub100.tar.gz"}.get(dataset)
    if name and not (shared_data() / name).is_file():
        pytest.skip(f"../shared/data/{name} not found (set RIFT_SHARED_DATA)")


@pytest.mark.slow
@pytest.mark.parametrize("dataset,arch", ROWS, ids=[f"{d}_{a}" for d, a in ROWS])
def test_paper_config_every_stage(dataset, arch, tmp_path):
    _needs_data(dataset)
    data_root = None
    if dataset == "cifar100":
        from tests.conftest import write_cifar_pickles

        data_root = tmp_path / "cifar100"
        write_cifar_pickles(data_root, "cifar100", per_class_train=1, per_class_test=1)  # 100 + 100 images
    cfg = config_path(dataset, arch)
    run_dir = tmp_path / "runs" / cfg.stem
    sets = [x for s in tiny_overrides(dataset, data_root) for x in ("--set", s)]
    stages = {}
    for stage in STAGE_COMMANDS:
        result = run_stage([stage, str(cfg), "--run-dir", str(run_dir), *sets])
        stages[stage] = {k: result[k] for k in ("wall_s", "peak_rss_mib")}
        assert f"[{stage}]" in result["output"]

    with (run_dir / "mrc.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == ARCHS[arch] and len({r["module"] for r in rows}) == ARCHS[arch]
    assert all(float(r["mrc"]) >= 0.0 for r in rows)
    with (run_dir / "interpolation.csv").open() as fh:
        assert [float(r["alpha"]) for r in csv.DictReader(fh)] == [0.0, 1.0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["alpha"] in (0.0, 1.0) and len(summary["modules"]) == 1
    for model in ("at", "rift"):
        for key in ("clean_accuracy", "robust_accuracy", "corruption_accuracy"):
            assert 0.0 <= summary[model][key] <= 1.0
    for artefact in ARTEFACTS:
        assert (run_dir / artefact).is_file(), f"{artefact} missing in {run_dir}: {sorted(os.listdir(run_dir))}"
    for stage in ("train", "mrc", "finetune", "interpolate", "evaluate"):
        assert json.loads((run_dir / stage / "done.json").read_text()) is not None

    from rift_dist.config import load_config
    from rift_dist.plan import plan_config

    plan = plan_config(load_config(cfg))
    saved = (run_dir / "train" / "model.pt").stat().st_size
    assert abs(saved - plan.checkpoint_bytes) < 0.01 * saved  # rift plan's size is what the run writes
    record = {"config": cfg.name, "parameters": plan.parameters, "modules": plan.modules,
              "checkpoint_bytes": plan.checkpoint_bytes, "model_pt_bytes": saved, "stages": stages,
              "predicted_gpu_s": {s.name: round(s.seconds, 1) for s in plan.stages}}
    print(json.dumps(record))
    target = os.environ.get("RIFT_PAPER_MEASURE")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps(record) + "\n")
