"""The run directory's layout: the one place that spells a path or an id inside a run directory (issue 12).

A run directory (``rift run --run-dir``, ``rift submit``) holds::

    config.yaml  .rift.lock  mlflow_run.json  submission.json      the run: its config, lock, MLflow parent, jobs
    mrc.csv  interpolation.csv  summary.json/.md/.csv              the headline tables
    <stage>/done.json                                              each stage's done marker (stage table names)
    train/  model.pt  best.pt  history.json  import_report.json  checkpoints/ckpt-<id>.pt
    mrc/    mrc.json  mrc.png  adversarial_set.pt  modules/<module>.json
    finetune/  model.pt  best.pt  history.json  checkpoints/  candidates.json  candidates/<module>/ (a sub-run)
    interpolate/  model.pt  alpha.json  interpolation.png  candidates.json  alphas/alpha-<a>.json
                  candidates/<module>/alpha-<a>.json
    evaluate/  at_vs_rift.png  progress/
    checkpoint_eval/  (rift evaluate --checkpoint)
    mlflow/  <key>.json (child runs)  pending/*.json (unsent writes)  params_full-<run id>/params_full.json
    jobs/  <job>/ (submitit)  events.jsonl  rendezvous/<key>.port

Stage folders are the stage table's names (:data:`rift_dist.stages.STAGES`); checkpoint numbers come from
:mod:`rift_dist.checkpoint_ids`.  The stage table's ``reads`` / ``writes`` are these paths relative to the
run directory (``tests/unit/test_layout.py`` checks both, and that no other module of the package spells
these file names).  Imports only :mod:`rift_dist.checkpoint_ids`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rift_dist.checkpoint_ids import checkpoint_name

CONFIG = "config.yaml"
LOCK = ".rift.lock"
MLFLOW_PARENT = "mlflow_run.json"
SUBMISSION = "submission.json"
DONE = "done.json"
MODEL = "model.pt"
HISTORY = "history.json"
PENDING = "pending"
ALPHA_PREFIX = "alpha-"
PARAMS_FULL = "params_full.json"

FILE_NAMES = (CONFIG, LOCK, MLFLOW_PARENT, SUBMISSION, DONE, MODEL, HISTORY, "best.pt", "import_report.json",
              "mrc.csv", "mrc.json", "mrc.png", "adversarial_set.pt", "candidates.json", "interpolation.csv",
              "alpha.json", "interpolation.png", "summary.json", "summary.md", "summary.csv", "at_vs_rift.png",
              "events.jsonl", PARAMS_FULL, "report.json", "report.md", "report.csv")
"""Every file name of a run directory (the architecture test refuses them as literals elsewhere)."""


def alpha_name(alpha: float) -> str:
    """The result file name of theta(alpha): ``alpha-<alpha:.4f>.json`` (alpha 0.5 -> ``alpha-0.5000.json``)."""
    return f"{ALPHA_PREFIX}{alpha:.4f}.json"


def mlflow_key_name(key: str) -> str:
    """The file name remembering child run ``key``: the key with characters other than ``[A-Za-z0-9_.=@-]``
    replaced by ``_``, plus ``.json`` (``alpha=0.5@candidate-1`` stays as it is)."""
    return re.sub(r"[^A-Za-z0-9_.=@-]", "_", key) + ".json"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory (see the module docstring); ``RunLayout(run_dir)``.

    Paths only: nothing is created or read (callers make parent folders when they write).

    Attributes:
        root: the run directory.
    """

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # ---------------------------------------------------------------- the run
    @property
    def config(self) -> Path:
        """``config.yaml``: the run's config as run (``rift run`` / ``rift submit`` write it)."""
        return self.root / CONFIG

    @property
    def lock(self) -> Path:
        """``.rift.lock``: the run directory's lock file (:class:`rift_dist.run_lock.RunDirLock`)."""
        return self.root / LOCK

    @property
    def submission(self) -> Path:
        """``submission.json``: the jobs ``rift submit`` queued (:mod:`rift_dist.cluster.monitor`)."""
        return self.root / SUBMISSION

    # ---------------------------------------------------------------- MLflow
    @property
    def mlflow_parent(self) -> Path:
        """``mlflow_run.json``: the MLflow parent run of this directory ({run_id, tracking_uri})."""
        return self.root / MLFLOW_PARENT

    @property
    def mlflow_dir(self) -> Path:
        """``mlflow/``: the child runs' key files and the pending writes."""
        return self.root / "mlflow"

    def mlflow_key_file(self, key: str) -> Path:
        """``mlflow/<key>.json``: the child run of ``key`` (see :func:`mlflow_key_name`)."""
        return self.mlflow_dir / mlflow_key_name(key)

    @property
    def mlflow_pending(self) -> Path:
        """``mlflow/pending/``: MLflow writes a process could not send (``*.json``, sent by the next tracker)."""
        return self.mlflow_dir / PENDING

    PENDING_GLOB = f"mlflow/{PENDING}/*.json"
    """Glob (relative to any run directory, sub-runs included with ``rglob``) of the pending-writes files."""

    def pending_files(self) -> list[Path]:
        """Every pending-writes file of this run directory and of its sub-runs (fine-tuning candidates)."""
        return sorted(self.root.rglob(self.PENDING_GLOB))

    def pending_owners(self) -> list[Path]:
        """The run directories (this one, sub-runs) whose ``mlflow/pending/`` holds writes, sorted."""
        return sorted({p.parent.parent.parent for p in self.pending_files()})

    def params_full(self, run_id: str) -> Path:
        """``mlflow/params_full-<run id>/params_full.json``: the params MLflow had to cut or rename, in full."""
        return self.mlflow_dir / f"params_full-{run_id}" / PARAMS_FULL

    # ---------------------------------------------------------------- SLURM jobs
    @property
    def jobs_dir(self) -> Path:
        """``jobs/``: submitit's folders, the event log and the rendezvous files."""
        return self.root / "jobs"

    def job_dir(self, job: str) -> Path:
        """``jobs/<job>/``: submitit's pickles and logs of job ``job``."""
        return self.jobs_dir / job

    @property
    def events(self) -> Path:
        """``jobs/events.jsonl``: one line per job start, requeue and end."""
        return self.jobs_dir / "events.jsonl"

    def rendezvous_port(self, key: str) -> Path:
        """``jobs/rendezvous/<key>.port``: the MASTER_PORT rank 0 of a job chose."""
        return self.jobs_dir / "rendezvous" / f"{key}.port"

    # ---------------------------------------------------------------- every stage
    def stage_dir(self, stage: str) -> Path:
        """``<stage>/``: the folder of a stage's artefacts (its stage-table name)."""
        return self.root / stage

    def done_marker(self, stage: str) -> Path:
        """``<stage>/done.json``: the stage's done marker (:mod:`rift_dist.stages.done_markers`)."""
        return self.stage_dir(stage) / DONE

    def model(self, stage: str) -> Path:
        """``<stage>/model.pt``: the model a stage produced (train, finetune, interpolate)."""
        return self.stage_dir(stage) / MODEL

    def best_model(self, stage: str) -> Path:
        """``<stage>/best.pt``: the best epoch so far of a training stage (train, finetune)."""
        return self.stage_dir(stage) / "best.pt"

    def history(self, stage: str) -> Path:
        """``<stage>/history.json``: the per-epoch history of a training stage."""
        return self.stage_dir(stage) / HISTORY

    def checkpoints(self, stage: str) -> Path:
        """``<stage>/checkpoints/``: the resumable checkpoints of a training stage."""
        return self.stage_dir(stage) / "checkpoints"

    def checkpoint(self, stage: str, number: int) -> Path:
        """``<stage>/checkpoints/ckpt-<number:09d>.pt`` (``number``: :func:`rift_dist.checkpoint_ids.checkpoint_id`)."""
        return self.checkpoints(stage) / checkpoint_name(number)

    @property
    def import_report(self) -> Path:
        """``train/import_report.json``: how ``from_checkpoint`` was imported."""
        return self.stage_dir("train") / "import_report.json"

    # ---------------------------------------------------------------- mrc
    @property
    def mrc_table(self) -> Path:
        """``mrc.csv``: the MRC of every module (RiFT Fig. 2)."""
        return self.root / "mrc.csv"

    @property
    def mrc_result(self) -> Path:
        """``mrc/mrc.json``: the MRC rows, the chosen modules and the array assignment."""
        return self.stage_dir("mrc") / "mrc.json"

    @property
    def mrc_plot(self) -> Path:
        """``mrc/mrc.png``: the MRC bar chart."""
        return self.stage_dir("mrc") / "mrc.png"

    @property
    def adversarial_set(self) -> Path:
        """``mrc/adversarial_set.pt``: the fixed adversarial examples of the MRC search."""
        return self.stage_dir("mrc") / "adversarial_set.pt"

    @property
    def mrc_modules(self) -> Path:
        """``mrc/modules/``: one result file per module."""
        return self.stage_dir("mrc") / "modules"

    def mrc_module(self, module: str) -> Path:
        """``mrc/modules/<module>.json``: the MRC of one module (resumable piece of the search)."""
        return self.mrc_modules / f"{module}.json"

    # ---------------------------------------------------------------- finetune
    @property
    def candidates(self) -> Path:
        """``finetune/candidates.json``: the fine-tuning candidates, lowest MRC first (``rift submit``, k > 1)."""
        return self.stage_dir("finetune") / "candidates.json"

    def candidate_dir(self, module: str) -> Path:
        """``finetune/candidates/<module>/``: the sub-run directory fine-tuning candidate ``module`` alone."""
        return self.stage_dir("finetune") / "candidates" / module

    def candidate(self, module: str) -> "RunLayout":
        """The layout of candidate ``module``'s sub-run directory."""
        return RunLayout(self.candidate_dir(module))

    def finetuned_model(self, candidate: str | None = None) -> Path:
        """The fine-tuned model theta_FT: ``finetune/model.pt``, or candidate ``candidate``'s own."""
        return self.model("finetune") if candidate is None else self.candidate(candidate).model("finetune")

    # ---------------------------------------------------------------- interpolate
    @property
    def interpolation_table(self) -> Path:
        """``interpolation.csv``: alpha, clean_accuracy, robust_accuracy on the selection split."""
        return self.root / "interpolation.csv"

    @property
    def alpha_choice(self) -> Path:
        """``interpolate/alpha.json``: alpha* and its row."""
        return self.stage_dir("interpolate") / "alpha.json"

    @property
    def interpolation_plot(self) -> Path:
        """``interpolate/interpolation.png``: the sweep's curve."""
        return self.stage_dir("interpolate") / "interpolation.png"

    @property
    def alphas(self) -> Path:
        """``interpolate/alphas/``: one result file per alpha."""
        return self.stage_dir("interpolate") / "alphas"

    def alpha_result(self, alpha: float, candidate: str | None = None) -> Path:
        """The result file of theta(alpha): ``interpolate/alphas/alpha-<a>.json``, or for fine-tuning candidate
        ``candidate`` ``interpolate/candidates/<module>/alpha-<a>.json`` (alpha 0, the AT model, is shared: the
        stage's own file)."""
        if candidate is None or alpha == 0.0:
            return self.alphas / alpha_name(alpha)
        return self.stage_dir("interpolate") / "candidates" / candidate / alpha_name(alpha)

    ALPHA_GLOB = f"{ALPHA_PREFIX}*.json"
    """Glob of the per-alpha result files (``rglob`` under ``interpolate/`` finds the candidates' too)."""

    @property
    def interpolation_candidates(self) -> Path:
        """``interpolate/candidates.json``: the candidate chosen and every candidate's alpha*."""
        return self.stage_dir("interpolate") / "candidates.json"

    # ---------------------------------------------------------------- evaluate
    @property
    def summary(self) -> Path:
        """``summary.json``: the final numbers (RiFT Table 1)."""
        return self.root / "summary.json"

    @property
    def summary_markdown(self) -> Path:
        """``summary.md``: the final numbers as Markdown tables."""
        return self.root / "summary.md"

    @property
    def summary_csv(self) -> Path:
        """``summary.csv``: the final numbers, one row per model and metric."""
        return self.root / "summary.csv"

    @property
    def evaluation_figure(self) -> Path:
        """``evaluate/at_vs_rift.png``: AT vs RiFT bars."""
        return self.stage_dir("evaluate") / "at_vs_rift.png"

    @property
    def evaluation_progress(self) -> Path:
        """``evaluate/progress/``: per-sample progress of the final evaluation (resumed after a kill)."""
        return self.stage_dir("evaluate") / "progress"

    @property
    def checkpoint_eval(self) -> Path:
        """``checkpoint_eval/``: ``rift evaluate --checkpoint``'s reports, config copy and progress."""
        return self.root / "checkpoint_eval"

    @property
    def checkpoint_eval_config(self) -> Path:
        """``checkpoint_eval/config.yaml``: the config ``rift evaluate --checkpoint`` ran with."""
        return self.checkpoint_eval / CONFIG

    @property
    def checkpoint_eval_progress(self) -> Path:
        """``checkpoint_eval/progress/``: per-sample progress of ``rift evaluate --checkpoint``."""
        return self.checkpoint_eval / "progress"

    def checkpoint_report(self, suffix: str = "json") -> Path:
        """``checkpoint_eval/report.<suffix>`` (json, md or csv): the checkpoint's numbers."""
        if suffix not in ("json", "md", "csv"):
            raise ValueError(f"report suffix {suffix!r}; choose json, md or csv")
        return self.checkpoint_eval / f"report.{suffix}"

    @property
    def checkpoint_import_report(self) -> Path:
        """``checkpoint_eval/import_report.json``: how the checkpoint's parameters were mapped to the model."""
        return self.checkpoint_eval / "import_report.json"


__all__ = ["ALPHA_PREFIX", "CONFIG", "DONE", "FILE_NAMES", "LOCK", "MLFLOW_PARENT", "PARAMS_FULL", "RunLayout",
           "SUBMISSION", "alpha_name", "mlflow_key_name"]
