"""``rift evaluate CONFIG --checkpoint PATH``: the full robustness evaluation of a checkpoint made elsewhere.

An entry point beside :mod:`rift_dist.pipeline` (it sets up a run the same way) that uses the evaluation
stage's data helpers, :mod:`rift_dist.eval.protocol`'s suite and :mod:`rift_dist.eval.report`'s tables; kept
out of ``eval`` so that the evaluator does not import the pipeline that uses it.
"""

from __future__ import annotations

from pathlib import Path

from rift_dist.models.convert import load_external_checkpoint
from rift_dist.pipeline import open_run
from rift_dist.eval.protocol import robustness_suite
from rift_dist.eval.report import print_report, report_markdown, result_csv_rows, result_metrics, write_csv
from rift_dist.atomic import atomic_write_text, write_json
from rift_dist.layout import RunLayout
from rift_dist.stages.context import new_model
from rift_dist.eval.corruption import corruption_sets, evaluate_corruptions
from rift_dist.stages.evaluation import test_dataset


def evaluate_checkpoint(cfg, path: str | Path, progress: bool = True) -> int:
    """``rift evaluate CONFIG --checkpoint PATH``: load an external checkpoint and evaluate it fully.

    Opens the run as ``rift run`` does (:func:`rift_dist.pipeline.open_run`: the same config and input
    checks, runtime, tracker and teardown), loads ``path`` through
    :func:`rift_dist.models.convert.load_external_checkpoint` (``weights_only``; the layouts
    people have), runs :func:`robustness_suite` on the test split (first ``eval.n_examples``
    images when set) and the corruption sets when configured, prints the table and writes
    ``<run_dir>/checkpoint_eval/report.{json,md,csv}`` (plus ``import_report.json``), and logs
    metrics, a ``rift.sanity`` tag and the artefacts to MLflow.  Progress is kept in
    ``<run_dir>/checkpoint_eval/progress`` so a killed evaluation resumes.

    Returns:
        0 (failed sanity checks are printed, written and tagged, not turned into an exit status).

    Raises:
        CheckpointError: unreadable checkpoint or one that does not fit the configured model (nothing written).
        ConfigError: bad ``eval`` settings (or any config problem ``rift run`` refuses).
        PreflightError: missing data or corruption-set paths (before anything is written).
        DataError: missing data or corruption files (the message lists what is missing).
    """
    layout = RunLayout(cfg.run_dir)
    from rift_dist.models import build_model

    # a missing, unreadable or ill-fitting checkpoint is refused before open_run writes the run directory
    # (checkpoint_eval/config.yaml, mlflow_run.json); the model is loaded again below, on the run's device
    load_external_checkpoint(path, build_model(cfg))
    # the checks of `rift run` (config, eval section, data and corruption paths); no lock: it writes only
    # checkpoint_eval/, which no stage touches
    with open_run(cfg, stages=("evaluate",), progress=progress, exclusive=False,
                  config_copy=layout.checkpoint_eval_config) as ctx:
        model = new_model(ctx)
        _, imported = load_external_checkpoint(path, model)
        ctx.log(f"[evaluate] {path}: {imported.get('summary', '')}")
        test = test_dataset(ctx)
        sets, cinfo = corruption_sets(ctx)
        with ctx.tracker.stage("evaluate_checkpoint", key=f"evaluate_checkpoint:{Path(path).resolve()}") as run_log:
            result = robustness_suite(ctx, model, test, "checkpoint", layout.checkpoint_eval_progress)
            if sets:
                c = evaluate_corruptions(ctx, model, sets, "checkpoint", layout.checkpoint_eval_progress)
                result["corruption_accuracy"] = c["corruption_accuracy"]
                result["corruption"] = {k: v for k, v in c.items() if k != "corruption_accuracy"}
                result["corruption_label"] = cinfo["label"] if cinfo else ""
            report = {"checkpoint": str(path), "n_examples": cfg.eval.n_examples, "result": result,
                      "import": imported, "corruption_set": cinfo, "precision": ctx.precision.describe()}
            if ctx.is_main:
                write_json(layout.checkpoint_import_report, imported)
                write_json(layout.checkpoint_report("json"), report)
                atomic_write_text(layout.checkpoint_report("md"), report_markdown(report))
                write_csv(layout.checkpoint_report("csv"), result_csv_rows("checkpoint", result))
                run_log.log_params({"checkpoint": str(path), "eval.n_examples": cfg.eval.n_examples})
                run_log.log_metrics(result_metrics("checkpoint", result))
                sanity = result.get("sanity")
                run_log.set_tags({"rift.sanity": "not run" if not sanity else
                                  ("passed" if sanity["passed"] else "FAILED: " + ", ".join(sanity["failed"]))})
                for suffix in ("json", "md", "csv"):
                    run_log.log_artifact(layout.checkpoint_report(suffix))
                run_log.log_artifact(layout.checkpoint_import_report)
                print_report(report)
        return 0
