"""Chaos suite, the faults that are not SIGKILLs of the whole group (issue 13): a disk that fills up in the middle
of training, and one rank of a 2-rank run killed.

- **Disk full**: the run directory lives on a 48 MiB tmpfs; once training has written its first checkpoint a
  filler file takes every free byte.  The next write fails: the run ends with one ``rift:`` line naming the
  disk, the path and the fix (no traceback), the last good checkpoint still loads and no temporary file is
  left; after the filler is removed the same command resumes and ends with the model of an uninterrupted run
  (every tensor bitwise).
- **Tracking server restarted**: the MLflow server stopped after training epoch 1 and started again 30 s later
  while the run goes on; the run sends what it buffered by itself (slow).
- **One rank killed**: ``rift train --nproc 2`` with one worker SIGKILLed mid-epoch: the run exits non-zero
  within ``distributed.timeout_s`` (torchrun's agent tears the group down); a re-run on 2 ranks and a re-run of
  a copy on 1 rank both finish the stage from the checkpoint on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rift_dist.checkpoint import CheckpointManager
from tests.integration.pipeline_helpers import ROOT, rift, shared_data, tiny_config
from tests.integration.test_mlflow_tracking import mlflow_server  # noqa: F401 - fixture (a real server)

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")

TRAIN = {"epochs": 3, "milestones": [2], "checkpoint_every": 1, "attack": {"num_steps": 2}, "eval_attack_steps": 1}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _tensors_equal(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _wait_for_checkpoint(proc: subprocess.Popen, ckpts: Path, at_least: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(ckpts.glob("ckpt-*.pt")) if ckpts.is_dir() else []
        if any(int(p.stem.split("-")[1]) >= at_least for p in found):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before a checkpoint >= {at_least}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared in time")


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> Path:
    """Take every free byte of ``mnt`` with one file; returns it."""
    filler = mnt / "filler.bin"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: each write either lands or raises ENOSPC
        for size in (len(chunk), 4096, 1):  # MiBs, then the last pages, then the last bytes
            try:
                while True:
                    fh.write(chunk[:size])
            except OSError:
                pass
    assert shutil.disk_usage(mnt).free < 4096, shutil.disk_usage(mnt)
    return filler


def test_disk_full_mid_training_is_one_clear_error_then_resumes_after_freeing_space(tmp_path, small_disk):
    # tracking outside the small disk: this test is about the run directory
    cfg = tiny_config(tmp_path, train=TRAIN, tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    reference = tmp_path / "reference"
    rift("train", str(cfg), "--run-dir", str(reference), env={"OMP_NUM_THREADS": "1"})

    run_dir = small_disk / "run"
    ckpts = run_dir / "train" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "rift_dist.cli", "train", str(cfg), "--run-dir", str(run_dir),
                             "--no-progress"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_checkpoint(proc, ckpts, 1)
        filler = _fill(small_disk)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("rift:") and "Error" in line]
    assert len(errors) == 1 and "disk full" in errors[0] and str(small_disk) in errors[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not (run_dir / "train" / "done.json").exists()
    last = CheckpointManager(ckpts).load_latest()  # the previous checkpoint is intact
    assert last is not None
    assert not [p for p in ckpts.iterdir() if not p.name.startswith("ckpt-")], sorted(ckpts.iterdir())

    filler.unlink()  # space freed: the same command resumes
    again = rift("train", str(cfg), "--run-dir", str(run_dir), env={"OMP_NUM_THREADS": "1"})
    assert "resuming at epoch" in again.stdout, again.stdout[-2000:]
    assert _tensors_equal(run_dir / "train" / "model.pt", reference / "train" / "model.pt")
    assert [h["epoch"] for h in json.loads((run_dir / "train" / "history.json").read_text())] == [1, 2, 3]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow  # ~50 s; the default run's test_distributed_failure covers the exit within the timeout
def test_one_rank_killed_then_rerun_on_two_and_on_one_rank_finishes(tmp_path):
    timeout_s = 20
    cfg = tiny_config(tmp_path, train=TRAIN, distributed={"sync_bn": True, "timeout_s": timeout_s},
                      tracking={"enabled": False})
    run_dir = tmp_path / "run"
    ckpts = run_dir / "train" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "rift_dist.cli", "train", str(cfg), "--run-dir", str(run_dir),
                             "--nproc", "2", "--no-progress"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_checkpoint(proc, ckpts, 1)
        torchrun = _children(proc.pid)
        workers = [w for t in torchrun for w in _children(t)]
        assert len(workers) == 2, (torchrun, workers)
        os.kill(workers[1], signal.SIGKILL)  # one rank dies (OOM killer, a node's process lost)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=timeout_s + 60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, out[-3000:]
    assert took < timeout_s + 15, (took, out[-3000:])
    assert not (run_dir / "train" / "done.json").exists()

    one_rank = tmp_path / "run-one-rank"
    shutil.copytree(run_dir, one_rank)
    for where, nproc in ((run_dir, "2"), (one_rank, "1")):
        again = rift("train", str(cfg), "--run-dir", str(where), "--nproc", nproc, env={"OMP_NUM_THREADS": "1"})
        assert "resuming at epoch" in again.stdout, again.stdout[-2000:]
        assert (where / "train" / "done.json").is_file()
        assert [h["epoch"] for h in json.loads((where / "train" / "history.json").read_text())] == [1, 2, 3]


@pytest.mark.slow  # ~2-3 min: the server stays away 30 s
def test_mlflow_server_restarted_30_s_later_gets_every_metric(mlflow_server, tmp_path):
    """The tracking server stopped after training epoch 1 and started again 30 s later, while the run goes on:
    without any command after it, the run itself sends what it buffered -- every stage's run exists once,
    FINISHED, train_loss has each epoch's step once, each alpha has its run, and nothing is left pending."""
    import threading

    from tests.integration.test_mlflow_tracking import _runs_by_name, every_stage_tracked_once

    epochs = 40  # with 1,024 images: ~1 s per epoch on a fast 2-core machine, so the 30 s outage ends mid-run
    cfg = tiny_config(tmp_path, tracking={"uri": mlflow_server.uri}, data={"train_subset": 1024},
                      train={"epochs": epochs, "milestones": [30], "attack": {"num_steps": 2}, "eval_attack_steps": 1},
                      mrc={"num_iterations": 10})
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "rift_dist.cli", "run", str(cfg), "--run-dir", str(run_dir),
                             "--no-progress"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    restarted_while_running: list[bool] = []

    def outage():
        mlflow_server.stop()
        time.sleep(30)
        restarted_while_running.append(proc.poll() is None)
        mlflow_server.start()

    lines, thread = [], None
    t0 = time.monotonic()
    for line in proc.stdout:
        lines.append(f"{time.monotonic() - t0:6.1f} {line}")
        if thread is None and line.startswith("[train] epoch 1/"):
            thread = threading.Thread(target=outage)
            thread.start()
    assert proc.wait(timeout=900) == 0, "".join(lines)[-4000:]
    assert thread is not None, "".join(lines)[-3000:]
    thread.join()
    assert restarted_while_running == [True], ("the run ended before the server came back: make it longer\n"
                                               + "".join(lines)[-3000:])
    assert not list(run_dir.rglob("mlflow/pending/*.json")), "writes left pending"

    client, parent, children = every_stage_tracked_once(mlflow_server.uri, run_dir)
    train_id = children["adversarial_training"][0].info.run_id
    history = json.loads((run_dir / "train" / "history.json").read_text())
    logged = client.get_metric_history(train_id, "train_loss")
    assert sorted(m.step for m in logged) == list(range(1, epochs + 1))
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx([h["train_loss"] for h in history])
    alphas = _runs_by_name(client, parent.info.experiment_id, children["interpolation"][0].info.run_id)
    assert len(alphas) == 3 and all(len(v) == 1 and v[0].data.metrics for v in alphas.values()), alphas
