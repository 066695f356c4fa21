"""The final numbers as tables: one model's result (rows, CSV, MLflow metrics, Markdown, terminal) and the
AT-vs-RiFT summary of the evaluation stage (RiFT §5.1, Table 1's columns: clean, robust, corruption accuracy).

Pure formatting: every function takes the result dicts of :mod:`rift_dist.eval.protocol` (fractions in
[0, 1]) and prints percentages with two decimals.  Nothing here attacks or reads a model.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from rift_dist.layout import RunLayout


def fmt_pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals ('-' for None or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}"


# ============================================================================ one model's result

def robustness_rows(result: dict) -> list[tuple[str, float, str]]:
    """(metric, accuracy, settings) rows of one model's suite result, for tables and CSV."""
    rows = [("clean accuracy", result["clean_accuracy"], "")]
    for name, r in result.get("pgd", {}).items():
        s = r["attacks"][0]["settings"]
        rows.append((f"robust accuracy, {name}", r["robust_accuracy"],
                     f"eps {255 * s['epsilon']:g}/255, step {255 * s['step_size']:g}/255, "
                     f"{s['num_steps']} steps, worst of {s['restarts']}, loss {s['loss']}"))
    aa = result.get("autoattack")
    if aa:
        rows.append(("AutoAttack accuracy", aa["robust_accuracy"],
                     f"standard ({', '.join(x['name'] for x in aa['attacks'])}), seed {aa.get('seed')}"))
        for x in aa["attacks"]:
            rows.append((f"  after {x['name']}", x["robust_after"],
                         ", ".join(f"{k} {v}" for k, v in x["settings"].items() if k not in ("norm", "epsilon", "library", "attack"))))
    for p in result.get("epsilon_sweep", []):
        rows.append((f"PGD at eps {255 * p['epsilon']:g}/255", p["robust_accuracy"], "epsilon sweep"))
    if "corruption_accuracy" in result:
        rows.append(("corruption accuracy", result["corruption_accuracy"], result.get("corruption_label", "")))
    return rows


def sanity_markdown(sanity: dict, title: str = "") -> list[str]:
    """Markdown lines of a sanity-check result (a table; failures in bold)."""
    lines = [f"Sanity checks{(' — ' + title) if title else ''}: "
             + ("**all passed**" if sanity["passed"] else f"**FAILED: {', '.join(sanity['failed'])}**"), "",
             "| check | result | detail |", "| --- | --- | --- |"]
    for c in sanity["checks"]:
        verdict = {True: "pass", False: "**FAIL**", None: "not run"}[c["passed"]]
        lines.append(f"| {c['name']} | {verdict} | {c['detail']} |")
    return lines + [""]


