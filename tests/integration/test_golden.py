"""Golden artefacts (issue 12): a tiny deterministic run of every stage -- one process, two ranks, and the SLURM
job graph with MRC and sweep arrays -- gives the recorded mrc.csv, interpolation.csv, summary.json, model
tensors and MLflow run tree (tests/integration/golden.py says what each holds and how to record them).

Bitwise equality is asserted on a machine kind with recorded files (tests/fixtures/golden/<fingerprint>/);
on another kind the structure is compared with the recorded kind's (modules, columns, alphas, model keys, the
MLflow tree's runs, statuses, params and metric keys with their step counts), and the test says values were
not compared.  A refactor that changes a number must re-record in a commit of its own that says why.
"""

from __future__ import annotations

import difflib
import warnings

import pytest

from tests.integration import golden
from tests.integration.pipeline_helpers import shared_data

pytestmark = pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")


def _first_difference(name: str, expected: str, actual: str) -> str:
    diff = difflib.unified_diff(expected.splitlines(), actual.splitlines(), f"golden/{name}", f"now/{name}",
                                lineterm="", n=2)
    return "\n".join(list(diff)[:40])


@pytest.mark.parametrize("kind", ["one-rank", pytest.param("two-ranks", marks=pytest.mark.slow),
                                  pytest.param("array", marks=pytest.mark.slow)])
def test_tiny_run_equals_its_golden_artefacts(kind, tmp_path):
    recorded = golden.recorded_fingerprints()
    assert recorded, "no golden artefacts under tests/fixtures/golden/ (python -m tests.integration.golden record)"
    files = golden.collect(golden.run_kind(kind, tmp_path))
    fp = golden.fingerprint()
    if fp in recorded:
        expected = golden.read_fixture(kind, fp)
        assert sorted(expected) == sorted(files), (sorted(expected), sorted(files))
        for name in sorted(expected):
            assert files[name] == expected[name], (
                f"{kind}: {name} differs from tests/fixtures/golden/{fp}/{kind}/{name}; if the change of numbers "
                f"is intended, re-record in a commit of its own that says why.\n"
                + _first_difference(name, expected[name], files[name]))
        return
    other = recorded[0]
    expected = golden.read_fixture(kind, other)
    assert golden.structure(files) == golden.structure(expected), f"structure differs from {other}'s {kind} run"
    warnings.warn(f"golden {kind}: no recorded artefacts for this machine kind ({fp}); compared the structure "
                  f"with {other}'s, not the values (record: python -m tests.integration.golden record)", stacklevel=1)
