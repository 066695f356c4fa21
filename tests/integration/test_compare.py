"""rift compare end to end on real CIFAR-10 images: two seeds, five methods, the files and the MLflow tree."""

from __future__ import annotations

import csv

import pytest

from tests.integration.pipeline_helpers import rift, tiny_config

METHODS = ["rift", "most-critical", "top-2", "all-layers", "logit-mix"]


@pytest.mark.slow  # ~2 min on 2 cores
def test_two_seed_tiny_comparison_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, compare={"seeds": [0, 1], "methods": METHODS},
                      interpolation={"alphas": [0.0, 0.5, 1.0]})
    run = tmp_path / "run"
    proc = rift("compare", str(cfg), "--run-dir", str(run))
    assert "paired t 95 % interval over 2 seeds" in proc.stdout
    assert "sampling noise" in proc.stdout
    out = run / "compare"
    for name in ("pareto.csv", "summary.md", "summary.json", "pareto.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert set(rows[0]) >= {"method", "seed", "alpha", "split", "clean", "robust", "corruption"}
    for seed in ("0", "1"):
        val = [r for r in rows if r["seed"] == seed and r["split"] == "val"]
        test = [r for r in rows if r["seed"] == seed and r["split"] == "test"]
        assert len(val) == 1 + 2 * len(METHODS)  # AT + alphas 0.5 and 1 per method
        assert sorted(r["method"] for r in test) == sorted(["at"] + METHODS)
        assert any(r["on_front"] == "1" for r in val)
    for m in ("rift", "most-critical", "top-2", "all-layers"):  # logit-mix trains nothing
        assert (run / "seed-0" / "compare" / m / "finetune" / "done.json").is_file()
    assert not (run / "seed-0" / "compare" / "logit-mix" / "finetune").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rift")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("rift.kind") == "compare"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    names = {r.info.run_name for r in children}
    assert names == {f"{m} seed={s}" for m in METHODS for s in (0, 1)} | {f"AT + MRC seed={s}" for s in (0, 1)}
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "compare")}
    assert arts == {f"compare/{n}" for n in ("pareto.csv", "summary.md", "summary.json", "pareto.png")}
    # a second call resumes: nothing is trained again
    again = rift("compare", str(cfg), "--run-dir", str(run))
    assert "fine-tuning" not in again.stdout and "[train] already done" in again.stdout
