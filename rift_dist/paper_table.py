"""``rift report EXPERIMENT``: the paper's Table 1 from the runs recorded in MLflow.

One row per (data set, architecture, method; a non-paper width is its own row, e.g. "resnet18 (width 16)"; method
``rift`` for a RiFT pipeline, or a ``rift compare`` method from its (method, seed) child runs, tagged
``rift.compare``; a comparison's base other than PGD-AT, tag ``rift.base``, is its own row, e.g. "rift [trades]");
for the AT and the method's model the clean,
out-of-distribution (corruption) and PGD robust accuracy, the RiFT - AT deltas,
each as mean +- standard deviation over seeds (sample std, ddof 1; '-' with one
seed), and the seeds used.  Every pipeline's parent run carries the config as
params (``data.dataset``, ``model.arch``, ``seed``) and the final metrics
(``at.clean_accuracy``, ``rift.robust_accuracy``, ...); a parent without them
falls back to its ``evaluation`` child run.  When several finished runs share a
(data set, architecture, seed), the newest is used and the others are listed.
Printed, and saved as CSV and Markdown (with the paper's numbers beside ours
where the row exists in the paper).
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys
from pathlib import Path

from rift_dist.atomic import atomic_write_text
from rift_dist.data.datasets import DATASETS
from rift_dist.errors import RiftError

DATASET_ORDER = tuple(DATASETS)
ARCH_ORDER = ("resnet18", "resnet34", "wrn34_10")
MODELS = ("at", "rift")
METRICS = (("clean", "clean_accuracy"), ("ood", "corruption_accuracy"), ("robust", "robust_accuracy"))
DATASET_NAMES = {name: spec.title for name, spec in DATASETS.items()}
ARCH_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "wrn34_10": "WRN-34-10"}

PAPER_TABLE1 = {  # RiFT (Zhu et al., ICCV 2023) Table 1: clean / OOD / PGD-10 robust accuracy (%), mean of 3 seeds
    ("cifar10", "resnet18"): {"at": (81.46, 73.56, 53.63), "rift": (83.44, 75.69, 53.65)},
    ("cifar100", "resnet18"): {"at": (57.10, 46.43, 30.15), "rift": (58.74, 48.06, 30.17)},
    ("tiny-imagenet", "resnet18"): {"at": (49.10, 27.68, 23.28), "rift": (50.61, 28.73, 23.34)},
    ("cifar10", "resnet34"): {"at": (84.23, 75.37, 55.31), "rift": (85.41, 77.15, 55.34)},
    ("cifar100", "resnet34"): {"at": (58.67, 48.24, 30.50), "rift": (60.88, 49.97, 30.58)},
    ("tiny-imagenet", "resnet34"): {"at": (50.96, 27.91, 24.27), "rift": (52.54, 30.07, 24.37)},
    ("cifar10", "wrn34_10"): {"at": (87.41, 78.75, 55.40), "rift": (87.89, 79.31, 55.41)},
    ("cifar100", "wrn34_10"): {"at": (62.35, 50.61, 31.66), "rift": (64.56, 52.69, 31.64)},
    ("tiny-imagenet", "wrn34_10"): {"at": (52.78, 31.81, 26.07), "rift": (55.31, 33.86, 26.17)},
}


class ReportError(RiftError, RuntimeError):
    """The report cannot be made: no such experiment, no finished runs, or no store."""


def _resolve_uri(uri: str | None) -> str:
    """``--tracking-uri``, else env MLFLOW_TRACKING_URI, else ``sqlite:///runs/mlflow.db`` when it exists."""
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        uri = uri or os.environ["MLFLOW_TRACKING_URI"]
        if uri.startswith("sqlite:///"):  # MLflow would create an empty database (and its folders) for a wrong path
            db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
            if not db.is_file():
                raise ReportError(f"no MLflow database at {db} (from {uri}); a run's store is <run dir>/../mlflow.db, "
                                  f"e.g. --tracking-uri sqlite:///runs/mlflow.db")
        return uri
    default = Path("runs") / "mlflow.db"
    if default.is_file():
        return f"sqlite:///{default.resolve()}"
    raise ReportError("no MLflow store given: pass --tracking-uri (e.g. sqlite:///runs/mlflow.db or "
                      "http://host:5000) or set MLFLOW_TRACKING_URI")


