"""The run layout (issue 12): RunLayout spells every path of a run directory, and nothing else in the package does."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rift_dist.checkpoint_ids import checkpoint_id, checkpoint_number, newest_checkpoint_position
from rift_dist.layout import FILE_NAMES, RunLayout, alpha_name, mlflow_key_name
from rift_dist.stages import STAGE_TABLE, STAGES

PACKAGE = Path(__file__).resolve().parents[2] / "rift_dist"

ALLOWED = {
    ("checkpoint_ids.py", "ckpt-"): "the checkpoint file name is encoded and decoded there (RunLayout.checkpoint uses it)",
    ("data/sources.py", "done.json"): "the decoded-image cache's own marker, outside any run directory",
    ("stages/__init__.py", "*"): "the stage table imports nothing of the package; its reads / writes are checked "
                                 "against RunLayout below",
    ("compare/run.py", "*"): "the comparison's own folder (compare/summary.md, pareto.csv; not a stage's): a "
                             "layout of its own is left to the next change of rift compare (issue 16)",
    ("cluster/compare_jobs.py", "*"): "idem (compare/submission.json)",
}
"""Modules that may still spell a run-directory file name, with why."""


def test_every_path_of_a_run_directory():
    r = RunLayout("/runs/x")
    assert r.config == Path("/runs/x/config.yaml") and r.lock == Path("/runs/x/.rift.lock")
    assert r.submission == Path("/runs/x/submission.json") and r.mlflow_parent == Path("/runs/x/mlflow_run.json")
    assert r.done_marker("mrc") == Path("/runs/x/mrc/done.json")
    assert r.model("train") == Path("/runs/x/train/model.pt") and r.history("finetune") == Path("/runs/x/finetune/history.json")
    assert r.checkpoint("train", checkpoint_id(2, 5)) == Path("/runs/x/train/checkpoints/ckpt-002000005.pt")
    assert r.mrc_table == Path("/runs/x/mrc.csv") and r.mrc_result == Path("/runs/x/mrc/mrc.json")
    assert r.mrc_module("layer1.0.conv1") == Path("/runs/x/mrc/modules/layer1.0.conv1.json")
    assert r.adversarial_set == Path("/runs/x/mrc/adversarial_set.pt")
    assert r.interpolation_table == Path("/runs/x/interpolation.csv")
    assert r.alpha_result(0.5) == Path("/runs/x/interpolate/alphas/alpha-0.5000.json")
    assert r.alpha_result(0.5, "conv1") == Path("/runs/x/interpolate/candidates/conv1/alpha-0.5000.json")
    assert r.alpha_result(0.0, "conv1") == r.alpha_result(0.0)  # theta(0) is the AT model: shared
    assert r.candidate("conv1").done_marker("finetune") == Path("/runs/x/finetune/candidates/conv1/finetune/done.json")
    assert r.finetuned_model("conv1") == Path("/runs/x/finetune/candidates/conv1/finetune/model.pt")
    assert (r.summary, r.summary_markdown, r.summary_csv) == tuple(Path(f"/runs/x/summary.{s}") for s in ("json", "md", "csv"))
    assert r.mlflow_key_file("alpha=0.5@candidate-1") == Path("/runs/x/mlflow/alpha=0.5@candidate-1.json")
    assert r.mlflow_key_file("evaluate_checkpoint:/a b") == Path("/runs/x/mlflow/evaluate_checkpoint__a_b.json")
    assert r.mlflow_pending == Path("/runs/x/mlflow/pending") and r.job_dir("mrc") == Path("/runs/x/jobs/mrc")
    assert r.rendezvous_port("12-r0") == Path("/runs/x/jobs/rendezvous/12-r0.port")
    assert alpha_name(1.0) == "alpha-1.0000.json" and mlflow_key_name("mrc") == "mrc.json"
    with pytest.raises(ValueError):
        r.checkpoint_report("txt")


def test_checkpoint_numbers_round_trip_through_file_names(tmp_path):
    r = RunLayout(tmp_path)
    assert newest_checkpoint_position(r.checkpoints("train")) is None  # no folder yet
    for number in (checkpoint_id(1, 0), checkpoint_id(1, 7), checkpoint_id(0, 3)):
        r.checkpoint("train", number).parent.mkdir(parents=True, exist_ok=True)
        r.checkpoint("train", number).write_bytes(b"")
        assert checkpoint_number(r.checkpoint("train", number).name) == number
    (r.checkpoints("train") / ".ckpt-009000000.pt.host.1.x.tmp").write_bytes(b"")  # a killed writer's temporary
    assert newest_checkpoint_position(r.checkpoints("train")) == (1, 7)
    assert checkpoint_number("model.pt") is None


def _layout_paths(r: RunLayout) -> set[str]:
    """Every path the layout names for the stage table's artefacts, relative to the run directory (folders with /)."""
    paths = {r.mrc_table, r.mrc_result, r.mrc_plot, r.adversarial_set, r.candidates, r.interpolation_table,
             r.alpha_choice, r.interpolation_plot, r.summary, r.summary_markdown, r.summary_csv}
    paths |= {p for s in STAGES for p in (r.model(s), r.history(s))}
    folders = {r.mrc_modules, r.alphas, r.candidate_dir("x").parent, *(r.checkpoints(s) for s in STAGES),
               *(r.stage_dir(s) for s in STAGES)}
    return {p.relative_to(r.root).as_posix() for p in paths} | {p.relative_to(r.root).as_posix() + "/" for p in folders}


def test_the_stage_tables_artefacts_are_layout_paths():
    names = _layout_paths(RunLayout("/r"))
    for s in STAGE_TABLE:
        assert RunLayout("/r").stage_dir(s.name) == Path("/r") / s.name  # stage folders are the table's names
        for artefact in s.reads + s.writes:
            assert artefact in names, f"stage {s.name}: {artefact} is not a RunLayout path"
    assert "mrc/adversarial_set.pt" in names and "interpolate/alphas/" in names  # the check can fail


def _spelled(source: str) -> list[tuple[int, str]]:
    """(line, name) of every run-directory file name in a string literal of ``source`` (docstrings excepted)."""
    tree = ast.parse(source)
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    patterns = {n: re.compile(rf"(?<![\w.-]){re.escape(n)}(?![\w-])") for n in FILE_NAMES}
    patterns.update({p: re.compile(rf"(?<![\w-]){p}") for p in ("alpha-", "ckpt-")})
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found += [(node.lineno, n) for n, pat in patterns.items() if pat.search(node.value)]
    return found


def test_the_spelling_check_finds_a_file_name():
    assert _spelled('path = run_dir / "mrc.csv"\n') == [(1, "mrc.csv")]
    assert _spelled('def f():\n    """Writes mrc.csv."""\n    return f"{d}/alpha-{a}.json"\n') == [(3, "alpha-")]


def test_no_module_but_the_layout_spells_a_run_directory_file_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "layout.py" or (rel, "*") in ALLOWED:
            continue
        offenders += [f"{rel}:{line}: {name}" for line, name in _spelled(path.read_text()) if (rel, name) not in ALLOWED]
    assert not offenders, "spell these through rift_dist.layout.RunLayout:\n  " + "\n  ".join(offenders)
