"""`rift run CONFIG --nproc 2` runs the whole stage graph under torchrun; only rank 0 prints and tracks."""

import json

import pytest

from tests.integration.distributed_helpers import DATA_MISSING, DATA_REASON, rift_cli
from tests.integration.pipeline_helpers import tiny_config

pytestmark = pytest.mark.skipif(DATA_MISSING, reason=DATA_REASON)


@pytest.mark.slow
def test_whole_pipeline_under_nproc_2_with_mlflow(tmp_path):
    cfg = tiny_config(tmp_path, data={"loader": "torch", "train_subset": 256, "val_size": 100, "test_subset": 100,
                                      "batch_size": 64, "eval_batch_size": 100, "corruption_generate": True,
                                      "corruptions": ["gaussian_noise"], "severities": [1]},
                      distributed={"sync_bn": True, "timeout_s": 120})
    run_dir = tmp_path / "runs" / "tiny"
    out = rift_cli("run", str(cfg), "--run-dir", str(run_dir), nproc=2, timeout=1200).stdout
    assert "2 process(es)" in out
    for stage in ("train", "mrc", "finetune", "interpolate", "evaluate"):
        assert out.count(f"[{stage}] finished in") == 1, out[-3000:]  # rank 0 prints, once
        assert (run_dir / stage / "done.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["alpha"] in (0.0, 0.5, 1.0) and len(summary["modules"]) == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rift").experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    for name in ("adversarial_training", "mrc", "finetune", "interpolation", "evaluation"):
        assert children.count(name) == 1, children  # one run per stage: rank 1 logged nothing