def collect_runs(experiment: str, tracking_uri: str | None = None) -> tuple[list[dict], list[str]]:
    """One record per finished pipeline of ``experiment``: {dataset, arch, seed, run_id, name, start, metrics}.

    Returns (records, notes); notes say which runs were skipped and why.

    Raises:
        ReportError: no store, or no such experiment (lists the existing ones).
    """
    from rift_dist import tracking  # noqa: F401  (telemetry off)
    from mlflow.tracking import MlflowClient

    uri = _resolve_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        tracking.limit_http_retries(30)
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        names = [e.name for e in client.search_experiments()] if exp is None else []
    except MlflowException as exc:  # a server that does not answer: one line, not MLflow's traceback
        raise ReportError(f"cannot read the MLflow store {uri}: {str(exc).splitlines()[0][:300]}; is the server up "
                          f"and the address right? (--tracking-uri / MLFLOW_TRACKING_URI)") from None
    if exp is None:
        raise ReportError(f"no experiment {experiment!r} in {uri}; experiments there: {', '.join(names) or 'none'}")
    runs = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    children: dict[str, list] = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            children.setdefault(parent, []).append(r)
    records, notes = [], []
    for r in runs:
        method = "rift"
        if r.data.tags.get("rift.kind") == "compare":
            continue  # a comparison's parent: its (method, seed) children carry the numbers
        if r.data.tags.get("rift.compare") == "1":
            method = r.data.tags.get("rift.method", "")
            if method in ("", "at") or "method.clean_accuracy" not in r.data.metrics:
                continue  # the AT + MRC child of a seed, or a method not evaluated yet
            base = r.data.tags.get("rift.base", "")
            if base and base != "pgd":  # another AT base (compare.bases, RiFT Table 2): its own row
                method = f"{method} [{base}]"
            params = r.data.params
            metrics = {("rift." + k[7:] if k.startswith("method.") else k): v for k, v in r.data.metrics.items()}
        elif r.data.tags.get("mlflow.parentRunId"):
            continue
        else:
            params = r.data.params
            metrics = dict(r.data.metrics)
        if "at.clean_accuracy" not in metrics:
            ev = [c for c in children.get(r.info.run_id, []) if c.info.run_name == "evaluation"
                  and "at.clean_accuracy" in c.data.metrics]
            if ev:
                metrics.update(max(ev, key=lambda c: c.info.start_time or 0).data.metrics)
        if "at.clean_accuracy" not in metrics:
            notes.append(f"run {r.info.run_id} ({r.info.run_name}, {r.info.status}): no final metrics yet — skipped")
            continue
        if "data.dataset" not in params or "model.arch" not in params:
            notes.append(f"run {r.info.run_id}: no data.dataset / model.arch params — skipped")
            continue
        arch = params["model.arch"]
        variant = ""
        if arch.startswith("resnet") and params.get("model.width", "64") != "64":
            variant = f"width {params['model.width']}"
        elif arch.startswith("wrn") and params.get("model.widen_factor", "10") != "10":
            variant = f"widen factor {params['model.widen_factor']}"
        records.append({"dataset": params["data.dataset"], "arch": arch + (f" ({variant})" if variant else ""),
                        "method": method,
                        "seed": int(params.get("seed", 0)), "run_id": r.info.run_id, "name": r.info.run_name,
                        "start": r.info.start_time or 0, "status": r.info.status, "metrics": metrics})
    return records, notes


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def table_rows(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Aggregate records into Table-1 rows (percentages), newest run per (dataset, arch, seed).

    Returns (rows, notes).  Each row: dataset, arch, seeds, runs, and for every
    ``<model>.<metric>`` and ``delta.<metric>``: (mean, std) in percent (std None with one seed;
    mean None when no run has the metric, e.g. no corruption set was evaluated).
    """
    notes = []
    latest: dict[tuple, dict] = {}
    for rec in sorted(records, key=lambda r: r["start"]):
        key = (rec["dataset"], rec["arch"], rec.get("method", "rift"), rec["seed"])
        if key in latest:
            notes.append(f"{DATASET_NAMES.get(key[0], key[0])} {arch_name(key[1])} {key[2]} seed {key[3]}: "
                         f"run {latest[key]['run_id']} replaced by the newer {rec['run_id']}")
        latest[key] = rec
    groups: dict[tuple, list[dict]] = {}
    for (ds, arch, method, _), rec in latest.items():
        groups.setdefault((ds, arch, method), []).append(rec)

    def order(key):
        ds, arch, method = key
        base = arch.split(" ")[0]
        return (DATASET_ORDER.index(ds) if ds in DATASET_ORDER else 99, ds,
                ARCH_ORDER.index(base) if base in ARCH_ORDER else 99, arch, method != "rift", method)

    rows = []
    for key in sorted(groups, key=order):
        recs = sorted(groups[key], key=lambda r: r["seed"])
        row = {"dataset": key[0], "arch": key[1], "method": key[2], "seeds": [r["seed"] for r in recs],
               "runs": [r["run_id"] for r in recs]}
        for short, metric in METRICS:
            for model in MODELS:
                vals = [100 * r["metrics"][f"{model}.{metric}"] for r in recs if f"{model}.{metric}" in r["metrics"]]
                row[f"{model}.{short}"] = _mean_std(vals) if vals else (None, None)
            deltas = [100 * (r["metrics"][f"rift.{metric}"] - r["metrics"][f"at.{metric}"]) for r in recs
                      if f"rift.{metric}" in r["metrics"] and f"at.{metric}" in r["metrics"]]
            row[f"delta.{short}"] = _mean_std(deltas) if deltas else (None, None)
        rows.append(row)
    return rows, notes


def arch_name(arch: str) -> str:
    """``resnet18 (width 4)`` -> ``ResNet-18 (width 4)``."""
    base, _, rest = arch.partition(" ")
    return ARCH_NAMES.get(base, base) + (f" {rest}" if rest else "")


def _fmt(ms: tuple, signed: bool = False) -> str:
    mean, std = ms
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


COLUMNS = [("AT clean", "at.clean"), ("AT OOD", "at.ood"), ("AT robust", "at.robust"),
           ("method clean", "rift.clean"), ("method OOD", "rift.ood"), ("method robust", "rift.robust"),
           ("Δ clean", "delta.clean"), ("Δ OOD", "delta.ood"), ("Δ robust", "delta.robust")]


def to_markdown(rows: list[dict], experiment: str, notes: list[str], paper: bool = True) -> str:
    """The table as Markdown (accuracies in %, mean ± std over seeds), the paper's numbers below it."""
    head = ["dataset", "architecture", "method"] + [c for c, _ in COLUMNS] + ["seeds"]
    lines = [f"# RiFT vs AT — experiment `{experiment}` (Table 1 layout)", "",
             "Accuracies in %, mean ± std over seeds (test split): clean, OOD (corruption accuracy) and PGD robust "
             "accuracy; Δ = method − AT in percentage points. Method rift is the RiFT pipeline (or the rift row of "
             "`rift compare`); the others are `rift compare`'s alternatives on the same AT models.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [DATASET_NAMES.get(r["dataset"], r["dataset"]), arch_name(r["arch"]), r.get("method", "rift")]
        cells += [_fmt(r[k], signed=k.startswith("delta")) for _, k in COLUMNS]
        cells.append(",".join(map(str, r["seeds"])))
        lines.append("| " + " | ".join(cells) + " |")
    if paper:
        known = [r for r in rows if (r["dataset"], r["arch"]) in PAPER_TABLE1 and r.get("method", "rift") == "rift"]
        if known:
            lines += ["", "The paper's Table 1 for the same rows (mean of 3 seeds; clean / OOD / robust, %):", "",
                      "| dataset | architecture | AT | RiFT |", "|---|---|---|---|"]
            for r in known:
                p = PAPER_TABLE1[(r["dataset"], r["arch"])]
                lines.append(f"| {DATASET_NAMES[r['dataset']]} | {ARCH_NAMES[r['arch']]} | "
                             f"{' / '.join(f'{x:.2f}' for x in p['at'])} | {' / '.join(f'{x:.2f}' for x in p['rift'])} |")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    """One line per row: dataset, arch, n_seeds, seeds, and <column>_mean / <column>_std in percent."""
    fields = ["dataset", "arch", "method", "n_seeds", "seeds"]
    for _, k in COLUMNS:
        fields += [f"{k}_mean", f"{k}_std"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        line = {"dataset": r["dataset"], "arch": r["arch"], "method": r.get("method", "rift"),
                "n_seeds": len(r["seeds"]),
                "seeds": " ".join(map(str, r["seeds"]))}
        for _, k in COLUMNS:
            mean, std = r[k]
            line[f"{k}_mean"] = "" if mean is None else f"{mean:.4f}"
            line[f"{k}_std"] = "" if std is None else f"{std:.4f}"
        w.writerow(line)
    atomic_write_text(path, buf.getvalue())  # the table in memory, then one atomic write


def report(experiment: str, tracking_uri: str | None = None, out_dir: str | Path = "reports",
           paper: bool = True, echo=print) -> tuple[list[dict], Path, Path]:
    """Build, print and save the table; returns (rows, csv path, markdown path).

    Raises:
        ReportError: no store / experiment, a store that cannot be read, ``out_dir`` a file, or no finished
            pipeline with final metrics (nothing is written then).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder for the table (default: reports)")
    records, notes = collect_runs(experiment, tracking_uri)
    if not records:
        raise ReportError(f"experiment {experiment!r} has no pipeline with final metrics (at.clean_accuracy ...) "
                          f"yet; the evaluate stage logs them" + (f". {'; '.join(notes[:5])}" if notes else ""))
    rows, more = table_rows(records)
    notes = notes + more
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment)
    csv_path, md_path = out / f"{safe}-table1.csv", out / f"{safe}-table1.md"
    write_csv(csv_path, rows)
    md = to_markdown(rows, experiment, notes, paper)
    atomic_write_text(md_path, md)
    echo(md)
    echo(f"saved {csv_path} and {md_path}")
    return rows, csv_path, md_path


def add_arguments(p) -> None:
    """Arguments of ``rift report``."""
    p.add_argument("experiment", nargs="?", default="rift",
                   help="MLflow experiment name (tracking.experiment; default 'rift')")
    p.add_argument("--tracking-uri", help="MLflow store (default: env MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    p.add_argument("--out", default="reports", help="folder for <experiment>-table1.csv and .md (default: reports)")
    p.add_argument("--no-paper", action="store_true", help="leave the paper's numbers out of the Markdown")
    p.add_argument("--no-progress", action="store_true", help="(ignored)")


def main(args) -> int:
    """``rift report``; returns the exit status (2 when there is nothing to report)."""
    try:
        report(args.experiment, args.tracking_uri, args.out, paper=not args.no_paper)
    except ReportError as exc:
        print(f"rift: {exc}", file=sys.stderr)
        return 2
    return 0
