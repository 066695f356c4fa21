"""The stage table (issue 12): the stage graph is declared once, in rift_dist/stages/__init__.py.

Checks that the table is coherent (needs point backwards, every named function resolves, names are
unique) and that nothing else in the package lists stages: no literal tuple / list / set / dict of two
or more stage names, and no if-chain comparing a value with two or more stage names, outside the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rift_dist import stages
from rift_dist.stages import STAGE_TABLE, STAGES, Part, StageError, resolve

PACKAGE = Path(__file__).resolve().parents[2] / "rift_dist"
TABLE = PACKAGE / "stages" / "__init__.py"
NOT_STAGES = {
    # config sections that share a stage's name (train.attack, mrc.attack, eval.attack): not the stage graph
    "rift_dist/config.py": ["a literal list of stages ['mrc', 'train']"],
    # image counts per data split (train, val, test) and of the MRC's fixed set: not the stage graph
    "rift_dist/plan.py": ["a literal list of stages ['mrc', 'train']"],
}
"""Files whose stage-like names are something else, with what they are (each must still match exactly)."""


def stage_lists(source: str, names: tuple[str, ...] = STAGES) -> list[str]:
    """Where ``source`` lists stages by hand: 'line N: ...' for each literal collection holding two or more
    stage names, and for each module-wide set of two or more stage names that values are compared with."""
    found = []
    compared: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        items = []
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        hits = {e.value for e in items if isinstance(e, ast.Constant) and e.value in names}
        if len(hits) >= 2:
            found.append(f"line {node.lineno}: a literal list of stages {sorted(hits)}")
        if isinstance(node, ast.Compare):
            for c in [node.left, *node.comparators]:
                if isinstance(c, ast.Constant) and c.value in names:
                    compared.setdefault(c.value, node.lineno)
    if len(compared) >= 2:
        found.append("an if-chain over stages: compares with " + ", ".join(
            f"{n!r} (line {line})" for n, line in sorted(compared.items(), key=lambda x: x[1])))
    return found


def test_the_check_finds_stage_lists():
    assert stage_lists('STAGES = ("train", "mrc")\n')
    assert stage_lists('KEYS = {"mrc": 1, "evaluate": 2}\n')
    assert stage_lists('def f(s):\n    if s == "train":\n        return 1\n    elif s == "mrc":\n        return 2\n')
    assert stage_lists('def f(s):\n    return s in ("finetune", "interpolate")\n')
    assert not stage_lists('def f(split):\n    return split == "train"\n')  # one name: a data split
    assert not stage_lists('x = profile.option("finetune", "candidates")\n')


def test_nothing_but_the_table_lists_stages():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == TABLE:
            continue
        found = stage_lists(path.read_text())
        rel = str(path.relative_to(PACKAGE.parent))
        if [f.split(": ", 1)[1] for f in found] == NOT_STAGES.get(rel):
            continue
        if found:
            offenders[rel] = found
    assert not offenders, f"stages listed outside rift_dist/stages/__init__.py: {offenders}"


def test_the_table_is_coherent():
    assert STAGES == tuple(s.name for s in STAGE_TABLE) == ("train", "mrc", "finetune", "interpolate", "evaluate")
    assert len({s.run_name for s in STAGE_TABLE}) == len(STAGE_TABLE)
    for i, s in enumerate(STAGE_TABLE):
        assert set(s.needs) <= set(STAGES[:i]), f"{s.name} needs a later stage: {s.needs}"
        assert s.keys, f"{s.name} declares no config keys"
        assert callable(resolve(s.run))
        for ref in (s.optional_needs, s.results):
            assert not ref or callable(resolve(ref))
        if s.shards:
            for ref in (s.shards.sharded, s.shards.tasks, s.shards.prepare_done, s.shards.check):
                assert not ref or callable(resolve(ref))
            for p in s.shards.parts():
                for ref in (p.run, p.done, p.progress):
                    assert not ref or callable(resolve(ref))
    names = [p.part for p in stages.parts().values() for p in [p[1]]]
    assert len(names) == len(set(names)) and "stage" not in names
    assert all(isinstance(p, Part) for _, p in stages.parts().values())


def test_existing_runs_keep_their_names():
    # folders, MLflow runs and submission.json entries of runs made before the table must still resume
    assert {s.name: s.run_name for s in STAGE_TABLE} == {
        "train": "adversarial_training", "mrc": "mrc", "finetune": "finetune", "interpolate": "interpolation",
        "evaluate": "evaluation"}
    assert sorted(stages.parts()) == ["finetune_candidate", "interpolate_alphas", "interpolate_gather",
                                      "mrc_gather", "mrc_modules", "mrc_prepare"]


def test_an_unknown_stage_is_refused_with_the_list():
    with pytest.raises(StageError, match="stages are train, mrc, finetune, interpolate, evaluate"):
        stages.stage("mcr")


def test_runs_are_opened_in_one_place():
    """Entry points open a run through pipeline.open_run (issue 12): the process group is made only there
    (and in rift compare, which opens one per seed and method; not yet moved)."""
    makers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Runtime":
                makers.append(str(path.relative_to(PACKAGE.parent)))
    assert sorted(makers) == ["rift_dist/compare/run.py", "rift_dist/pipeline.py"]
