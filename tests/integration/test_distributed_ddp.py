"""DDP on 2 gloo processes == 1 process with the doubled batch; resume across world sizes; launchers.

Parity is to float tolerance, not bitwise: two ranks sum BatchNorm statistics and gradients
in another order than one process.  The first AT step agrees to ~1e-6; after it, PGD's
sign steps and ReLU ties amplify fp32 rounding (on step 1 of these runs, one-process fp32
gradients of the stem differ from a float64 computation by ~1e-3 while the 2-rank ones agree
with it to ~1e-6), so the tolerances below are those of a few steps at lr 0.01.
"""

import json

import pytest
import torch

from rift_dist.checkpoint_ids import checkpoint_id, checkpoint_name

from tests.integration.distributed_helpers import (
    DATA_MISSING, DATA_REASON, copy_checkpoints, dist_config, latest_checkpoint, optimizer_diff, rift_cli, state_diff,
)

pytestmark = pytest.mark.skipif(DATA_MISSING, reason=DATA_REASON)

WEIGHT_ATOL = 2e-3   # measured ~1e-4 after 2 steps (see the module docstring)
LOSS_RTOL = 1e-4     # measured ~2e-6


def _history(run_dir):
    return json.loads((run_dir / "train" / "history.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """R1: one process, 2 epochs; R2: `rift --nproc 2`, 1 epoch; R21: R2's checkpoint resumed on 1 rank."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = dist_config(tmp)
    r1, r2, r21 = tmp / "r1", tmp / "r2", tmp / "r21"
    out = {"cfg": cfg, "r1": r1, "r2": r2, "r21": r21}
    out["r1_stdout"] = rift_cli("train", str(cfg), "--run-dir", str(r1), "--set", "train.epochs=2").stdout
    out["r2_stdout"] = rift_cli("train", str(cfg), "--run-dir", str(r2), nproc=2).stdout
    copy_checkpoints(r2, r21)
    out["r21_stdout"] = rift_cli("train", str(cfg), "--run-dir", str(r21), "--set", "train.epochs=2").stdout
    return out


def test_two_ranks_match_one_process_with_doubled_batch(runs):
    r1, r2 = runs["r1"], runs["r2"]
    # R1's epoch-1 checkpoint vs R2's final (= epoch-1) checkpoint: model, optimizer, position
    c1 = torch.load(r1 / "train" / "checkpoints" / checkpoint_name(checkpoint_id(1)), weights_only=False)
    c2 = latest_checkpoint(r2)
    assert (c1["epoch"], c1["step"]) == (c2["epoch"], c2["step"]) == (1, 0)
    w = state_diff(c1["model"], c2["model"])
    m = optimizer_diff(c1["optimizer"], c2["optimizer"])
    l1, l2 = _history(r1)[0]["train_loss"], _history(r2)[0]["train_loss"]
    print(f"DDP parity after 2 PGD-AT steps: max|dW| {w:.2e}, max|d momentum| {m:.2e}, loss {l1:.7f} vs {l2:.7f}")
    assert w < WEIGHT_ATOL and m < WEIGHT_ATOL * 10
    assert abs(l1 - l2) <= LOSS_RTOL * abs(l1)
    assert c2["model"].keys() == c1["model"].keys()  # wrapper-free keys (no "module.")


def test_only_the_main_process_prints(runs):
    out = runs["r2_stdout"]
    assert "2 process(es)" in out and "2 rank(s)" in out
    assert out.count("[train] epoch 1/1") == 1  # printed once, by rank 0


def test_resume_two_ranks_to_one(runs):
    r1, r21 = runs["r1"], runs["r21"]
    assert "resuming at epoch 2" in runs["r21_stdout"]
    assert len(_history(r21)) == 2
    c1, c21 = latest_checkpoint(r1), latest_checkpoint(r21)
    assert (c21["epoch"], c21["step"]) == (2, 0)
    w = state_diff(c1["model"], c21["model"])
    l1, l21 = _history(r1)[1]["train_loss"], _history(r21)[1]["train_loss"]
    print(f"resume 2 -> 1 rank vs 1 rank throughout, after 4 steps: max|dW| {w:.2e}, epoch-2 loss {l1:.7f} vs {l21:.7f}")
    assert w < 5 * WEIGHT_ATOL
    assert abs(l1 - l21) <= 100 * LOSS_RTOL * abs(l1)


@pytest.mark.slow
def test_resume_one_rank_to_two_with_plain_torchrun(runs, tmp_path):
    """The reverse direction, launched with plain `torchrun -m rift_dist.cli`."""
    r12 = tmp_path / "r12"
    (r12 / "train" / "checkpoints").mkdir(parents=True)
    src = runs["r1"] / "train" / "checkpoints" / checkpoint_name(checkpoint_id(1))
    (r12 / "train" / "checkpoints" / src.name).write_bytes(src.read_bytes())
    out = rift_cli("train", str(runs["cfg"]), "--run-dir", str(r12), "--set", "train.epochs=2", nproc=2, torchrun=True)
    assert "resuming at epoch 2" in out.stdout and "2 rank(s)" in out.stdout
    w = state_diff(latest_checkpoint(runs["r1"])["model"], latest_checkpoint(r12)["model"])
    print(f"resume 1 -> 2 ranks vs 1 rank throughout: max|dW| {w:.2e}")
    assert w < 5 * WEIGHT_ATOL
