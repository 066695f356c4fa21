"""`rift submit` with a real `mlflow server`: one parent run, one child per job / array task, the server
stopped while a job trains (the job goes on; its metrics are buffered and arrive when it is back)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rift_dist import cluster
from tests.integration.slurm.test_submit import PROFILE, _cfg, _wait
from tests.integration.test_mlflow_tracking import MlflowServer

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _wait_for(predicate, timeout_s: float, what: str, run_dir: Path) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    logs = "\n".join(p.read_text()[-2000:] for p in run_dir.glob("jobs/*/*.err"))
    pytest.fail(f"{what} did not happen within {timeout_s}s\n{logs}", pytrace=False)


def test_server_stopped_while_training_then_array_logs_to_it(slurm_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "server").start()
    try:
        cfg = _cfg(tmp_path, train={"epochs": 30, "milestones": [29], "checkpoint_every": 0, "attack": {"num_steps": 6},
                                    "eval_attack_steps": 1},
                   tracking={"uri": server.uri, "experiment": "rift-http"})
        run_dir = tmp_path / "run"
        profile = cluster.load_profile(PROFILE, ["stages.mrc.array_size=4"])
        record = cluster.submit(cfg, profile, run_dir, stages=["train", "mrc"], log=lambda _: None)
        client = MlflowClient(tracking_uri=server.uri)
        keys = {p.stem: json.loads(p.read_text())["run_id"] for p in (run_dir / "mlflow").glob("*.json")}
        at_run = keys["adversarial_training"]

        def epochs_logged() -> int:
            try:
                return len(client.get_metric_history(at_run, "val_robust_accuracy"))
            except Exception:  # noqa: BLE001 - server starting
                return 0

        _wait_for(lambda: epochs_logged() >= 1, 240, "the first epoch's metrics", run_dir)
        t_down = time.time()
        server.stop()
        ckpts = run_dir / "train" / "checkpoints"
        _wait_for(lambda: any(int(p.stem.split("-")[1]) >= 3_000_000 for p in ckpts.glob("ckpt-*.pt")), 240,
                  "two epochs logged while the server is down", run_dir)
        server.start()
        down_for = time.time() - t_down
        _wait(run_dir, slurm_cluster, 420)

        assert cluster.status(run_dir, log=lambda _: None)["failed"] == []
        train_err = "".join(p.read_text() for p in run_dir.glob("jobs/train/*.err"))
        assert "writes are buffered" in train_err, train_err[-3000:]
        assert epochs_logged() == 30  # every epoch arrived, the ones logged while the server was down included
        runs = client.search_runs([client.get_experiment_by_name("rift-http").experiment_id], max_results=100)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.run_id == record["tracking"]["parent_run_id"]
        parent_id = parents[0].info.run_id
        assert parents[0].info.status == "FINISHED" and parents[0].data.params["model.width"] == "4"
        by_name = {r.info.run_name: r for r in runs}
        for name in ("adversarial_training", "mrc"):
            assert by_name[name].data.tags["mlflow.parentRunId"] == parent_id
            assert by_name[name].info.status == "FINISHED"
        mrc_id = by_name["mrc"].info.run_id
        tasks = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == mrc_id]
        assert sorted(r.info.run_name for r in tasks) == ["mrc-prepare"] + [f"mrc-task-{i}" for i in range(4)]
        assert all(r.info.status == "FINISHED" and r.data.tags.get("slurm.job_id") for r in tasks)
        sent_later = "reachable again" in train_err  # the job sent its own buffer (server back before it ended)
        print(f"\nserver down {down_for:.0f}s during training; job COMPLETED; 30/30 epochs in MLflow "
              f"({'sent by the job itself' if sent_later else 'saved to mlflow/pending and sent by the next job'}); "
              f"parent + {len(runs) - 1} child runs")
    finally:
        server.stop()
