"""`rift compare --submit` on the real one-node SLURM cluster (issue 16): two seed jobs, then the summary job
queued with afterok on both; all three complete and compare/ holds the tables."""

from __future__ import annotations

import json

import pytest

from tests.integration.pipeline_helpers import ROOT, rift, shared_data, tiny_config
from tests.integration.test_compare_submit import METHODS

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not (shared_data() / "cifar10-jpeg.tar.gz").is_file(),
                                 reason="../shared/data/cifar10-jpeg.tar.gz not found (set RIFT_SHARED_DATA)")]


@pytest.mark.slow  # ~2 min: two seed jobs side by side on the one-node cluster, then the summary
def test_comparison_as_real_slurm_jobs_with_the_summary_after_the_seeds(slurm_cluster, tmp_path):
    import time

    cfg = tiny_config(tmp_path, compare={"seeds": [0, 1], "methods": METHODS},
                      interpolation={"alphas": [0.0, 0.5, 1.0]}, precision={"threads": 1})
    run = tmp_path / "run"
    proc = rift("compare", str(cfg), "--run-dir", str(run), "--submit", "--profile",
                str(ROOT / "launch" / "local_test.yaml"))
    record = json.loads((run / "compare" / "submission.json").read_text())
    ids = [j["job_id"] for j in record["jobs"]]
    assert len(ids) == 3, proc.stdout
    summary = slurm_cluster.run(["scontrol", "show", "job", ids[-1]]).stdout
    assert f"afterok:{ids[0]}" in summary and f"afterok:{ids[1]}" in summary, summary  # waits for both seeds
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and slurm_cluster.run(["squeue", "-h", "-j", ",".join(ids)]).stdout.strip():
        time.sleep(2)
    states = slurm_cluster.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,State"]).stdout
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(run.glob("jobs/*/*.err")))
    assert states.count("COMPLETED") == 3, states + logs
    for name in ("pareto.csv", "summary.md", "summary.json", "pareto.png"):
        assert (run / "compare" / name).is_file(), name
    assert "rift" in (run / "compare" / "summary.md").read_text()
