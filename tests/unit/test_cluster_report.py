"""`rift report`: Table 1 of the paper from pipelines recorded in MLflow (mean and std over seeds)."""

from __future__ import annotations

import csv

import pytest

from rift_dist import paper_table


def record(ds, arch, seed, start, at, rift, run_id=None):
    metrics = {}
    for model, values in (("at", at), ("rift", rift)):
        for (_, name), v in zip(paper_table.METRICS, values):
            if v is not None:
                metrics[f"{model}.{name}"] = v
    return {"dataset": ds, "arch": arch, "seed": seed, "run_id": run_id or f"{ds}-{arch}-{seed}-{start}",
            "name": "x", "start": start, "status": "FINISHED", "metrics": metrics}


def test_rows_mean_std_deltas_and_newest_run_per_seed():
    recs = [
        record("cifar10", "resnet18", 0, 1, (0.80, 0.70, 0.50), (0.82, 0.72, 0.50)),
        record("cifar10", "resnet18", 1, 2, (0.82, 0.72, 0.52), (0.86, 0.74, 0.53)),
        record("cifar10", "resnet18", 1, 0, (0.10, 0.10, 0.10), (0.10, 0.10, 0.10), run_id="old"),
        record("tiny-imagenet", "wrn34_10", 0, 3, (0.5, None, 0.2), (0.55, None, 0.21)),
        record("cifar100", "resnet18", 0, 4, (0.6, 0.5, 0.3), (0.61, 0.5, 0.3)),
    ]
    rows, notes = paper_table.table_rows(recs)
    assert [(r["dataset"], r["arch"]) for r in rows] == [("cifar10", "resnet18"), ("cifar100", "resnet18"),
                                                         ("tiny-imagenet", "wrn34_10")]
    c10 = rows[0]
    assert c10["seeds"] == [0, 1] and "old" not in c10["runs"] and any("old" in n for n in notes)
    assert c10["at.clean"][0] == pytest.approx(81.0) and c10["at.clean"][1] == pytest.approx(1.41421, rel=1e-4)
    assert c10["delta.clean"][0] == pytest.approx(3.0) and c10["delta.robust"][0] == pytest.approx(0.5)
    assert rows[1]["at.clean"][1] is None  # one seed: no std
    assert rows[2]["at.ood"] == (None, None)  # no corruption set evaluated
    md = paper_table.to_markdown(rows, "rift", notes)
    assert "| CIFAR-10 | ResNet-18 | rift | 81.00 ± 1.41 |" in md and "+3.00 ± 1.41" in md
    assert "81.46 / 73.56 / 53.63" in md  # the paper's row beside ours
    assert "| Tiny-ImageNet | WRN-34-10 | rift | 50.00 | - |" in md


def test_report_reads_parent_runs_from_a_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("table1")
    for seed, (at_clean, rift_clean) in enumerate([(0.80, 0.83), (0.82, 0.84)]):
        run = client.create_run(exp, run_name=f"seed{seed}")
        rid = run.info.run_id
        for k, v in {"data.dataset": "cifar10", "model.arch": "resnet18", "seed": seed}.items():
            client.log_param(rid, k, v)
        for k, v in {"at.clean_accuracy": at_clean, "at.corruption_accuracy": 0.7, "at.robust_accuracy": 0.5,
                     "rift.clean_accuracy": rift_clean, "rift.corruption_accuracy": 0.72,
                     "rift.robust_accuracy": 0.5}.items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid)
    child = client.create_run(exp, run_name="evaluation", tags={"mlflow.parentRunId": rid})
    client.set_terminated(child.info.run_id)
    unfinished = client.create_run(exp, run_name="still-running")
    client.log_param(unfinished.info.run_id, "data.dataset", "cifar10")
    rows, csv_path, md_path = paper_table.report("table1", uri, tmp_path / "out", echo=lambda _: None)
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert rows[0]["delta.clean"][0] == pytest.approx(2.5)
    with csv_path.open() as fh:
        line = next(csv.DictReader(fh))
    assert line["n_seeds"] == "2" and float(line["rift.clean_mean"]) == pytest.approx(83.5)
    text = md_path.read_text()
    assert "still-running" in text and "no final metrics" in text
    with pytest.raises(paper_table.ReportError, match="no experiment 'nope'"):
        paper_table.report("nope", uri, tmp_path / "out", echo=lambda _: None)


def test_report_refuses_a_wrong_store_or_out_without_writing(tmp_path, monkeypatch):
    """A sqlite URI to a missing file created an empty database (and its folders); an unreachable server and an
    --out that is a file were tracebacks."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(paper_table.ReportError, match=r"no MLflow database at .*nowhere/mlflow.db"):
        paper_table.report("rift", f"sqlite:///{missing}", tmp_path / "out", echo=lambda _: None)
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "out").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    with pytest.raises(paper_table.ReportError, match="no MLflow database"):
        paper_table.report("rift", None, tmp_path / "out", echo=lambda _: None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(paper_table.ReportError, match=r"cannot read the MLflow store http://127.0.0.1:9.*server up"):
        paper_table.report("rift", "http://127.0.0.1:9", tmp_path / "out", echo=lambda _: None)
    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    with pytest.raises(paper_table.ReportError, match=r"--out .*out.txt is a file"):
        paper_table.report("rift", f"sqlite:///{missing}", a_file, echo=lambda _: None)
    assert a_file.read_text() == "mine" and not (tmp_path / "out").exists()
