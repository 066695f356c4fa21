"""Helpers for the multi-process tests: a deterministic tiny config, process spawning, state comparisons."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.integration.pipeline_helpers import ROOT, shared_data, tiny_config

DATA_MISSING = not (shared_data() / "cifar10-jpeg.tar.gz").is_file()
DATA_REASON = "../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)"


def dist_config(tmp: Path, **sections) -> Path:
    """tiny_config made deterministic for parity checks: fp32 NCHW, torch loader, SyncBN, no MLflow, 1 thread.

    Two AT steps per epoch (global batch 64), PGD-2, a 50-image selection split with PGD-1.
    The parity tests built on it need float32 NCHW determinism (tolerances of 1e-6); the default precision
    (bf16 autocast where the CPU has it, channels_last auto) under DDP and DeepSpeed on 1 and 2 ranks is
    covered by ``tests/integration/test_engine_matrix.py`` (every stage, default run).
    """
    base = {
        "data": {"loader": "torch", "val_size": 50},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "lr": 0.01, "milestones": [10],
                  "attack": {"num_steps": 2}, "eval_attack_steps": 1},
        "precision": {"threads": 1, "autocast": "none", "channels_last": "off"},
        "distributed": {"sync_bn": True, "timeout_s": 60},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            merged = dict(base[section])
            for k, v in values.items():
                merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
            base[section] = merged
        else:
            base[section] = values
    return tiny_config(tmp, **base)


def child_env(**extra: str) -> dict:
    """The environment for a child process: no launcher variables, no MLflow URI, one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")
           and not k.startswith("SLURM_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


def rift_cli(*args: str, nproc: int = 0, torchrun: bool = False, timeout: int = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``rift ARGS`` (``--nproc N`` when nproc), or plain ``torchrun ... -m rift_dist.cli ARGS``; must succeed."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "rift_dist.cli", *args, "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "rift_dist.cli", *args, "--no-progress"] + (["--nproc", str(nproc)] if nproc else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or child_env(), timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _spawn_entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    if world == 1:  # a plain single process: no launcher variables at all
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
    torch.set_num_threads(1)
    fn(rank, world, *args)


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes with torchrun-style variables (none for 1).

    ``fn`` must be a module-level function; results go through files.  Raises when a process fails.
    """
    from rift_dist.parallel.runtime import free_port

    torch.multiprocessing.spawn(_spawn_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def copy_checkpoints(src_run: Path, dst_run: Path, stage: str = "train") -> None:
    """Copy only the resumable checkpoints of ``stage`` (as if the run had been killed after saving them)."""
    shutil.copytree(src_run / stage / "checkpoints", dst_run / stage / "checkpoints")


def latest_checkpoint(run_dir: Path, stage: str = "train") -> dict:
    """The newest resumable checkpoint of ``stage`` in ``run_dir``."""
    from rift_dist.checkpoint import CheckpointManager

    state = CheckpointManager(run_dir / stage / "checkpoints").load_latest()
    assert state is not None, f"no checkpoint in {run_dir / stage / 'checkpoints'}"
    return state


def state_diff(a: dict, b: dict) -> float:
    """Max abs difference over the floating-point tensors of two state dicts with the same keys."""
    assert set(a) == set(b), f"different keys: {sorted(set(a) ^ set(b))[:5]}"
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()), default=0.0)


def optimizer_diff(a: dict, b: dict) -> float:
    """Max abs difference of the per-parameter tensors of two torch-format optimizer states."""
    assert len(a["param_groups"]) == len(b["param_groups"])
    assert [len(g["params"]) for g in a["param_groups"]] == [len(g["params"]) for g in b["param_groups"]]
    sa, sb = a["state"], b["state"]
    assert set(sa) == set(sb)
    return max((((sa[i][k].double() - sb[i][k].double()).abs().max().item())
                for i in sa for k in sa[i] if torch.is_tensor(sa[i][k])), default=0.0)
