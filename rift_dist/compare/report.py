"""The outputs of ``rift compare``: pareto.csv, the method table with its noise, summary.md and pareto.png."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import numpy as np

from rift_dist.atomic import atomic_write_text
from rift_dist.compare.methods import AT, METRICS
from rift_dist.compare.stats import accuracy_se, paired_difference, pareto_front
from rift_dist.config import RunConfig

CSV_FIELDS = ("base", "method", "seed", "alpha", "split", "clean", "robust", "corruption", "n", "selected", "on_front")
"""The columns of ``pareto.csv``; with ``compare.autoattack`` also ``autoattack`` and ``autoattack_n`` (:func:`csv_fields`)."""
PAPER_ROWS = {  # RiFT (Zhu et al., ICCV 2023): clean / OOD / PGD-10 robust accuracy (%), CIFAR-10 ResNet-18
    ("cifar10", "resnet18"): {"at": (81.46, 73.56, 53.63), "rift": (83.44, 75.69, 53.65),  # Table 1
                              "all-layers": (83.56, 75.48, 52.66)},  # Table 3 (fine-tuning all layers)
}
"""The paper's numbers for the rows it has (clean, OOD, robust), all on PGD-AT bases; Table 4's top-k numbers and
Table 2's (RiFT on TRADES, MART, AWP, SCORE) are not on hand (shared/RIFT.md has neither), so no other base gets any."""


def csv_fields(cfg: RunConfig) -> tuple[str, ...]:
    """The columns of ``pareto.csv`` for ``cfg``: :data:`CSV_FIELDS`, plus AutoAttack's two with ``compare.autoattack``."""
    return CSV_FIELDS + (("autoattack", "autoattack_n") if cfg.compare.autoattack else ())


def pareto_rows(results: dict[int, dict], base: str = "") -> list[dict]:
    """The rows of ``pareto.csv`` for one base: AT and every (method, alpha) on the validation split, AT and every
    alpha* on the test split (with AutoAttack where it ran), per seed; ``on_front`` = on the clean-vs-robust Pareto
    front of that base, seed and split."""
    rows = []
    for seed, res in sorted(results.items()):
        for split in ("val", "test"):
            block = [{"base": base, "method": AT, "seed": seed, "alpha": 0.0, "split": split, **_acc(res["at"][split]),
                      "selected": 1}]
            for method, m in res["methods"].items():
                if split == "val":
                    block += [{"base": base, "method": method, "seed": seed, "alpha": r["alpha"], "split": split,
                               "clean": r["clean_accuracy"], "robust": r["robust_accuracy"],
                               "corruption": r["corruption_accuracy"], "n": r["n"],
                               "selected": int(r["alpha"] == m["alpha"])} for r in m["sweep"] if r["alpha"] > 0]
                else:
                    block.append({"base": base, "method": method, "seed": seed, "alpha": m["alpha"], "split": split,
                                  **_acc(m["test"]), "selected": 1})
            for r, on in zip(block, pareto_front([(r["clean"], r["robust"]) for r in block])):
                r["on_front"] = int(on)
            rows += block
    return rows


def _acc(p: dict) -> dict:
    return {"clean": p["clean"], "robust": p["robust"], "corruption": p["corruption"], "n": p["n"],
            "autoattack": p.get("autoattack"), "autoattack_n": p.get("autoattack_n")}


