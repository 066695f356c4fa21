"""rift compare on three AT bases (issue 16, RiFT Table 2) end to end on real CIFAR-10 images: PGD-AT and TRADES
trained here, and an imported checkpoint; AutoAttack on the test points; the folders, tables and MLflow tree."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.integration.pipeline_helpers import rift, shared_data, tiny_config

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")

METHODS = ["rift", "all-layers"]
BASES = ["pgd", "trades", "theirs"]


@pytest.mark.slow  # ~2 min on 2 cores: two AT trainings, three MRC tables, six fine-tunings, AutoAttack
def test_three_bases_trained_and_imported_with_autoattack(tmp_path):
    from mlflow.tracking import MlflowClient

    from rift_dist.config import load_config
    from rift_dist.models import build_model

    torch.manual_seed(5)
    theirs = build_model(load_config(None, ["model.width=4"])).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.items()}, "epoch": 9}, tmp_path / "theirs.pt")
    cfg = tiny_config(tmp_path, compare={"seeds": [0], "methods": METHODS, "autoattack": True,
                                         "autoattack_examples": 10,
                                         "bases": ["pgd", "trades", {"name": "theirs",
                                                                     "checkpoint": str(tmp_path / "theirs.pt")}]},
                      eval={"autoattack_attacks": ["apgd-ce", "square"], "autoattack_steps": 3,
                            "autoattack_queries": 10})
    run = tmp_path / "run"
    proc = rift("compare", str(cfg), "--run-dir", str(run))
    assert not (run / "seed-0").exists()  # every base in its own folder
    at = {b: torch.load(run / f"base-{b}" / "seed-0" / "train" / "model.pt", weights_only=True) for b in BASES}
    assert any(not torch.equal(at["pgd"][k], at["trades"][k]) for k in at["pgd"])  # two different AT models
    assert all(torch.equal(at["theirs"][k], theirs[k]) for k in theirs)  # the imported weights themselves
    assert (run / "base-theirs" / "seed-0" / "train" / "import_report.json").is_file()
    assert not (run / "base-theirs" / "seed-0" / "train" / "history.json").exists()  # nothing trained
    assert (run / "base-trades" / "seed-0" / "train" / "history.json").is_file()
    assert "[train] skipped: using" in proc.stdout

    rows = list(csv.DictReader((run / "compare" / "pareto.csv").open()))
    assert {r["base"] for r in rows} == set(BASES)
    for b in BASES:
        test = [r for r in rows if r["base"] == b and r["split"] == "test"]
        assert sorted(r["method"] for r in test) == sorted(["at"] + METHODS)
        assert all(r["autoattack"] != "" and r["autoattack_n"] == "10" for r in test)
        assert all(float(r["autoattack"]) <= float(r["robust"]) + 0.5 for r in test)  # 10 images vs 100: loose
    md = (run / "compare" / "summary.md").read_text()
    assert "## Base pgd: trained here: PGD-AT" in md and "## Base trades: trained here: TRADES" in md
    assert f"## Base theirs: imported from {tmp_path / 'theirs.pt'}" in md
    assert md.count("| AutoAttack |") == 3
    summary = json.loads((run / "compare" / "summary.json").read_text())
    assert [b["base"] for b in summary["bases"]] == BASES
    assert all(row.get("autoattack") for b in summary["bases"] for row in b["table"])

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rift").experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("rift.kind") == "compare"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["rift.bases"] == "pgd,trades,theirs"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert {r.info.run_name for r in children} == (
        {f"{m} base={b} seed=0" for m in METHODS for b in BASES} | {f"AT + MRC base={b} seed=0" for b in BASES})
    assert all(r.data.tags["rift.base"] in BASES for r in children)
    rift_trades = next(r for r in children if r.info.run_name == "rift base=trades seed=0")
    assert "method.autoattack_accuracy" in rift_trades.data.metrics
    at_pgd = next(r for r in children if r.info.run_name == "AT + MRC base=pgd seed=0")
    below = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == at_pgd.info.run_id]
    assert "adversarial_training" in below and "mrc" in below  # the stages' runs in the same store, under it

    # AutoAttack on other images: only AutoAttack runs again (compare.autoattack_examples is not in the signature)
    again = rift("compare", str(cfg), "--run-dir", str(run), "--set", "compare.autoattack_examples=5")
    assert "fine-tuning" not in again.stdout and "[train] epoch" not in again.stdout
    assert again.stdout.count("% on 5 images") == 3 * (1 + len(METHODS)) - sum(  # the AT model's once per base
        float(r["alpha"]) == 0.0 for r in rows if r["split"] == "test" and r["method"] != "at")
    rows = list(csv.DictReader((run / "compare" / "pareto.csv").open()))
    assert {r["autoattack_n"] for r in rows if r["split"] == "test"} == {"5"}

    from rift_dist import paper_table  # rift report: a row per (method, base), the bases not pooled as seeds

    table, _, _ = paper_table.report("rift", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "report",
                                     echo=lambda _: None)
    assert sorted(r["method"] for r in table) == sorted(
        ["rift", "all-layers", "rift [trades]", "all-layers [trades]", "rift [theirs]", "all-layers [theirs]"])
    assert all(r["seeds"] == [0] for r in table)
