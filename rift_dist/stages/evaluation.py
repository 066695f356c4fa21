"""Stage 5 — evaluation of the AT model and the RiFT model (RiFT §5.1; RIFT.md Stages 5).

Clean accuracy; PGD robust accuracy (PGD-10, 8/255, step 2/255, random start,
worst case per sample over ``eval.restarts`` restarts) plus PGD-20/50 and the
CW margin-loss PGD, each reported with its settings; AutoAttack (standard
version, Croce & Hein 2020) with ``eval.autoattack``; corruption accuracy
(mean over the corruptions and severities of a CIFAR-10-C style set, with
per-corruption and per-severity tables; ``eval.corruption_protocol`` picks the
standard set, the authors' code's 18 corruptions, or both); and the sanity
checks against false robustness of :mod:`rift_dist.robustness`, whose failures
are flagged in the summary and in MLflow.  All on the test split (the first
``eval.n_examples`` images when set, recorded with the result), once, at the
end.  Long evaluations keep per-sample progress in ``evaluate/progress`` and
resume after a kill.  Writes ``summary.json``, ``summary.md``, ``summary.csv``
and prints the table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from rift_dist.plotting import save_figure
from rift_dist.atomic import atomic_write_text
from rift_dist.stages.common import (
    StageContext, at_state, evaluate_model, fmt_pct, load_state, new_model, write_done, write_json,
)

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
    from rift_dist.robustness import state_fingerprint

    table: dict[str, float] = {}
    store = Path(progress_dir) / f"{label}-corruptions.json" if progress_dir is not None else None
    fp = state_fingerprint(model) if store is not None else ""
    if store is not None and ctx.cfg.eval.resume and store.is_file():
        saved = json.loads(store.read_text())
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
    from rift_dist.robustness import robustness_suite

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
    from rift_dist.robustness import result_csv_rows, result_metrics, validate_eval_config, write_csv

    cfg = ctx.cfg
    validate_eval_config(cfg)
    theta_at = at_state(ctx)
    theta_rift = load_state(ctx.run_dir / "interpolate" / "model.pt", "the RiFT (interpolated) model")
    alpha_info = json.loads((ctx.run_dir / "interpolate" / "alpha.json").read_text())
    ft_done = json.loads((ctx.run_dir / "finetune" / "done.json").read_text())["outputs"]
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


def headline_metrics(summary: dict) -> dict[str, float]:
    """The parent run's headline numbers in percent and deltas in points, e.g. ``at_clean_accuracy_pct``,
    ``rift_robust_accuracy_pct``, ``delta_corruption_accuracy_pp``, and ``alpha_star``.

    MLflow's runs table shows these without a click; the fractions stay on the evaluation child run.
    """
    out = {}
    for key in ("clean_accuracy", "robust_accuracy", "corruption_accuracy"):
        a, b = summary["at"].get(key), summary["rift"].get(key)
        if a is None or b is None:
            continue
        out[f"at_{key}_pct"] = 100 * a
        out[f"rift_{key}_pct"] = 100 * b
        out[f"delta_{key}_pp"] = 100 * (b - a)
    out["alpha_star"] = float(summary["alpha"])
    return out


def headline_tags(cfg, summary: dict) -> dict[str, str]:
    """Tags of the parent run: module(s), alpha*, data set, architecture, seed, and the table as its description.

    ``mlflow.note.content`` is the run's description in the MLflow UI (rendered Markdown).
    """
    table = ["| metric | AT | RiFT | delta (pp) |", "| --- | --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(summary)]
    same = " (alpha* = 0: the RiFT model is the AT model)" if summary["alpha"] == 0 else ""
    note = (f"**RiFT on {cfg.data.dataset} / {cfg.model.arch}**, seed {cfg.seed}: fine-tuned module(s) "
            f"`{', '.join(summary['modules'])}`, alpha* = {summary['alpha']:g}{same}, "
            f"{summary['test_examples']} test images.\n\n" + "\n".join(table))
    return {"rift.modules": ",".join(summary["modules"]), "rift.alpha_star": f"{summary['alpha']:g}",
            "rift.dataset": cfg.data.dataset, "rift.arch": cfg.model.arch, "rift.seed": str(cfg.seed),
            "mlflow.note.content": note}


def summary_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(metric, AT, RiFT, delta) rows of the final table, accuracies in %."""
    at, rift = summary["at"], summary["rift"]
    rows = []

    def add(label, a, b):
        rows.append((label, fmt_pct(a), fmt_pct(b), f"{100 * (b - a):+.2f}" if a is not None and b is not None else "-"))

    add("clean accuracy", at["clean_accuracy"], rift["clean_accuracy"])
    p = summary["pgd"]
    add(f"robust accuracy (PGD-{p['num_steps']}, worst of {p['restarts']})", at["robust_accuracy"], rift["robust_accuracy"])
    main = f"pgd-{p['num_steps']}"
    for name, r in at.get("pgd", {}).items():
        if name == main or name not in rift.get("pgd", {}):
            continue
        s = r["attacks"][0]["settings"]
        add(f"robust accuracy ({name.upper().replace('-MARGIN', ', margin loss')}, worst of {s['restarts']})",
            r["robust_accuracy"], rift["pgd"][name]["robust_accuracy"])
    if "autoattack_accuracy" in at:
        add("AutoAttack accuracy (standard)", at["autoattack_accuracy"], rift.get("autoattack_accuracy"))
    if "corruption_accuracy" in at:
        add("corruption accuracy", at["corruption_accuracy"], rift["corruption_accuracy"])
        for name, pr in at.get("corruption", {}).get("protocols", {}).items():
            if len(at["corruption"]["protocols"]) > 1:
                add(f"  corruption accuracy, {name} protocol", pr["mean"],
                    rift["corruption"]["protocols"][name]["mean"])
    return rows


