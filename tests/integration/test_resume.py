"""Resume: the AT stage killed mid-way (SIGKILL) finishes from its checkpoint on re-run; SIGTERM / SIGINT inside an
AT or fine-tuning epoch checkpoint that step, close the MLflow runs KILLED, exit 143 / 130, and resume bitwise."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rift_dist.checkpoint_ids import checkpoint_id, checkpoint_position

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
            if any(int(p.stem.split("-")[1]) >= checkpoint_id(1, 1) for p in found):
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


# ----------------------------------------------------------------------------- SIGTERM / SIGINT mid-epoch

def _signal_config(tmp_path):
    """A tiny config whose only mid-epoch checkpoints are the ones a signal writes (checkpoint_every 0)."""
    return tiny_config(tmp_path, train={"epochs": 2, "milestones": [1], "checkpoint_every": 0,
                                        "attack": {"num_steps": 2}, "eval_attack_steps": 1},
                       finetune={"epochs": 2, "milestones": [1], "modules": ["layer2.1.conv2"]})


@pytest.fixture(scope="module")
def signal_reference(tmp_path_factory):
    """An uninterrupted train + finetune of :func:`_signal_config` (shared by the signal tests)."""
    tmp = tmp_path_factory.mktemp("signal-reference")
    cfg = _signal_config(tmp)
    rift("train", str(cfg), "--run-dir", str(tmp / "run"))
    rift("finetune", str(cfg), "--run-dir", str(tmp / "run"))
    return tmp / "run"


def _send_signal_mid_epoch(stage: str, cfg, run_dir, sig: int, marker: str, timeout: float = 300,
                           extra: tuple[str, ...] = ()):
    """Run ``rift <stage> [extra]`` (progress lines on) and send ``sig`` to its process group -- as Ctrl-C and
    ``scancel`` do -- when ``marker`` (a progress line of the first epoch) appears.  Returns (rc, output)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "rift_dist.cli", stage, str(cfg), "--run-dir", str(run_dir),
                             *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, sent = [], False
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and line.startswith(marker):
                os.killpg(proc.pid, sig)
                sent = True
            assert time.time() < deadline, "".join(lines)[-3000:]
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sent, f"{marker!r} never appeared:\n{''.join(lines)[-3000:]}"
    return rc, "".join(lines)


def _mid_epoch_checkpoints(run_dir, stage):
    """(epoch, step) of the stage's checkpoints whose step is > 0 (written inside an epoch)."""
    found = [int(p.stem.split("-")[1]) for p in (run_dir / stage / "checkpoints").glob("ckpt-*.pt")]
    return [checkpoint_position(n) for n in found if checkpoint_position(n)[1]]


def _mlflow_status(run_dir, name):
    """Status of the run directory's MLflow parent run and of its child run called ``name``."""
    from mlflow.tracking import MlflowClient

    marker = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=marker["tracking_uri"])
    parent = client.get_run(marker["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{marker['run_id']}' and tags.`rift.stage` = '{name}'")
    return parent.info.status, [c.info.status for c in children]


def _without_timing(path):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in json.loads(path.read_text())]


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])  # SIGINT in the default run: the fine-tuning test
def test_signal_mid_training_epoch_checkpoints_then_resumes_bitwise(tmp_path, signal_reference, sig):
    """SIGTERM (scancel, preemption) / SIGINT (Ctrl-C) in the middle of an AT epoch: the step in flight is
    finished, a checkpoint of that step boundary is written, MLflow runs are closed KILLED, the exit status is
    143 / 130 with one line saying how to resume; the re-run resumes at that step and ends with the same model
    file (bytes) and history (train metrics over the whole resumed epoch) as an uninterrupted run."""
    cfg = _signal_config(tmp_path)
    run_dir = tmp_path / "run"
    rc, out = _send_signal_mid_epoch("train", cfg, run_dir, sig, "AT epoch 1: 1/")
    assert rc == 128 + sig, out[-3000:]
    assert f"{signal.Signals(sig).name} received" in out and "re-run the same command to resume" in out, out[-2000:]
    mid = _mid_epoch_checkpoints(run_dir, "train")
    assert mid and all(epoch == 0 for epoch, _ in mid), (mid, out[-2000:])
    assert not (run_dir / "train" / "done.json").exists()
    assert _mlflow_status(run_dir, "adversarial_training") == ("KILLED", ["KILLED"])

    again = rift("train", str(cfg), "--run-dir", str(run_dir))
    assert f"resuming at epoch 1, step {mid[0][1]}" in again.stdout, again.stdout[-2000:]
    assert (run_dir / "train" / "model.pt").read_bytes() == (signal_reference / "train" / "model.pt").read_bytes()
    assert _without_timing(run_dir / "train" / "history.json") == \
        _without_timing(signal_reference / "train" / "history.json")
    assert _mlflow_status(run_dir, "adversarial_training")[1] == ["FINISHED"]  # the same child run, continued


