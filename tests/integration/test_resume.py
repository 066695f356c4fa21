"""Resume: the AT stage killed mid-way (SIGKILL) finishes from its checkpoint on re-run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.pipeline_helpers import ROOT, rift, shared_data, tiny_config

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def test_sigkill_mid_training_then_resume(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 3, "milestones": [2], "checkpoint_every": 1,
                                       "attack": {"num_steps": 2}, "eval_attack_steps": 1})
    run_dir = tmp_path / "run"
    ckpts = run_dir / "train" / "checkpoints"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "rift_dist.cli", "train", str(cfg), "--run-dir", str(run_dir),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        # wait for a checkpoint past the first epoch's first steps, then kill hard
        while time.time() < deadline:
            found = sorted(ckpts.glob("ckpt-*.pt")) if ckpts.is_dir() else []
            if any(int(p.stem.split("-")[1]) >= 1_000_001 for p in found):
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "train" / "done.json").exists()

    out = rift("train", str(cfg), "--run-dir", str(run_dir))
    assert "resuming at epoch" in out.stdout
    epoch_resumed = int(out.stdout.split("resuming at epoch ")[1].split(",")[0])
    assert epoch_resumed >= 2
    history = json.loads((run_dir / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert (run_dir / "train" / "done.json").is_file()
