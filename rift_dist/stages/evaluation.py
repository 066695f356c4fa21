"""Stage 5 — evaluation of the AT model and the RiFT model (RiFT §5.1; RIFT.md Stages 5).

Clean accuracy; PGD robust accuracy (PGD-10, 8/255, step 2/255, random start,
worst case per sample over ``eval.restarts`` restarts) plus PGD-20/50 and the
CW margin-loss PGD, each reported with its settings; AutoAttack (standard
version, Croce & Hein 2020) with ``eval.autoattack``; corruption accuracy
(mean over the corruptions and severities of a CIFAR-10-C style set, with
per-corruption and per-severity tables; ``eval.corruption_protocol`` picks the
standard set, the authors' code's 18 corruptions, or both); and the sanity
checks against false robustness of :mod:`rift_dist.eval.sanity`, whose failures
are flagged in the summary and in MLflow.  All on the test split (the first
``eval.n_examples`` images when set, recorded with the result), once, at the
end.  Long evaluations keep per-sample progress in ``evaluate/progress`` and
resume after a kill.  This module only orchestrates: every figure comes from :mod:`rift_dist.eval.protocol`
and :mod:`rift_dist.eval.corruption`; writes ``summary.json``,
``summary.md`` and ``summary.csv`` (tables of :mod:`rift_dist.eval.report`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from rift_dist.atomic import atomic_write_text, read_json, write_json
from rift_dist.eval.corruption import corruption_sets, evaluate_corruptions
from rift_dist.eval.protocol import robustness_suite, validate_eval_config
from rift_dist.eval.report import (
    headline_metrics, headline_tags, result_csv_rows, result_metrics, summary_markdown, write_csv,
)
from rift_dist.plotting import save_figure
from rift_dist.stages.context import StageContext, at_state, load_state, new_model
from rift_dist.stages.done_markers import write_done

STAGE = "evaluate"


def evaluate_one(ctx: StageContext, state: dict, test, sets, label: str) -> dict:
    """Clean, PGD (paper protocol and variants), optional AutoAttack, sanity checks and corruption accuracy."""
    model = new_model(ctx, state)
    t0 = time.time()
    progress = ctx.layout.evaluation_progress
    out = robustness_suite(ctx, model, test, label, progress)
    if sets:
        c = evaluate_corruptions(ctx, model, sets, label, progress)
        out["corruption_accuracy"] = c["corruption_accuracy"]
        out["corruption"] = {k: v for k, v in c.items() if k != "corruption_accuracy"}
    out["seconds"] = time.time() - t0
    return out


def test_dataset(ctx: StageContext):
    """The test split, cut to ``eval.n_examples`` when set."""
    from rift_dist.data.loaders import get_dataset

    test = get_dataset(ctx.cfg, "test")
    n = ctx.cfg.eval.n_examples
    if n and n < len(test):
        import numpy as np

        test = test.subset(np.arange(n))
    return test


def run(ctx: StageContext) -> dict:
    """Evaluate the AT and RiFT models on the test split; write ``summary.{json,md,csv}`` and log to MLflow."""
    cfg = ctx.cfg
    validate_eval_config(cfg)
    theta_at = at_state(ctx)
    layout = ctx.layout
    theta_rift = load_state(layout.model("interpolate"), "the RiFT (interpolated) model")
    alpha_info = read_json(layout.alpha_choice)
    ft_done = read_json(layout.done_marker("finetune"))["outputs"]
    test = test_dataset(ctx)
    sets, cinfo = corruption_sets(ctx)
    with ctx.tracker.stage("evaluation") as run_log:
        at = evaluate_one(ctx, theta_at, test, sets, "AT")
        if same_weights(theta_at, theta_rift):  # alpha* = 0: the RiFT model is the AT model, bit for bit
            ctx.log("[evaluate] alpha* = 0: the RiFT model is the AT model (identical weights); its figures are the "
                    "AT model's, not evaluated twice")
            rift = {**copy.deepcopy(at), "seconds": 0.0, "same_as_at": True}
        else:
            rift = evaluate_one(ctx, theta_rift, test, sets, "RiFT")
        failed = [f"{m}.{c}" for m, r in (("at", at), ("rift", rift)) for c in r.get("sanity", {}).get("failed", [])]
        summary = {
            "at": at, "rift": rift, "modules": ft_done["modules"], "alpha": alpha_info["alpha"],
            "selection_split": cfg.selection_split, "test_examples": len(test), "n_examples": cfg.eval.n_examples,
            "pgd": {"epsilon": cfg.eval.attack.epsilon, "step_size": cfg.eval.attack.step_size,
                    "num_steps": cfg.eval.attack.num_steps, "restarts": cfg.eval.restarts},
            "autoattack": {"enabled": cfg.eval.autoattack, "attacks": list(cfg.eval.autoattack_attacks),
                           "steps": cfg.eval.autoattack_steps, "queries": cfg.eval.autoattack_queries,
                           "seed": cfg.eval.autoattack_seed},
            "sanity": {"enabled": cfg.eval.sanity_checks, "passed": not failed, "failed": failed},
            "corruption_set": cinfo, "precision": ctx.precision.describe(),
        }
        if ctx.is_main:
            write_json(layout.summary, summary)
            figure = layout.evaluation_figure
            figure.parent.mkdir(parents=True, exist_ok=True)
            plot_at_vs_rift(figure, summary)
            atomic_write_text(layout.summary_markdown, summary_markdown(summary))
            write_csv(layout.summary_csv, result_csv_rows("AT", at) + result_csv_rows("RiFT", rift))
            metrics = {**result_metrics("at", at), **result_metrics("rift", rift)}
            run_log.log_metrics(metrics)
            tag = "not run" if not cfg.eval.sanity_checks else ("passed" if not failed else "FAILED: " + ", ".join(failed))
            run_log.set_tags({"rift.sanity": tag})
            for path in (layout.summary, layout.summary_markdown, layout.summary_csv):
                run_log.log_artifact(path)
            for fig_path in (figure, layout.mrc_plot, layout.interpolation_plot):
                run_log.log_artifact(fig_path, "figures")  # the figures summary.md shows, beside it
            ctx.tracker.parent.log_metrics({k: v for k, v in metrics.items() if k.count(".") == 1})
            ctx.tracker.parent.log_metrics(headline_metrics(summary))
            ctx.tracker.parent.set_tags({"rift.sanity": tag, **headline_tags(cfg, summary)})
            ctx.tracker.parent.log_artifact(layout.summary_markdown)
            ctx.tracker.parent.log_artifact(layout.summary_csv)
            if failed:
                ctx.log(f"[evaluate] WARNING: robustness sanity checks FAILED ({', '.join(failed)}); "
                        f"see {layout.summary_markdown} — do not trust the robust accuracy")
    outputs = {"summary": str(layout.summary)}
    write_done(ctx, STAGE, outputs)
    ctx.runtime.barrier()
    return outputs


def same_weights(a: dict, b: dict) -> bool:
    """True when two state dicts hold the same keys and bitwise equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def plot_at_vs_rift(path: Path, summary: dict) -> dict:
    """Grouped bars of clean / robust / corruption accuracy, AT vs RiFT, on the test split (RiFT Table 1).

    Error bars are +-1 binomial standard error sqrt(p (1 - p) / n) with n the number of test images
    (for the corruption mean, n is the images per set: a conservative bar, since the sets share images).
    Returns the texts drawn ({"title", "xlabel", "ylabel", "legend", "caption"}).
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(summary.get("test_examples") or 0)
    keys = [("clean_accuracy", "clean"), ("robust_accuracy", f"robust (PGD-{summary['pgd']['num_steps']}, "
                                                            f"worst of {summary['pgd']['restarts']})")]
    if summary["at"].get("corruption_accuracy") is not None:
        keys.append(("corruption_accuracy", "corruption (mean over sets)"))
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    width = 0.38
    for j, (model, label, color) in enumerate((("at", "AT", "tab:blue"), ("rift", "RiFT", "tab:orange"))):
        vals = [summary[model][k] for k, _ in keys]
        errs = [100 * math.sqrt(max(v * (1 - v), 0.0) / n) if n else 0.0 for v in vals]
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        bars = ax.bar(xs, [100 * v for v in vals], width, yerr=errs, capsize=4, label=label, color=color)
        for b, v in zip(bars, vals):  # the value inside the bar's foot, clear of the error bar
            ax.text(b.get_x() + b.get_width() / 2, 0.5, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=8,
                    color="white", fontweight="bold")
    ax.set_xticks(range(len(keys)), [name for _, name in keys], fontsize=9)
    ax.set_ylabel("accuracy on the test split (%)", fontsize=10)
    modules = ", ".join(summary.get("modules", []))
    same = " — RiFT = AT" if summary["alpha"] == 0 else ""
    ax.set_title(f"AT vs RiFT ({modules}, alpha* = {summary['alpha']:g}{same}); n = {n} test images, +-1 s.e.",
                 fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, ax, path)