def write_pareto_csv(path: Path, rows: list[dict], fields: tuple[str, ...] = CSV_FIELDS) -> None:
    """``pareto.csv``: base, method, seed, alpha, split, clean, robust, corruption (fractions), n, selected,
    on_front (and autoattack, autoattack_n when in ``fields``; empty on the validation rows)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    atomic_write_text(path, buf.getvalue())


def method_table(results: dict[int, dict], methods: list[str], confidence: float) -> list[dict]:
    """Per method (AT first): alpha* per seed, the test accuracies (mean, std over seeds, mean binomial s.e.),
    and the paired differences to AT and to rift (:func:`paired_difference`) for each metric."""
    seeds = sorted(results)
    per_image = len(seeds) == 1
    out = []
    for method in [AT] + list(methods):
        pts = [results[s]["at"]["test"] if method == AT else results[s]["methods"][method]["test"] for s in seeds]
        row = {"method": method, "seeds": seeds,
               "alpha": [0.0 if method == AT else results[s]["methods"][method]["alpha"] for s in seeds],
               "modules": None if method == AT else results[seeds[0]]["methods"][method]["modules"]}
        for key, _ in METRICS:
            vals = [p[key] for p in pts]
            if any(v is None for v in vals):
                row[key] = None
                continue
            row[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                        "se": statistics.fmean(accuracy_se(p[key], p["n"]) for p in pts) if key != "corruption"
                        else statistics.fmean(float(np.std(p["scores"]["corruption"]) / math.sqrt(p["n"]))
                                              for p in pts)}
            for ref in (AT, "rift"):
                if ref == method or (ref != AT and ref not in methods):
                    continue
                refs = [results[s]["at"]["test"] if ref == AT else results[s]["methods"][ref]["test"] for s in seeds]
                if per_image:
                    d = paired_difference(pts[0]["scores"][key], refs[0]["scores"][key], confidence, True)
                else:
                    d = paired_difference(vals, [p[key] for p in refs], confidence, False)
                row[f"delta_{ref}_{key}"] = d
        aa = [p.get("autoattack") for p in pts]
        if all(v is not None for v in aa):  # compare.autoattack: accuracy and its noise, no paired difference
            row["autoattack"] = {"mean": statistics.fmean(aa), "std": statistics.stdev(aa) if len(aa) > 1 else None,
                                 "se": statistics.fmean(accuracy_se(p["autoattack"], p["autoattack_n"]) for p in pts),
                                 "n": pts[0]["autoattack_n"]}
        out.append(row)
    return out


def _pp(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _acc_cell(v: dict | None) -> str:
    if v is None:
        return "-"
    return f"{_pp(v['mean'])} ± {_pp(v['std'] if v['std'] is not None else v['se'])}"


def _delta_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{_pp(d['mean'], True)} (s.e. {_pp(d['se'])}) [{_pp(d['low'], True)}, {_pp(d['high'], True)}]"


def noise_verdict(table: list[dict]) -> tuple[str, list[str]]:
    """Whether the differences to rift are inside the sampling noise: (sentence, [differences outside])."""
    outside = []
    for row in table:
        for key, _ in METRICS:
            d = row.get(f"delta_rift_{key}")
            if d is not None and not (d["low"] <= 0.0 <= d["high"]):
                outside.append(f"{row['method']} {key} {_pp(d['mean'], True)} pp")
    if not outside:
        return ("At this scale every difference to rift is inside the sampling noise: each confidence interval "
                "contains 0.", outside)
    return (f"{len(outside)} difference(s) to rift are outside the sampling noise (interval without 0): "
            + "; ".join(outside) + ".", outside)


def summary_markdown(cfg: RunConfig, reports: list[dict], info: dict) -> str:
    """``compare/summary.md``: per AT base (one section each when there are several) the method table with its
    noise, the Pareto front per seed; the paper's rows beside the PGD-AT base where it has them.

    Args:
        reports: [{"base": CompareBase, "results": {seed: run_seed's result}, "table": method_table's rows,
            "front": {seed: [pareto rows on the front]}}], in ``compare.bases`` order.
        info: {"corruption": how the corruption accuracy was measured}.
    """
    from rift_dist.compare.bases import describe, is_flat

    flat = is_flat(cfg)
    first = reports[0]["results"]
    seeds = sorted(first)
    per_image = len(seeds) == 1
    conf = f"{100 * cfg.compare.confidence:g} %"
    n_test = first[seeds[0]]["at"]["test"]["n"]
    spread = ("± = binomial standard error (one seed)" if per_image else f"± = std over {len(seeds)} seeds")
    how = (f"per-image paired difference on the {n_test} test images, McNemar-style standard error, normal {conf} "
           f"interval" if per_image else f"paired t {conf} interval over {len(seeds)} seeds")
    with_aa = any(row.get("autoattack") for r in reports for row in r["table"])
    aa_text = ""
    if with_aa:
        n_aa = next(row["autoattack"]["n"] for row in reports[0]["table"] if row.get("autoattack"))
        aa_text = (f" AutoAttack ({', '.join(cfg.eval.autoattack_attacks)}; {cfg.eval.autoattack_steps} steps, "
                   f"{cfg.eval.autoattack_queries} Square queries) on the first {n_aa} test images: accuracy ± its "
                   f"noise only (no paired difference).")
    lines = [f"# rift compare — {cfg.name} ({cfg.data.dataset}, {cfg.model.arch} width {cfg.model.width})", "",
             f"Test split ({n_test} images), accuracies in %; {spread}. alpha* per method by the paper's rule on the "
             f"{cfg.selection_split} split (best clean accuracy with robust accuracy at most "
             f"{100 * cfg.interpolation.tolerance:g} pp below AT's). Δ = method − reference in pp, [{conf} interval: "
             f"{how}]. Robust: PGD-{cfg.eval.attack.num_steps}, worst of {cfg.eval.restarts}. Corruption: "
             f"{info.get('corruption', 'none')}.{aa_text}", ""]
    if not flat:
        lines += [f"AT bases ({len(reports)}; RiFT Table 2's question: does RiFT help on each AT model?): "
                  + "; ".join(f"**{r['base'].name}** {describe(cfg, r['base'])}" for r in reports)
                  + ". Every Δ is within a base (against that base's AT model and rift).", ""]
    any_paper = False
    for rep in reports:
        base = rep["base"]
        paper = (PAPER_ROWS.get((cfg.data.dataset, cfg.model.arch), {})
                 if _paper_width(cfg) and (flat or (base.name == "pgd" and not base.checkpoint)) else {})
        any_paper = any_paper or bool(paper)
        if not flat:
            lines += [f"## Base {base.name}: {describe(cfg, base)}", ""]
        lines += _method_lines(rep["table"], paper, with_aa)
        verdict = rep["verdict"]
        ses = [100 * row[k]["se"] for row in rep["table"] for k, _ in METRICS if row.get(k)]
        lines += ["", f"**Noise.** {verdict} One test image is {100 / n_test:.2f} pp; the binomial standard error of "
                  f"an accuracy here is {min(ses):.2f}-{max(ses):.2f} pp, and each difference's standard error is "
                  f"printed with it (s.e.)."]
        lines += ["", "Pareto front (clean vs robust, validation split, all methods and alphas): "
                  + "; ".join(f"seed {s}: " + ", ".join(f"{r['method']}@{r['alpha']:g}" for r in rep["front"][s])
                              for s in seeds), ""]
    lines += ["![pareto](pareto.png)", ""]
    if not any_paper:
        lines.append("The paper has no row for this configuration (its numbers are for full-width models on the full "
                     "data sets; see configs/cifar10_resnet18.yaml).")
    else:
        lines.append("Paper: Table 1 (AT, RiFT) and Table 3 (all layers), CIFAR-10 ResNet-18, mean of 3 seeds; "
                     "Table 4's top-k numbers are not on hand.")
    if not flat:
        lines.append("The paper's Table 2 numbers (RiFT on TRADES, MART, AWP, SCORE) are not on hand (not in "
                     "shared/RIFT.md), so the TRADES / MART / imported bases have no paper column.")
    return "\n".join(lines) + "\n"


def _method_lines(table: list[dict], paper: dict, with_aa: bool) -> list[str]:
    """The method table of one base (markdown lines)."""
    head = ["method", "trains", "alpha*", "clean", "robust"] + (["AutoAttack"] if with_aa else []) + [
        "corruption", "Δ clean vs AT", "Δ robust vs AT", "Δ corruption vs AT", "Δ clean vs rift", "Δ robust vs rift",
        "Δ corruption vs rift", "paper (clean / OOD / robust)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        m = row["method"]
        trains = ("-" if m == AT else "every parameter" if row["modules"] is None else ", ".join(row["modules"]))
        if m == "logit-mix":
            trains = "nothing (mixes AT and all-layers logits)"
        cells = [m, trains, ", ".join(f"{a:g}" for a in row["alpha"])]
        cells += [_acc_cell(row["clean"]), _acc_cell(row["robust"])]
        if with_aa:
            cells.append(_acc_cell(row.get("autoattack")))
        cells.append(_acc_cell(row["corruption"]))
        cells += [_delta_cell(row.get(f"delta_{ref}_{k}")) for ref in (AT, "rift") for k, _ in METRICS]
        p = paper.get(m)
        cells.append(" / ".join(f"{x:.2f}" for x in p) if p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paper_width(cfg: RunConfig) -> bool:
    return (cfg.model.arch.startswith("resnet") and cfg.model.width == 64) or (
        cfg.model.arch.startswith("wrn") and cfg.model.widen_factor == 10)


def plot_pareto(path: Path, results: dict[str, dict[int, dict]], methods: list[str]) -> dict:
    """``pareto.png``: clean vs robust accuracy on the validation split (mean over seeds), one panel per AT base
    ({base: {seed: run_seed's result}}), one curve per method over its alphas (alpha marked at the end, every
    seed's alpha* starred), AT as a black point, the Pareto front dashed.  Returns the first panel's texts
    (:func:`rift_dist.plotting.save_figure`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rift_dist.plotting import save_figure

    bases = list(results)
    fig, axes = plt.subplots(1, len(bases), figsize=(7.2 * len(bases), 5.4), squeeze=False)
    for ax, base in zip(axes[0], bases):
        _pareto_panel(ax, results[base], methods, "" if len(bases) == 1 else f"base {base}: ")
    fig.tight_layout()
    return save_figure(fig, axes[0][0], path)


def _pareto_panel(ax, results: dict[int, dict], methods: list[str], title: str) -> None:
    seeds = sorted(results)
    pts_all = []
    at = [(100 * statistics.fmean(results[s]["at"]["val"][k] for s in seeds)) for k in ("clean", "robust")]
    for method in methods:
        sweep = results[seeds[0]]["methods"][method]["sweep"]
        xs = [100 * statistics.fmean(results[s]["methods"][method]["sweep"][i]["clean_accuracy"] for s in seeds)
              for i in range(len(sweep))]
        ys = [100 * statistics.fmean(results[s]["methods"][method]["sweep"][i]["robust_accuracy"] for s in seeds)
              for i in range(len(sweep))]
        line, = ax.plot(xs, ys, "o-", ms=3, lw=1.2, label=method)
        ax.annotate(f"α={sweep[-1]['alpha']:g}", (xs[-1], ys[-1]), fontsize=7, color=line.get_color(),
                    xytext=(3, 3), textcoords="offset points")
        for star in sorted({results[s]["methods"][method]["alpha"] for s in seeds}):  # each seed's alpha*
            i = [r["alpha"] for r in sweep].index(star)
            ax.plot([xs[i]], [ys[i]], "*", ms=12, color=line.get_color(), mec="k", mew=0.5)
        pts_all += list(zip(xs, ys))
    front = sorted(p for p, on in zip(pts_all, pareto_front(pts_all)) if on)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, alpha=0.6, label="Pareto front")
    ax.plot([at[0]], [at[1]], "ko", ms=8, label="AT model (α=0)")
    ax.set_xlabel("clean accuracy (%)", fontsize=10)
    ax.set_ylabel("robust accuracy (%, PGD)", fontsize=10)
    n = results[seeds[0]]["at"]["val"]["n"]
    ax.set_title(f"{title}Clean vs robust on the validation split (n = {n}, mean of {len(seeds)} seed(s)); "
                 f"★ = a seed's alpha*", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
