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
resume after a kill.  Every figure comes from :mod:`rift_dist.eval.protocol`; writes ``summary.json``,
``summary.md`` and ``summary.csv`` (tables of :mod:`rift_dist.eval.report`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from rift_dist.atomic import atomic_write_text, read_json, read_json_piece
from rift_dist.eval.protocol import evaluate_model, robustness_suite, state_fingerprint, validate_eval_config
from rift_dist.eval.report import (
    headline_metrics, headline_tags, result_csv_rows, result_metrics, summary_markdown, write_csv,
)
from rift_dist.plotting import save_figure
from rift_dist.atomic import write_json
from rift_dist.stages.context import StageContext, at_state, load_state, new_model
from rift_dist.stages.done_markers import write_done

STAGE = "evaluate"


def corruption_plan(cfg) -> dict[str, tuple[list[str], list[int]]]:
    """{protocol: (corruptions, severities)} for ``eval.corruption_protocol``.

    standard: ``data.corruptions`` (empty = the 15 of CIFAR-10-C) at ``data.severities``;
    authors: the 18 corruptions the authors' code averages over (all 19 files but glass_blur) at
    severities 1-5, or severity 1 only for Tiny-ImageNet-C, as their code does; both: the two.
    """
    from rift_dist.data.corruptions import AUTHORS_USED_CORRUPTIONS, CIFAR_CORRUPTIONS
    from rift_dist.data.datasets import dataset_spec

    d = cfg.data
    plans = {}
    if cfg.eval.corruption_protocol in ("standard", "both"):
        plans["standard"] = (list(d.corruptions) or list(CIFAR_CORRUPTIONS), sorted(d.severities))
    if cfg.eval.corruption_protocol in ("authors", "both"):
        plans["authors"] = (list(AUTHORS_USED_CORRUPTIONS), list(dataset_spec(d.dataset).authors_severities))
    return plans


def corruption_sets(ctx: StageContext):
    """The corruption sets to evaluate as [(corruption, severity, ArrayDataset)] plus a description dict.

    Loads ``data.corruption_root`` or, with ``data.corruption_generate``, re-generates a CIFAR-10-C
    style set from the test split (main process first, then every rank loads it), for the union of
    the corruptions and severities of ``eval.corruption_protocol``.  Returns ([], None) when neither
    is configured.

    Raises:
        DataError: from the loader, e.g. ONE error listing every missing corruption file.
    """
    from rift_dist.data.corruptions.generate import get_corruption_sets

    cfg = ctx.cfg
    d = cfg.data
    if not d.corruption_root and not d.corruption_generate:
        return [], None
    plans = corruption_plan(cfg)
    names: list[str] = []
    sevs: set[int] = set()
    for cs, ss in plans.values():
        names += [c for c in cs if c not in names]
        sevs.update(ss)
    wanted = dataclasses.replace(cfg, data=dataclasses.replace(d, corruptions=names, severities=sorted(sevs)))
    if d.corruption_generate and ctx.is_main:
        sets = get_corruption_sets(wanted)  # generates once, on the main process
    ctx.runtime.barrier()
    if not (d.corruption_generate and ctx.is_main):
        sets = get_corruption_sets(wanted)
    regenerated = any("RE-GENERATED" in ds.description for _, _, ds in sets)
    info = {"root": d.corruption_root or f"{d.cache_dir}/corruptions", "regenerated": regenerated,
            "protocol": cfg.eval.corruption_protocol, "corruptions": names, "severities": sorted(sevs),
            "protocols": {k: {"corruptions": v[0], "severities": v[1]} for k, v in plans.items()},
            "label": "re-generated CIFAR-10-C style set (not the official release)" if regenerated
            else "official corruption set",
            "images_per_set": len(sets[0][2]) if sets else 0}
    return sets, info


def evaluate_corruptions(ctx: StageContext, model, sets, label: str = "", progress_dir: Path | None = None) -> dict:
    """Clean accuracy on every (corruption, severity); mean as the headline, per-corruption/severity tables,
    and the mean of each protocol of ``eval.corruption_protocol``.

    With ``progress_dir``, finished sets are recorded in ``<progress_dir>/<label>-corruptions.json``
    (keyed by the model's weights) and skipped when the evaluation is resumed.
    """
    table: dict[str, float] = {}
    store = Path(progress_dir) / f"{label}-corruptions.json" if progress_dir is not None else None
    fp = state_fingerprint(model) if store is not None else ""
    saved = read_json_piece(store) if store is not None and ctx.cfg.eval.resume else None
    if saved is not None:
        if saved.get("model") == fp and saved.get("n") == [len(ds) for _, _, ds in sets]:
            table.update(saved["per_set"])
    ctx.runtime.barrier()
    for name, severity, ds in sets:
        key = f"{name}/{severity}"
        if key in table:
            continue
        table[key] = evaluate_model(ctx, model, ds, None, desc=f"{label} {name}-{severity}", in_memory=True)["clean_accuracy"]
        if store is not None and ctx.is_main:
            write_json(store, {"model": fp, "n": [len(d) for _, _, d in sets], "per_set": table})
    table = {f"{n}/{s}": table[f"{n}/{s}"] for n, s, _ in sets}
    per_c: dict[str, list[float]] = {}
    per_s: dict[str, list[float]] = {}
    for key, acc in table.items():
        c, s = key.split("/")
        per_c.setdefault(c, []).append(acc)
        per_s.setdefault(s, []).append(acc)
    protocols = {}
    for pname, (cs, ss) in corruption_plan(ctx.cfg).items():
        vals = [table[f"{c}/{s}"] for c in cs for s in ss if f"{c}/{s}" in table]
        if vals:
            protocols[pname] = {"mean": sum(vals) / len(vals), "corruptions": cs, "severities": ss, "sets": len(vals)}
    mean = sum(table.values()) / max(len(table), 1)
    if protocols:  # the headline is the configured protocol's mean (standard when both)
        mean = protocols.get("standard", next(iter(protocols.values())))["mean"]
    return {"corruption_accuracy": mean,
            "per_corruption": {c: sum(v) / len(v) for c, v in per_c.items()},
            "per_severity": {s: sum(v) / len(v) for s, v in per_s.items()},
            "per_set": table, "protocols": protocols}


def evaluate_one(ctx: StageContext, state: dict, test, sets, label: str) -> dict:
    """Clean, PGD (paper protocol and variants), optional AutoAttack, sanity checks and corruption accuracy."""
    model = new_model(ctx, state)
    t0 = time.time()
    progress = ctx.run_dir / STAGE / "progress"
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
    theta_rift = load_state(ctx.run_dir / "interpolate" / "model.pt", "the RiFT (interpolated) model")
    alpha_info = read_json(ctx.run_dir / "interpolate" / "alpha.json")
    ft_done = read_json(ctx.run_dir / "finetune" / "done.json")["outputs"]
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
            write_json(ctx.run_dir / "summary.json", summary)
            figure = ctx.path("evaluate", "at_vs_rift.png")
            plot_at_vs_rift(figure, summary)
            atomic_write_text(ctx.run_dir / "summary.md", summary_markdown(summary))
            write_csv(ctx.run_dir / "summary.csv", result_csv_rows("AT", at) + result_csv_rows("RiFT", rift))
            metrics = {**result_metrics("at", at), **result_metrics("rift", rift)}
            run_log.log_metrics(metrics)
            tag = "not run" if not cfg.eval.sanity_checks else ("passed" if not failed else "FAILED: " + ", ".join(failed))
            run_log.set_tags({"rift.sanity": tag})
            for name in ("summary.json", "summary.md", "summary.csv"):
                run_log.log_artifact(ctx.run_dir / name)
            for fig_path in (figure, ctx.run_dir / "mrc" / "mrc.png", ctx.run_dir / "interpolate" / "interpolation.png"):
                run_log.log_artifact(fig_path, "figures")  # the figures summary.md shows, beside it
            ctx.tracker.parent.log_metrics({k: v for k, v in metrics.items() if k.count(".") == 1})
            ctx.tracker.parent.log_metrics(headline_metrics(summary))
            ctx.tracker.parent.set_tags({"rift.sanity": tag, **headline_tags(cfg, summary)})
            ctx.tracker.parent.log_artifact(ctx.run_dir / "summary.md")
            ctx.tracker.parent.log_artifact(ctx.run_dir / "summary.csv")
            if failed:
                ctx.log(f"[evaluate] WARNING: robustness sanity checks FAILED ({', '.join(failed)}); "
                        f"see summary.md — do not trust the robust accuracy")
    outputs = {"summary": str(ctx.run_dir / "summary.json")}
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
