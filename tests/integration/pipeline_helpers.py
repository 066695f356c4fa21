"""Helpers for the end-to-end tests: a tiny config on the real CIFAR-10 JPEG images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    """``../shared/data`` beside the checkout, or env RIFT_SHARED_DATA."""
    return Path(os.environ.get("RIFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def test_cache_dir() -> Path:
    """A cache for unpacked archives and decoded arrays shared by the test session (env RIFT_TEST_CACHE)."""
    path = Path(os.environ.get("RIFT_TEST_CACHE", ROOT / ".cache" / "test-data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_config(tmp: Path, **sections) -> Path:
    """Write a tiny, fast config (width-4 ResNet-18, a few hundred real CIFAR-10 images) and return its path."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "cifar10", "archive": str(shared_data() / "cifar10-jpeg.tar.gz"),
                 "cache_dir": str(test_cache_dir()), "train_subset": 256, "val_size": 100, "test_subset": 100,
                 "batch_size": 64, "eval_batch_size": 100, "corruption_generate": True,
                 "corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5]},
        "model": {"arch": "resnet18", "width": 4},
        "train": {"epochs": 2, "milestones": [1], "attack": {"num_steps": 2}, "eval_attack_steps": 2},
        "mrc": {"num_examples": 64, "batch_size": 64, "num_iterations": 2},
        "finetune": {"epochs": 2, "milestones": [1]},
        "interpolation": {"alphas": [0.0, 0.5, 1.0]},
        "eval": {"restarts": 2, "attack": {"num_steps": 2}, "selection_attack_steps": 2},
        "precision": {"threads": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rift(*args: str, env: dict | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``rift`` CLI in a subprocess (``python -m rift_dist.cli``), capturing output."""
    full_env = dict(os.environ)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "rift_dist.cli", *args, "--no-progress"], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"rift {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
