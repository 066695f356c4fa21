"""The whole graph on real CIFAR-10 images with a very narrow net: artefacts, MLflow runs, skip on re-run."""

import csv
import json
from pathlib import Path

import pytest

from tests.integration.pipeline_helpers import rift, shared_data, tiny_config

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def test_end_to_end_and_rerun_skips(tmp_path):
    cfg = tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    first = rift("run", str(cfg), "--run-dir", str(run_dir))
    assert "RiFT" in first.stdout and "alpha*" in first.stdout

    with (run_dir / "mrc.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [k for k in rows[0]] == ["module", "num_params", "mrc", "robust_accuracy_drop"]
    assert len(rows) == 21 and len({r["module"] for r in rows}) == 21
    mrcs = [float(r["mrc"]) for r in rows]
    assert mrcs == sorted(mrcs) and min(mrcs) >= 0.0

    with (run_dir / "interpolation.csv").open() as fh:
        interp = list(csv.DictReader(fh))
    assert [float(r["alpha"]) for r in interp] == [0.0, 0.5, 1.0]

    summary = json.loads((run_dir / "summary.json").read_text())
    for model in ("at", "rift"):
        for key in ("clean_accuracy", "robust_accuracy", "corruption_accuracy"):
            assert 0.0 <= summary[model][key] <= 1.0
        assert summary[model]["robust_accuracy"] <= summary[model]["clean_accuracy"]
    assert summary["alpha"] in (0.0, 0.5, 1.0) and len(summary["modules"]) == 1
    assert summary["corruption_set"]["regenerated"] is True
    if summary["alpha"] == 0.0:  # RiFT = AT: evaluated once, and said so
        assert summary["rift"]["same_as_at"] is True and summary["rift"]["seconds"] == 0.0
        assert "the RiFT model is the AT model" in (run_dir / "summary.md").read_text()
    else:
        assert "same_as_at" not in summary["rift"]
    assert (run_dir / "mrc" / "mrc.png").stat().st_size > 1000
    assert (run_dir / "interpolate" / "interpolation.png").stat().st_size > 1000

    # MLflow: one parent run, children for every stage and every alpha, tied by mlflow.parentRunId
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rift")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["model.width"] == "4" and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = {r.info.run_name for r in children}
    assert {"adversarial_training", "mrc", "finetune", "interpolation", "evaluation"} <= names
    interp_run = next(r for r in children if r.info.run_name == "interpolation")
    alpha_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == interp_run.info.run_id]
    assert len(alpha_runs) == 3
    at_run = next(r for r in children if r.info.run_name == "adversarial_training")
    assert len(client.get_metric_history(at_run.info.run_id, "val_robust_accuracy")) == 2
    artifacts = {a.path for a in client.list_artifacts(next(r for r in children if r.info.run_name == "mrc").info.run_id)}
    assert {"mrc.csv", "mrc.png"} <= artifacts

    # results first: the parent run carries the module, alpha*, the table as its description, headline %
    assert parent.data.tags["rift.modules"] == ",".join(summary["modules"])
    assert parent.data.tags["rift.alpha_star"] == f"{summary['alpha']:g}"
    assert parent.data.tags["rift.dataset"] == "cifar10" and parent.data.tags["rift.arch"] == "resnet18"
    assert "| clean accuracy |" in parent.data.tags["mlflow.note.content"]
    assert abs(parent.data.metrics["at_clean_accuracy_pct"] - 100 * summary["at"]["clean_accuracy"]) < 1e-9
    curve = client.get_metric_history(interp_run.info.run_id, "alpha")
    assert sorted((m.step, m.value) for m in curve) == [(0, 0.0), (1, 0.5), (2, 1.0)]  # x axis: alpha, not alpha x 100

    _check_mlflow_ui(run_dir.parent, exp.experiment_id, parent.info.run_id, summary)

    second = rift("run", str(cfg), "--run-dir", str(run_dir))
    for stage in ("train", "mrc", "finetune", "interpolate", "evaluate"):
        assert f"[{stage}] already done" in second.stdout
    runs_after = client.search_runs([exp.experiment_id], max_results=100)
    assert len([r for r in runs_after if "mlflow.parentRunId" not in r.data.tags]) == 1  # same parent run continued

    # A changed setting on the finished run is refused before anything is written: the run directory,
    # its config.yaml and the MLflow store (status, params, tags) keep every byte.
    from tests.integration.test_run_lock import tree_digest

    before = tree_digest(run_dir.parent)
    refused = rift("run", str(cfg), "--run-dir", str(run_dir), "--set", "finetune.lr=0.05", check=False)
    assert refused.returncode == 1 and "produced with a different config" in refused.stderr
    assert "finetune.lr" in refused.stderr
    assert tree_digest(run_dir.parent) == before
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # Headline tables deleted by hand: the stages that wrote them are not "done" any more; a re-run rebuilds
    # them from what is on disk (module pieces, alpha points, evaluated points) with the same numbers.
    kept = {name: (run_dir / name).read_text() for name in ("mrc.csv", "interpolation.csv")}
    for name in ("mrc.csv", "interpolation.csv", "summary.json"):
        (run_dir / name).unlink()
    third = rift("run", str(cfg), "--run-dir", str(run_dir))
    for stage, name in (("mrc", "mrc.csv"), ("interpolate", "interpolation.csv"), ("evaluate", "summary.json")):
        assert third.stderr.count(f"stage '{stage}' in {run_dir} is marked done but {name} is missing") == 1
        assert f"[{stage}] already done" not in third.stdout
    for stage in ("train", "finetune"):
        assert f"[{stage}] already done" in third.stdout
    assert {name: (run_dir / name).read_text() for name in kept} == kept
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["modules"] == summary["modules"] and again["alpha"] == summary["alpha"]
    for model in ("at", "rift"):
        for key in ("clean_accuracy", "robust_accuracy", "corruption_accuracy"):
            assert again[model][key] == summary[model][key], (model, key)


def _check_mlflow_ui(store: Path, experiment_id: str, parent_id: str, summary: dict) -> None:
    """The real MLflow UI in headless Chromium: the experiment opens on the training runs table (with the
    link rift prints) and the parent run page shows the module, alpha* and the AT-vs-RiFT table."""
    from tests.integration.mlflow_ui import CHROMIUM, OUTPUT, render
    from tests.integration.test_mlflow_tracking import MlflowServer

    if CHROMIUM is None:
        pytest.skip("chromium not installed (scripts/install_chromium.sh installs Debian's package)")
    server = MlflowServer(store).start()
    try:
        experiment = render(f"{server.uri}/#/experiments/{experiment_id}?workflowType=machine_learning",
                            OUTPUT / "experiment.png")
        assert "Run Name" in experiment and ">tiny<" in experiment  # the training runs table, our parent run
        assert "Detect Issues" not in experiment  # not the GenAI traces overview
        page = render(f"{server.uri}/#/experiments/{experiment_id}/runs/{parent_id}?workflowType=machine_learning",
                      OUTPUT / "parent-run.png")
        assert "rift.modules" in page and summary["modules"][0] in page
        assert "rift.alpha_star" in page and f"alpha* = {summary['alpha']:g}" in page
        assert "clean accuracy" in page and "delta (pp)" in page  # the description is the table
        assert (OUTPUT / "parent-run.png").stat().st_size > 20_000
    finally:
        server.stop()
