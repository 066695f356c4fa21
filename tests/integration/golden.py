"""Golden artefacts of a tiny deterministic run (issue 12: "how to keep behaviour").

Three runs of the same tiny config (``GOLDEN_SECTIONS`` over ``tiny_config``: width-4 ResNet-18, 256 real
CIFAR-10 training images, every stage):

- ``one-rank``: ``rift run`` in one process;
- ``two-ranks``: ``rift run --nproc 2`` (torchrun, DDP over gloo);
- ``array``: ``rift submit --debug`` with the MRC search split into a 3-task array and the interpolation
  sweep into a 2-task array plus their gathers (the SLURM job graph, run in this process by submitit's debug
  executor: the same planner, job runtime and gathers as on a cluster).

From each run this module keeps what a refactor must not change: ``mrc.csv``, ``interpolation.csv``,
``summary.json`` (timing fields and its checksum removed), a digest of every model's tensors (``train`` / ``finetune`` /
``interpolate`` model files: key, dtype, shape and bytes of each tensor, so a change of the file container
does not count, a change of one weight does) and the MLflow run tree (run names under their parents, status,
params and ``rift.*`` tags with paths masked, every non-timing metric's (step, value) history).

Bitwise results depend on the CPU's vector unit (AVX2 / AVX512 / AMX kernels round differently) and on the
torch build, so the files are kept per :func:`fingerprint` under ``tests/fixtures/golden/<fingerprint>/``.
On a machine with a recorded fingerprint the test compares everything exactly; on another kind it compares
the structure (modules, columns, alphas, the MLflow tree's names and metric keys) and says that values were
not compared.

Record (on the commit whose behaviour is the reference; ``--kinds`` to pick runs)::

    OMP_NUM_THREADS=1 python -m tests.integration.golden record [--kinds one-rank two-ranks array]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tests.integration.pipeline_helpers import ROOT, rift, tiny_config

FIXTURES = ROOT / "tests" / "fixtures" / "golden"
KINDS = ("one-rank", "two-ranks", "array")
MODEL_FILES = ("train/model.pt", "finetune/model.pt", "interpolate/model.pt")

# Deterministic across ranks and engines (the DDP parity settings): fp32, NCHW, synchronised BatchNorm, torch
# loader; small enough that the three runs take a few minutes on 2 cores.
GOLDEN_SECTIONS = {
    "data": {"loader": "torch", "train_subset": 256, "val_size": 64, "test_subset": 64, "batch_size": 64},
    "train": {"epochs": 2, "milestones": [1], "attack": {"num_steps": 2}, "eval_attack_steps": 1},
    "mrc": {"num_examples": 64, "batch_size": 64, "num_iterations": 2},
    "finetune": {"epochs": 1, "milestones": [10]},
    "interpolation": {"alphas": [0.0, 0.5, 1.0]},
    "precision": {"threads": 1, "autocast": "none", "channels_last": "off"},
    "distributed": {"sync_bn": True, "timeout_s": 120},
}
ARRAY_PROFILE = ("stages.mrc.array_size=3", "stages.interpolate.array_size=2")

_TIMING = re.compile(r"(seconds|_s$|time|elapsed|duration|throughput|per_s|eta|^resumed_)", re.IGNORECASE)
_TIMING_TAGS = re.compile(r"(seconds|time|elapsed|duration|host|pid|user|source|git|date)", re.IGNORECASE)


def fingerprint() -> str:
    """A name for what makes floating-point results bitwise reproducible here: torch version, torch's CPU vector
    ISA (``torch.backends.cpu.get_cpu_capability()``) and the bf16 unit (``rift_dist.hardware``); e.g.
    ``torch2.14.1-AVX512-avx512_bf16``.  Never the CPU's name: two models with one ISA compute alike."""
    import torch

    from rift_dist.hardware import cpu_bf16_engine

    return f"torch{torch.__version__.split('+')[0]}-{torch.backends.cpu.get_cpu_capability()}-{cpu_bf16_engine()}"


def run_kind(kind: str, tmp: Path) -> Path:
    """Run the tiny config as ``kind`` (one of :data:`KINDS`) under ``tmp``; returns the run directory."""
    if kind not in KINDS:
        raise ValueError(f"unknown golden run kind {kind!r}; choose from {KINDS}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(tmp, **GOLDEN_SECTIONS)
    run_dir = tmp / "run"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if kind == "one-rank":
        rift("run", str(cfg), "--run-dir", str(run_dir), env=env, timeout=1800)
    elif kind == "two-ranks":
        rift("run", str(cfg), "--run-dir", str(run_dir), "--nproc", "2", env=env, timeout=1800)
    else:
        args = ["submit", str(cfg), "--run-dir", str(run_dir), "--debug"]
        for item in ARRAY_PROFILE:
            args += ["--profile-set", item]
        rift(*args, env=env, timeout=1800)
    return run_dir


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if not _TIMING.search(str(k)) and k != "_sha256"}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return "<path>"  # e.g. the corruption set's directory: differs between checkouts
    return value


def _mask_path(value: str) -> str:
    return "<path>" if "/" in value else value