def corruption_markdown(corr: dict, title: str = "") -> list[str]:
    """Markdown per-corruption and per-severity tables (accuracy in %) of ``evaluate_corruptions`` output."""
    lines = [f"Corruption accuracy{(' — ' + title) if title else ''}", ""]
    protocols = corr.get("protocols", {})
    if protocols:
        lines += ["| protocol | mean accuracy (%) | corruptions | severities |", "| --- | --- | --- | --- |"]
        for name, p in protocols.items():
            lines.append(f"| {name} | {fmt_pct(p['mean'])} | {len(p['corruptions'])} | "
                         f"{', '.join(map(str, p['severities']))} |")
        lines.append("")
    lines += ["| corruption | accuracy (%) |", "| --- | --- |"]
    lines += [f"| {c} | {fmt_pct(v)} |" for c, v in corr.get("per_corruption", {}).items()]
    lines += ["", "| severity | accuracy (%) |", "| --- | --- |"]
    lines += [f"| {s} | {fmt_pct(v)} |" for s, v in corr.get("per_severity", {}).items()]
    return lines + [""]


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Write dict rows as CSV atomically (columns from the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path


def result_metrics(prefix: str, result: dict) -> dict[str, float]:
    """MLflow metrics of one model's result: accuracies, per-attack, corruption tables, sanity flags (1 = pass)."""
    m = {f"{prefix}.clean_accuracy": result["clean_accuracy"], f"{prefix}.robust_accuracy": result["robust_accuracy"]}
    for name, r in result.get("pgd", {}).items():
        m[f"{prefix}.{name}_accuracy"] = r["robust_accuracy"]
    aa = result.get("autoattack")
    if aa:
        m[f"{prefix}.autoattack_accuracy"] = aa["robust_accuracy"]
        for x in aa["attacks"]:
            m[f"{prefix}.autoattack.after_{x['name']}"] = x["robust_after"]
    for p in result.get("epsilon_sweep", []):
        m[f"{prefix}.pgd_eps{255 * p['epsilon']:g}"] = p["robust_accuracy"]
    if "corruption_accuracy" in result:
        m[f"{prefix}.corruption_accuracy"] = result["corruption_accuracy"]
        corr = result.get("corruption", {})
        for c, v in corr.get("per_corruption", {}).items():
            m[f"{prefix}.corruption.{c}"] = v
        for s, v in corr.get("per_severity", {}).items():
            m[f"{prefix}.corruption.severity{s}"] = v
        for name, p in corr.get("protocols", {}).items():
            m[f"{prefix}.corruption_accuracy.{name}"] = p["mean"]
    sanity = result.get("sanity")
    if sanity:
        m[f"{prefix}.sanity.passed"] = float(sanity["passed"])
        for c in sanity["checks"]:
            if c["passed"] is not None:
                m[f"{prefix}.sanity.{c['name']}"] = float(c["passed"])
    return m


def result_csv_rows(label: str, result: dict) -> list[dict]:
    """CSV rows (model, metric, accuracy_percent, settings) of one model's result, corruption tables included."""
    rows = [{"model": label, "metric": m.strip(), "accuracy_percent": round(100 * v, 4), "settings": s}
            for m, v, s in robustness_rows(result)]
    corr = result.get("corruption", {})
    for key, v in corr.get("per_set", {}).items():
        rows.append({"model": label, "metric": f"corruption {key}", "accuracy_percent": round(100 * v, 4),
                     "settings": "corruption/severity"})
    return rows


# ============================================================================ rift evaluate --checkpoint


def report_markdown(report: dict) -> str:
    """The markdown report (`report.md`) of a checkpoint evaluation: the result table, the sanity checks, the import notes."""
    r = report["result"]
    lines = [f"# Evaluation of {report['checkpoint']}", "",
             f"{r['num_examples']} test images"
             + (f" (quick look: eval.n_examples = {report['n_examples']})" if report["n_examples"] else "")
             + f"; {report['precision']}.", "",
             "| metric | accuracy (%) | settings |", "| --- | --- | --- |"]
    lines += [f"| {m} | {fmt_pct(v)} | {s} |" for m, v, s in robustness_rows(r)]
    lines.append("")
    if r.get("autoattack", {}) and r["autoattack"].get("notes"):
        lines += [f"Note: {n}" for n in r["autoattack"]["notes"]] + [""]
    if "corruption" in r:
        lines += corruption_markdown(r["corruption"], report.get("corruption_set", {}).get("label", ""))
    if r.get("sanity"):
        lines += sanity_markdown(r["sanity"])
    imp = report.get("import", {})
    if imp:
        lines += ["Checkpoint import: " + imp.get("summary", ""), ""]
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    """Print one checkpoint's evaluation as a rich table, failed sanity checks in red."""
    from rich.console import Console
    from rich.table import Table

    r = report["result"]
    table = Table(title=f"Evaluation of {report['checkpoint']} ({r['num_examples']} test images)")
    for col in ("metric", "accuracy (%)", "settings"):
        table.add_column(col, justify="right" if col == "accuracy (%)" else "left")
    for m, v, s in robustness_rows(r):
        table.add_row(m, fmt_pct(v), s)
    console = Console()
    console.print(table)
    corr = r.get("corruption")
    if corr:
        ct = Table(title="corruption accuracy (%)")
        ct.add_column("corruption")
        ct.add_column("accuracy", justify="right")
        for c, v in corr.get("per_corruption", {}).items():
            ct.add_row(c, fmt_pct(v))
        for s, v in corr.get("per_severity", {}).items():
            ct.add_row(f"severity {s}", fmt_pct(v))
        console.print(ct)
    sanity = r.get("sanity")
    if sanity:
        for c in sanity["checks"]:
            mark = {True: "[green]pass[/green]", False: "[bold red]FAIL[/bold red]", None: "[dim]not run[/dim]"}
            console.print(f"  sanity {c['name']}: {mark[c['passed']]} — {c['detail']}")
        if not sanity["passed"]:
            console.print(f"[bold red]robustness sanity checks FAILED: {', '.join(sanity['failed'])} — "
                          f"do not trust the robust accuracy above[/bold red]")


# ============================================================================ the evaluation stage's AT-vs-RiFT summary


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



def summary_markdown(summary: dict) -> str:
    """The AT-vs-RiFT table as Markdown, with settings, AutoAttack, corruption tables and sanity checks."""
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
    here = RunLayout(".")  # paths relative to the run directory, where summary.md is
    lines.append(f"Figures: ![AT vs RiFT]({here.evaluation_figure.as_posix()}) "
                 f"![MRC per module]({here.mrc_plot.as_posix()}) "
                 f"![interpolation sweep]({here.interpolation_plot.as_posix()}) (paths in the run directory; in MLflow "
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
                          f"do not trust the robust accuracy (see {RunLayout('.').summary_markdown})[/bold red]")
