"""The data-set table (issue 12): one spec per data set, and no other place in the package that holds its facts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rift_dist.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    LAYOUTS,
    DataError,
    DatasetSpec,
    dataset_spec,
    spec_for_image_size,
)

PACKAGE = Path(__file__).resolve().parents[2] / "rift_dist"
TABLE = PACKAGE / "data" / "datasets.py"


def test_the_table():
    assert list(DATASETS) == ["cifar10", "cifar100", "tiny-imagenet"]
    sizes = {name: (s.num_classes, s.image_size, s.train_size, s.test_size) for name, s in DATASETS.items()}
    assert sizes == {"cifar10": (10, 32, 50_000, 10_000), "cifar100": (100, 32, 50_000, 10_000),
                     "tiny-imagenet": (200, 64, 100_000, 10_000)}
    assert DATASETS["cifar10"].classes == tuple(CIFAR10_CLASSES) and len(CIFAR100_CLASSES) == 100
    assert DATASETS["tiny-imagenet"].classes is None  # the sorted wnids of the data
    assert DATASETS["cifar100"].mean == DATASETS["cifar10"].mean  # RIFT.md: one pair for both CIFARs
    assert DATASETS["tiny-imagenet"].std == (0.229, 0.224, 0.225)  # ImageNet's
    assert [s.corruption_set for s in DATASETS.values()] == ["CIFAR-10-C", "CIFAR-100-C", "Tiny-ImageNet-C"]
    assert LAYOUTS == ("auto", "pickle", "folder", "tiny-imagenet")
    assert spec_for_image_size(64, 64).name == "tiny-imagenet" and spec_for_image_size(48, 48) is None
    with pytest.raises(DataError, match="unknown data set 'mnist'; choose one of cifar10, cifar100, tiny-imagenet"):
        dataset_spec("mnist")
    with pytest.raises(Exception):  # frozen
        DATASETS["cifar10"].num_classes = 11  # type: ignore[misc]
    with pytest.raises(ValueError, match="3 class names for 10 classes"):
        DatasetSpec(**{**DATASETS["cifar10"].__dict__, "classes": ("a", "b", "c")})


# ------------------------------------------------------------------ the table is the only place


def _facts() -> tuple[set, set, set]:
    """(numbers, exact strings, data-set names) that only the table may spell."""
    numbers: set = set()
    strings: set = set()
    for spec in DATASETS.values():
        numbers.update(spec.mean + spec.std + (spec.train_size,))
        strings.update((spec.corruption_set, *spec.corruption_dirs))
        if spec.pickle is not None:
            strings.add(spec.pickle.directory)
    numbers.update((0.5071, 0.4865, 0.4409, 0.2673, 0.2564, 0.2762))  # CIFAR-100's own statistics (docstring)
    return numbers, strings, set(DATASETS)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):  # module / class / function docstrings and attribute docstrings
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    ids.add(id(stmt.value))
    return ids


def facts_outside_the_table(source: str, where: str = "<source>") -> list[str]:
    """Places in ``source`` that spell a data-set fact: a mean/std value or a full training-split size, a
    corruption-set or pickle folder name as a string, a list of class names (a collection or a string holding
    three or more), a literal collection (tuple, list, set, dict keys) naming two or more data sets -- a
    second table --, or a comparison of a ``dataset`` variable with a data-set name (a branch on one data
    set whose reason belongs in the table)."""
    numbers, strings, names = _facts()
    classes = set(CIFAR10_CLASSES) | set(CIFAR100_CLASSES)
    tree = ast.parse(source, where)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and id(node) not in docs:
            value = node.value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value in numbers:
                found.append(f"{line}: the number {value!r}")
            elif isinstance(value, str) and value in strings:
                found.append(f"{line}: the string {value!r}")
            elif isinstance(value, str) and len(classes.intersection(value.split())) >= 3:
                found.append(f"{line}: class names in a string")
        if isinstance(node, ast.Compare):  # dataset == "tiny-imagenet": a branch on one data set
            sides = [node.left, *node.comparators]
            named = [e.value for e in sides if isinstance(e, ast.Constant) and e.value in names]
            about = [e for e in sides if "dataset" in (getattr(e, "id", "") or getattr(e, "attr", ""))]
            if named and about:
                found.append(f"{line}: a branch on the data set {named[0]!r}")
        elements = None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elements = node.elts
        elif isinstance(node, ast.Dict):
            elements = [k for k in node.keys if k is not None]
        if elements is not None:
            named = [e.value for e in elements if isinstance(e, ast.Constant) and e.value in names]
            if len(set(named)) >= 2:
                found.append(f"{line}: a collection of data sets {sorted(set(named))}")
            if len({e.value for e in elements if isinstance(e, ast.Constant) and e.value in classes}) >= 3:
                found.append(f"{line}: a collection of class names")
    return found


def test_the_checker_finds_a_second_table():
    source = '''
"""Docstrings may mention CIFAR-10-C and 0.4914."""
SIZES = {"cifar10": 32, "tiny-imagenet": 64}
MEAN = (0.4914, 0.4822, 0.4465)
where = "Tiny-ImageNet-C"
ok = ("cifar10", "resnet18", "table", "bird")
CLASSES = ["cat", "dog", "frog"]
FINE = "apple bear table".split()
sev = [1] if cfg.data.dataset == "tiny-imagenet" else [1, 2, 3, 4, 5]
'''
    found = facts_outside_the_table(source)
    assert sorted(f.split(":", 1)[1] for f in found) == [
        "3: a collection of data sets ['cifar10', 'tiny-imagenet']",
        "4: the number 0.4465", "4: the number 0.4822", "4: the number 0.4914",
        "5: the string 'Tiny-ImageNet-C'", "7: a collection of class names", "8: class names in a string",
        "9: a branch on the data set 'tiny-imagenet'",
    ]


def test_the_table_is_the_only_place_with_data_set_facts():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != TABLE:
            found += facts_outside_the_table(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert found == [], "data-set facts outside rift_dist/data/datasets.py:\n" + "\n".join(found)
    assert facts_outside_the_table(TABLE.read_text())  # the checker does see the table itself
