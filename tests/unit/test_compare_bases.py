"""rift compare's AT bases (issue 16, RiFT Table 2) and its AutoAttack column: how the bases expand (folders, the
pareto.csv column, MLflow names), that the default stays the one-base layout, that an imported base's checkpoint is
checked before anything is written, one SLURM job per (base, seed), and AutoAttack's column only when asked for."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rift_dist import compare
from rift_dist.config import CompareBase, ConfigError, load_config
from rift_dist.models import build_model

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(__import__("os").environ.get("RIFT_SHARED_DATA", ROOT.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").is_file(),
                                reason="cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def test_the_default_is_the_runs_own_base_in_the_one_base_layout(tmp_path):
    cfg = load_config(None)
    assert compare.compare_bases(cfg) == [CompareBase("pgd")] and compare.is_flat(cfg)
    assert compare.base_dir(cfg, tmp_path, "pgd") == tmp_path  # seed-<s>/ directly in the run dir, as before
    trades = load_config(None, ["train.method=trades"])
    assert compare.compare_bases(trades) == [CompareBase("trades")] and compare.is_flat(trades)
    same = load_config(None, ["compare.bases=[pgd]"])  # the run's own base written out: the same layout
    assert compare.is_flat(same)
    imported = load_config(None, [f"from_checkpoint={tmp_path / 'at.pt'}"])
    assert compare.compare_bases(imported) == [CompareBase("imported", str(tmp_path / "at.pt"))]
    assert compare.is_flat(imported)


def test_listed_bases_get_their_own_folders_and_configs(tmp_path):
    cfg = load_config(None, [f"compare.bases=[pgd, trades, {{name: ext, checkpoint: {tmp_path}/x.pt}}]"])
    assert [b.name for b in compare.compare_bases(cfg)] == ["pgd", "trades", "ext"] and not compare.is_flat(cfg)
    assert compare.base_dir(cfg, tmp_path, "trades") == tmp_path / "base-trades"
    b_pgd, b_trades, b_ext = compare.compare_bases(cfg)
    assert compare.base_config(cfg, b_trades).train.method == "trades"
    assert compare.base_config(cfg, b_trades).from_checkpoint == ""
    assert compare.base_config(cfg, b_ext).from_checkpoint == f"{tmp_path}/x.pt"
    assert cfg.train.method == "pgd" and cfg.from_checkpoint == ""  # the config itself is left alone
    assert not compare.is_flat(load_config(None, ["compare.bases=[trades]"]))  # not the run's own: base-trades/


@pytest.mark.parametrize("bases,match", [
    ("[foo]", r"'compare.bases\[0\]' is 'foo' without a checkpoint.*pgd, trades, mart"),
    ("[pgd, pgd]", "names 'pgd' twice"),
    ("[{name: 'a/b', checkpoint: x.pt}]", r"'compare.bases\[0\].name' is 'a/b'"),
    ("[{name: x, path: x.pt}]", r"unknown key 'compare.bases\[0\].path'"),
])
def test_bad_bases_are_refused_at_load(bases, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"compare.bases={bases}"])


def _point(rng, n, aa=None):
    scores = {k: (rng.random(n) < p).astype(float) for k, p in (("clean", 0.8), ("robust", 0.5), ("corruption", 0.7))}
    p = {"clean": scores["clean"].mean(), "robust": scores["robust"].mean(),
         "corruption": scores["corruption"].mean(), "n": n, "scores": scores}
    if aa is not None:
        p.update(autoattack=aa, autoattack_n=10)
    return p


def _results(seed, with_aa):
    rng = np.random.default_rng(seed)
    aa = (lambda: float(rng.integers(0, 10)) / 10) if with_aa else (lambda: None)
    val = lambda: _point(rng, 40)  # noqa: E731
    sweep = lambda: [{"alpha": a, "clean_accuracy": p["clean"], "robust_accuracy": p["robust"],  # noqa: E731
                      "corruption_accuracy": p["corruption"], "n": 40} for a, p in ((0.0, val()), (1.0, val()))]
    return {"at": {"val": val(), "test": _point(rng, 40, aa())},
            "methods": {m: {"modules": mods, "sweep": sweep(), "alpha": 1.0, "test": _point(rng, 40, aa())}
                        for m, mods in (("rift", ["layer1.0.conv1"]), ("all-layers", None))}}


@pytest.mark.parametrize("with_aa", [False, True])
def test_the_base_column_and_the_autoattack_column_only_when_asked(tmp_path, with_aa):
    cfg = load_config(None, ["compare.bases=[pgd, trades]", "compare.methods=[rift, all-layers]",
                             f"compare.autoattack={str(with_aa).lower()}"])
    by_base = {b: {0: _results(i, with_aa)} for i, b in enumerate(("pgd", "trades"))}
    rows = [r for b, res in by_base.items() for r in compare.pareto_rows(res, b)]
    compare.write_pareto_csv(tmp_path / "pareto.csv", rows, compare.csv_fields(cfg))
    got = list(csv.DictReader((tmp_path / "pareto.csv").open()))
    assert list(got[0])[:2] == ["base", "method"] and ("autoattack" in got[0]) == with_aa
    assert {r["base"] for r in got} == {"pgd", "trades"} and len(got) == 2 * (1 + 2 + 3)  # val: AT + 2, test: 3
    if with_aa:
        assert all(r["autoattack"] == "" for r in got if r["split"] == "val")
        assert all(r["autoattack"] != "" and r["autoattack_n"] == "10" for r in got if r["split"] == "test")
    reports = []
    for b in compare.compare_bases(cfg):
        table = compare.method_table(by_base[b.name], ["rift", "all-layers"], 0.95)
        assert ("autoattack" in table[0]) == with_aa
        if with_aa:
            assert table[1]["autoattack"]["mean"] == by_base[b.name][0]["methods"]["rift"]["test"]["autoattack"]
        reports.append({"base": b, "results": by_base[b.name], "table": table,
                        "verdict": compare.noise_verdict(table)[0], "front": {0: []}})
    md = compare.summary_markdown(cfg, reports, {"corruption": "none"})
    assert "## Base pgd: trained here: PGD-AT" in md and "## Base trades: trained here: TRADES (beta 6)" in md
    assert md.count("| method | trains | alpha* | clean | robust |") == 2
    assert ("| AutoAttack |" in md) == with_aa and ("AutoAttack (apgd-ce" in md) == with_aa
    assert "Table 2 numbers (RiFT on TRADES, MART, AWP, SCORE) are not on hand" in md
    texts = compare.plot_pareto(tmp_path / "pareto.png", by_base, ["rift", "all-layers"])
    assert (tmp_path / "pareto.png").stat().st_size > 0 and texts["title"].startswith("base pgd: ")


def test_one_base_keeps_the_one_table_summary():
    cfg = load_config(None, ["compare.methods=[rift, all-layers]"])
    res = {0: _results(0, False)}
    table = compare.method_table(res, ["rift", "all-layers"], 0.95)
    md = compare.summary_markdown(cfg, [{"base": compare.compare_bases(cfg)[0], "results": res, "table": table,
                                         "verdict": compare.noise_verdict(table)[0], "front": {0: []}}],
                                  {"corruption": "none"})
    assert "## Base" not in md and "AT bases" not in md and md.count("| method | trains |") == 1
    assert "Table 2" not in md


def test_a_submission_queues_a_job_per_base_and_seed(tmp_path, monkeypatch):
    """The debug executor runs the jobs in this process: record what each one asks run_compare for."""
    from rift_dist.cluster import compare_jobs
    from rift_dist.cluster.profile import load_profile

    calls = []
    monkeypatch.setattr(compare, "check_compare", lambda cfg: None)
    monkeypatch.setattr(compare, "run_compare", lambda cfg, run_dir, progress=True, seeds=None, summarize=True,
                        bases=None: calls.append((seeds, bases, summarize)) or {"verdict": "v"})
    cfg = load_config(None, ["compare.bases=[pgd, trades]", "compare.seeds=[0, 1]", "tracking.enabled=false"])
    record = compare_jobs.submit_compare(cfg, load_profile(str(ROOT / "launch" / "local_test.yaml"), []),
                                         tmp_path / "run", executor="debug", log=lambda m: None)
    assert [j["name"] for j in record["jobs"]] == ["compare-pgd-seed-0", "compare-pgd-seed-1", "compare-trades-seed-0",
                                                   "compare-trades-seed-1", "compare-summary"]
    assert calls == [([0], ["pgd"], False), ([1], ["pgd"], False), ([0], ["trades"], False), ([1], ["trades"], False),
                     (None, None, True)]
    calls.clear()
    flat = load_config(None, ["compare.seeds=[0, 1]", "tracking.enabled=false"])  # the default: names as before
    record = compare_jobs.submit_compare(flat, load_profile(str(ROOT / "launch" / "local_test.yaml"), []),
                                         tmp_path / "flat", executor="debug", log=lambda m: None)
    assert [j["name"] for j in record["jobs"]] == ["compare-seed-0", "compare-seed-1", "compare-summary"]
    assert calls[0] == ([0], None, False)


def test_the_submission_dry_run_shows_a_job_per_base_and_seed_and_writes_nothing(tmp_path, monkeypatch):
    from rift_dist.cluster import compare_jobs
    from rift_dist.cluster.profile import load_profile

    monkeypatch.setattr(compare, "check_compare", lambda cfg: None)
    cfg = load_config(None, ["compare.bases=[pgd, trades]", "compare.seeds=[0, 1]"])
    lines = []
    compare_jobs.submit_compare(cfg, load_profile(str(ROOT / "launch" / "example_cluster.yaml"), []),
                                tmp_path / "run", dry_run=True, log=lines.append)
    out = "\n".join(lines)
    assert "4 seed job(s) and a summary job" in out
    for b in ("pgd", "trades"):
        for s in (0, 1):
            assert f"  compare-{b}-seed-{s}: base {b}, seed {s}, 1 node(s) x 1 rank(s)" in out
            assert f"| # rift compare: base {b}, seed {s}" in out
    assert out.count("| # AT bases: pgd, trades") == 5 and out.count("| #!/bin/bash") == 5
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ an imported base, checked up front


def _rift(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "rift_dist.cli", *args, "--no-progress"], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def _tiny(tmp_path, bases: str) -> list[str]:
    return ["--set", f"data.archive={SHARED / 'cifar10-jpeg.tar.gz'}", "--set", "model.width=4", "--set",
            f"compare.bases={bases}", "--set", "compare.seeds=[0]"]


@needs_data
@pytest.mark.parametrize("submit", [False, True])
def test_an_imported_base_that_cannot_be_used_is_refused_before_anything_is_written(tmp_path, submit):
    run = tmp_path / "run"
    extra = ["--submit", "--dry-run", "--profile", str(ROOT / "launch" / "example_cluster.yaml")] if submit else []
    missing = _rift("compare", "configs/compare_default.yaml", "--run-dir", str(run), *extra,
                    *_tiny(tmp_path, f"[pgd, {{name: ext, checkpoint: {tmp_path}/nope.pt}}]"))
    assert missing.returncode != 0 and "compare.bases[1] (ext): checkpoint" in missing.stderr, missing.stderr[-2000:]
    assert "no such file" in missing.stderr and "drop the base from compare.bases" in missing.stderr
    torch.save(build_model(load_config(None, ["model.width=8"])).state_dict(), tmp_path / "w8.pt")  # wrong width
    wrong = _rift("compare", "configs/compare_default.yaml", "--run-dir", str(run), *extra,
                  *_tiny(tmp_path, f"[pgd, {{name: ext, checkpoint: {tmp_path}/w8.pt}}]"))
    assert wrong.returncode != 0 and "cannot be used as the AT model of resnet18 (width 4" in wrong.stderr
    assert "shape" in wrong.stderr and "Set model.*" in wrong.stderr, wrong.stderr[-2000:]
    assert not run.exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


@needs_data
def test_a_fitting_imported_base_passes_the_checks_and_is_planned(tmp_path):
    model = build_model(load_config(None, ["model.width=4"]))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "ddp.pt")  # a DDP-style checkpoint in a container: the converter's job
    proc = _rift("compare", "configs/compare_default.yaml", "--run-dir", str(tmp_path / "run"), "--dry-run",
                 *_tiny(tmp_path, f"[trades, {{name: theirs, checkpoint: {tmp_path}/ddp.pt}}]"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AT bases: 2, each in" in proc.stdout and f"theirs         imported from {tmp_path}/ddp.pt" in proc.stdout
    assert "trades         trained here: TRADES" in proc.stdout and "a child per (base, method, seed)" in proc.stdout
    assert not (tmp_path / "run").exists()