def _pair_table(title: str, left: dict, right: dict) -> list[str]:
    lines = [f"| {title} | AT (%) | RiFT (%) | delta (pp) |", "| --- | --- | --- | --- |"]
    for k, a in left.items():
        b = right.get(k)
        lines.append(f"| {k} | {fmt_pct(a)} | {fmt_pct(b)} | {100 * (b - a):+.2f} |" if b is not None
                     else f"| {k} | {fmt_pct(a)} | - | - |")
    return lines + [""]


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


def summary_markdown(summary: dict) -> str:
    """The AT-vs-RiFT table as Markdown, with settings, AutoAttack, corruption tables and sanity checks."""
    from rift_dist.robustness import sanity_markdown

    at, rift = summary["at"], summary["rift"]
    lines = ["| metric | AT | RiFT | delta |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(summary)]
    lines.append("")
    lines.append(f"Fine-tuned module(s): {', '.join(summary['modules'])}; alpha* = {summary['alpha']:g} "
                 f"(chosen on the {summary['selection_split']} split); {summary['test_examples']} test images"
                 + (f" (quick look: eval.n_examples = {summary['n_examples']})" if summary.get("n_examples") else "")
                 + ".")
    if rift.get("same_as_at"):
        lines.append("")
        lines.append("alpha* = 0: **the RiFT model is the AT model** (identical weights); its figures are the AT "
                     "model's, evaluated once.")
    lines.append("")
    lines.append("Figures: ![AT vs RiFT](evaluate/at_vs_rift.png) ![MRC per module](mrc/mrc.png) "
                 "![interpolation sweep](interpolate/interpolation.png) (paths in the run directory; in MLflow "
                 "they are the evaluation run's figures/ artefacts)")
    lines.append("")
    lines.append("Attack settings (L-inf, pixels in [0, 1]):")
    for name, r in at.get("pgd", {}).items():
        s = r["attacks"][0]["settings"]
        lines.append(f"- {name}: epsilon {255 * s['epsilon']:g}/255, step {255 * s['step_size']:g}/255, "
                     f"{s['num_steps']} steps, random start, worst of {s['restarts']} restart(s), {s['loss']} loss")
    if at.get("autoattack"):
        aa = summary["autoattack"]
        lines.append(f"- AutoAttack (standard, torchattacks classes): {', '.join(aa['attacks'])}; "
                     f"{aa['steps']} iterations, Square {aa['queries']} queries, seed {aa['seed']}; a sample is robust "
                     f"only if it survives every attack")
        lines.append("")
        lines += _pair_table("robust accuracy after attack", {x["name"]: x["robust_after"] for x in at["autoattack"]["attacks"]},
                             {x["name"]: x["robust_after"] for x in rift["autoattack"]["attacks"]})
        for note in at["autoattack"].get("notes", []):
            lines.append(f"Note: {note}")
    lines.append("")
    if at.get("epsilon_sweep"):
        p = summary["pgd"]
        lines.append(f"Epsilon sweep (sanity check): {255 * p['epsilon']:g}/255 is the paper's PGD above; the other "
                     f"epsilons use PGD-{p['num_steps']} with step epsilon/4.")
        lines.append("")
        lines += _pair_table("PGD robust accuracy at epsilon",
                             {f"{255 * q['epsilon']:g}/255": q["robust_accuracy"] for q in at["epsilon_sweep"]},
                             {f"{255 * q['epsilon']:g}/255": q["robust_accuracy"] for q in rift["epsilon_sweep"]})
    if summary.get("corruption_set"):
        cs = summary["corruption_set"]
        lines.append(f"Corruptions: {cs['label']}; protocol {cs.get('protocol', 'standard')}; "
                     f"{len(cs['corruptions'])} corruptions x severities {cs['severities']}, "
                     f"{cs.get('images_per_set', '?')} images each.")
        lines.append("")
        if "corruption" in at:
            lines += _pair_table("corruption", at["corruption"]["per_corruption"], rift["corruption"]["per_corruption"])
            lines += _pair_table("severity", at["corruption"]["per_severity"], rift["corruption"]["per_severity"])
            protos = at["corruption"].get("protocols", {})
            if protos:
                lines += _pair_table("protocol (mean)", {k: v["mean"] for k, v in protos.items()},
                                     {k: v["mean"] for k, v in rift["corruption"]["protocols"].items()})
    for key, title in (("at", "AT"), ("rift", "RiFT")):
        if summary[key].get("sanity"):
            lines += sanity_markdown(summary[key]["sanity"], title)
    return "\n".join(lines) + "\n"


def print_summary(summary: dict) -> None:
    """Print the AT-vs-RiFT table to the terminal (rich), with failed sanity checks in red."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="RiFT: adversarially trained (AT) vs RiFT model, test split")
    for col in ("metric", "AT (%)", "RiFT (%)", "delta (pp)"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for row in summary_rows(summary):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"fine-tuned module(s): [bold]{', '.join(summary['modules'])}[/bold]   "
                  f"alpha* = [bold]{summary['alpha']:g}[/bold] (chosen on the {summary['selection_split']} split)   "
                  f"test images: {summary['test_examples']}")
    if summary.get("corruption_set"):
        console.print(f"corruptions: {summary['corruption_set']['label']}")
    corr_at, corr_rift = summary["at"].get("corruption"), summary["rift"].get("corruption")
    if corr_at and corr_rift:
        ct = Table(title="corruption accuracy (%) by corruption and severity")
        for col in ("corruption / severity", "AT", "RiFT"):
            ct.add_column(col, justify="left" if col.startswith("corr") else "right")
        for c, v in corr_at["per_corruption"].items():
            ct.add_row(c, fmt_pct(v), fmt_pct(corr_rift["per_corruption"].get(c)))
        for s, v in corr_at["per_severity"].items():
            ct.add_row(f"severity {s}", fmt_pct(v), fmt_pct(corr_rift["per_severity"].get(s)))
        console.print(ct)
    sanity = summary.get("sanity", {})
    if sanity.get("enabled"):
        if sanity.get("passed"):
            console.print("[green]robustness sanity checks: all passed[/green]")
        else:
            console.print(f"[bold red]robustness sanity checks FAILED: {', '.join(sanity['failed'])} — "
                          f"do not trust the robust accuracy (see summary.md)[/bold red]")