def tensor_digest(path: Path) -> dict[str, str]:
    """sha256 of each tensor of a saved state dict (key, dtype, shape, bytes), keyed by parameter name."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    out = {}
    for key in sorted(state):
        value = state[key]
        if not torch.is_tensor(value):
            out[key] = json.dumps(value, sort_keys=True, default=str)
            continue
        t = value.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[key] = h.hexdigest()
    return out


def mlflow_tree(run_dir: Path) -> list[dict]:
    """The MLflow runs of ``run_dir``'s SQLite store, as comparable records sorted by their name path."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rift")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}

    def name_path(r) -> str:
        parent = r.data.tags.get("mlflow.parentRunId")
        return (name_path(by_id[parent]) + "/" if parent in by_id else "") + (r.info.run_name or "")

    records = []
    for r in runs:
        metrics = {}
        for key in sorted(r.data.metrics):
            if _TIMING.search(key):
                continue
            history = client.get_metric_history(r.info.run_id, key)
            metrics[key] = sorted((m.step, m.value) for m in history)
        records.append({
            "path": name_path(r),
            "status": r.info.status,
            "params": {k: _mask_path(v) for k, v in sorted(r.data.params.items())},
            "tags": {k: _mask_path(v) for k, v in sorted(r.data.tags.items())
                     if k.startswith("rift.") and not _TIMING_TAGS.search(k)},
            "metrics": metrics,
        })
    return sorted(records, key=lambda rec: rec["path"])


def collect(run_dir: Path) -> dict[str, str]:
    """The golden files of a finished run: file name -> text (deterministic JSON / CSV)."""
    out = {"mrc.csv": (run_dir / "mrc.csv").read_text(),
           "interpolation.csv": (run_dir / "interpolation.csv").read_text(),
           "summary.json": json.dumps(_strip_timing(json.loads((run_dir / "summary.json").read_text())),
                                      indent=1, sort_keys=True) + "\n"}
    out["models.json"] = json.dumps({rel: tensor_digest(run_dir / rel) for rel in MODEL_FILES
                                     if (run_dir / rel).is_file()}, indent=1, sort_keys=True) + "\n"
    out["mlflow.json"] = json.dumps(mlflow_tree(run_dir), indent=1, sort_keys=True) + "\n"
    return out


def structure(files: dict[str, str]) -> dict:
    """What must agree on every machine kind: modules ranked, CSV columns, alphas, the MLflow tree's run
    paths, statuses and metric keys (with how many steps each)."""
    mrc = list(csv.DictReader(io.StringIO(files["mrc.csv"])))
    interp = list(csv.DictReader(io.StringIO(files["interpolation.csv"])))
    tree = json.loads(files["mlflow.json"])
    models = json.loads(files["models.json"])
    return {
        "mrc_columns": list(mrc[0]) if mrc else [],
        "mrc_modules": sorted(r.get("module", "") for r in mrc),
        "interpolation_columns": list(interp[0]) if interp else [],
        "alphas": [r.get("alpha") for r in interp],
        "model_keys": {rel: sorted(d) for rel, d in models.items()},
        "mlflow": [(r["path"], r["status"], sorted(r["params"]), {k: len(v) for k, v in r["metrics"].items()})
                   for r in tree],
    }


def fixture_dir(kind: str, fp: str | None = None) -> Path:
    """Where the golden files of ``kind`` for fingerprint ``fp`` (default: this machine's) are kept."""
    return FIXTURES / (fp or fingerprint()) / kind


def recorded_fingerprints() -> list[str]:
    """Fingerprints with recorded golden files."""
    return sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.is_dir() else []


def read_fixture(kind: str, fp: str) -> dict[str, str]:
    """The recorded golden files of ``kind`` for ``fp``; empty when none."""
    d = fixture_dir(kind, fp)
    return {p.name: p.read_text() for p in sorted(d.iterdir())} if d.is_dir() else {}


def record(kinds: list[str], keep: Path | None = None) -> None:
    """Run each kind and write its golden files for this machine's fingerprint (replacing older ones)."""
    fp = fingerprint()
    for kind in kinds:
        tmp = Path(tempfile.mkdtemp(prefix=f"golden-{kind}-"))
        try:
            run_dir = run_kind(kind, tmp)
            files = collect(run_dir)
            out = fixture_dir(kind, fp)
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            for name, text in files.items():
                (out / name).write_text(text)
            (out.parent / "README.md").write_text(
                f"Golden artefacts for `{fp}`, recorded by `python -m tests.integration.golden record`;\n"
                "see tests/integration/golden.py for what each file holds.\n")
            print(f"golden: {kind}: {len(files)} files -> {out.relative_to(ROOT)}", flush=True)
        finally:
            if keep:
                shutil.copytree(tmp, keep / kind, dirs_exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.integration.golden record [--kinds ...]``."""
    parser = argparse.ArgumentParser(prog="python -m tests.integration.golden", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the golden runs and write their files for this machine kind")
    rec.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    rec.add_argument("--keep", type=Path, help="copy the run directories here")
    sub.add_parser("fingerprint", help="print this machine's fingerprint")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.command == "fingerprint":
        print(fingerprint())
        return 0
    record(args.kinds, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