def test_sigint_mid_finetune_epoch_checkpoints_then_resumes_bitwise(tmp_path, signal_reference):
    """Ctrl-C inside a fine-tuning epoch: checkpoint at the step boundary, exit 130, resume there, same bytes."""
    cfg = _signal_config(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(signal_reference / "train", run_dir / "train")  # the finished AT stage (its done marker too)
    (run_dir / "train" / "checkpoints").exists() and shutil.rmtree(run_dir / "train" / "checkpoints")
    rc, out = _send_signal_mid_epoch("finetune", cfg, run_dir, signal.SIGINT, "FT epoch 1: 1/")
    assert rc == 130, out[-3000:]
    mid = _mid_epoch_checkpoints(run_dir, "finetune")
    assert mid and all(epoch == 0 for epoch, _ in mid), (mid, out[-2000:])
    assert _mlflow_status(run_dir, "finetune") == ("KILLED", ["KILLED"])

    again = rift("finetune", str(cfg), "--run-dir", str(run_dir))
    assert f"resuming at epoch 1, step {mid[0][1]}" in again.stdout, again.stdout[-2000:]
    assert (run_dir / "finetune" / "model.pt").read_bytes() == \
        (signal_reference / "finetune" / "model.pt").read_bytes()
    assert _without_timing(run_dir / "finetune" / "history.json") == \
        _without_timing(signal_reference / "finetune" / "history.json")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_a_two_rank_run_checkpoints_on_both_ranks_then_resumes_bitwise(tmp_path, sig):
    """`rift train --nproc 2` signalled through its process group (Ctrl-C, kill -TERM -pgid): torchrun runs in
    its own group, so every process gets the signal once (before, torchrun got it twice and died inside its
    own shutdown, and the ranks exited without a checkpoint); both ranks stop at the same step, exit status
    143 / 130, and the 2-rank re-run ends with the model file of an uninterrupted 2-rank run.

    With ``distributed.sync_bn`` (equal BatchNorm running statistics on every rank).  Without it, each rank's
    running statistics drift apart within an epoch and a checkpoint holds rank 0's only, so after a mid-epoch
    resume rank 1's attack (eval-mode BatchNorm) differs: a valid continuation, not the same bytes."""
    cfg = _signal_config(tmp_path)
    text = cfg.read_text() + "distributed:\n  sync_bn: true\n"
    cfg.write_text(text)
    reference = tmp_path / "reference"
    rift("train", str(cfg), "--run-dir", str(reference), "--nproc", "2")
    run_dir = tmp_path / "run"
    rc, out = _send_signal_mid_epoch("train", cfg, run_dir, sig, "AT epoch 1: 1/", extra=("--nproc", "2"))
    assert rc == 128 + sig, out[-3000:]
    assert out.count("re-run the same command to resume") == 2, out[-3000:]  # one line per rank
    mid = _mid_epoch_checkpoints(run_dir, "train")
    assert mid and all(epoch == 0 for epoch, _ in mid), (mid, out[-2000:])
    again = rift("train", str(cfg), "--run-dir", str(run_dir), "--nproc", "2")
    assert f"resuming at epoch 1, step {mid[0][1]}" in again.stdout, again.stdout[-2000:]
    assert (run_dir / "train" / "model.pt").read_bytes() == (reference / "train" / "model.pt").read_bytes()
    assert _without_timing(run_dir / "train" / "history.json") == _without_timing(reference / "train" / "history.json")
