"""Stage 5 — evaluation of the AT model and the RiFT model (RiFT §5.1; RIFT.md Stages 5).

Clean accuracy; PGD robust accuracy (PGD-10, 8/255, step 2/255, random start,
worst case per sample over ``eval.restarts`` restarts); corruption accuracy
(mean over the configured corruptions and severities of a CIFAR-10-C style
set — the official release when ``data.corruption_root`` holds it, else a
re-generation built by ``rift data corrupt`` and labelled as such).  All on the
test split, once, at the end.  Writes ``summary.json`` and prints the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rift_dist.stages.common import (
    StageContext, StageError, at_state, evaluate_model, fmt_pct, load_state, new_model, write_done, write_json,
)

STAGE = "evaluate"


def corruption_sets(ctx: StageContext):
    """The corruption sets to evaluate as [(corruption, severity, ArrayDataset)] plus a description dict.

    Uses ``data.corruption_root`` when it holds a set; otherwise, with ``data.corruption_generate``,
    builds a re-generated CIFAR-10-C style set from the test split into the cache. Returns ([], None)
    when neither is configured.
    """
    from rift_dist.data.corruptions import CIFAR_CORRUPTIONS, generate_corruption_set, load_corruption_set
    from rift_dist.data.loaders import get_dataset

    d = ctx.cfg.data
    names = list(d.corruptions) or list(CIFAR_CORRUPTIONS)
    root = Path(d.corruption_root).expanduser() if d.corruption_root else None
    if root is None and not d.corruption_generate:
        return [], None
    if root is None or (d.corruption_generate and not any(root.glob("*.npy")) and not (root / "labels.npy").exists()
                        and d.dataset != "tiny-imagenet"):
        test = get_dataset(ctx.cfg, "test")
        root = root or Path(d.cache_dir).expanduser() / "corruptions" / f"{d.dataset}-test{len(test)}-seed{ctx.cfg.seed}"
        if ctx.is_main and not (root / "labels.npy").exists():
            ctx.log(f"[evaluate] generating a CIFAR-10-C style corruption set from the test split into {root} "
                    f"(a re-generation, not the official release)")
            generate_corruption_set(test, root, names, d.severities, seed=ctx.cfg.seed, progress=ctx.progress)
        ctx.runtime.barrier()
    sets = load_corruption_set(root, d.dataset, names, list(d.severities), d.corruption_subset)
    meta_path = root / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    info = {"root": str(root), "regenerated": bool(meta.get("regenerated", False)),
            "corruptions": names, "severities": list(d.severities),
            "label": "re-generated CIFAR-10-C style set (not the official release)" if meta.get("regenerated")
            else "official corruption set"}
    return sets, info


def evaluate_corruptions(ctx: StageContext, model, sets) -> dict:
    """Clean accuracy on every (corruption, severity); mean as the headline plus per-corruption/severity tables."""
    table = {}
    for name, severity, ds in sets:
        table[f"{name}/{severity}"] = evaluate_model(ctx, model, ds, None, desc=f"{name}-{severity}")["clean_accuracy"]
    per_c: dict[str, list[float]] = {}
    per_s: dict[str, list[float]] = {}
    for key, acc in table.items():
        c, s = key.split("/")
        per_c.setdefault(c, []).append(acc)
        per_s.setdefault(s, []).append(acc)
    mean = sum(table.values()) / max(len(table), 1)
    return {"corruption_accuracy": mean,
            "per_corruption": {c: sum(v) / len(v) for c, v in per_c.items()},
            "per_severity": {s: sum(v) / len(v) for s, v in per_s.items()},
            "per_set": table}


def evaluate_one(ctx: StageContext, state: dict, test, sets, label: str) -> dict:
    """Clean, PGD (worst of restarts), optional AutoAttack and corruption accuracy of one state dict."""
    cfg = ctx.cfg
    model = new_model(ctx, state)
    t0 = time.time()
    res = evaluate_model(ctx, model, test, cfg.eval.attack, cfg.eval.restarts, seed=cfg.seed + 41, desc=f"{label} PGD")
    out = {"clean_accuracy": res["clean_accuracy"], "robust_accuracy": res["robust_accuracy"],
           "num_examples": res["num_examples"]}
    if cfg.eval.autoattack:
        from rift_dist.robustness import autoattack_accuracy

        out["autoattack_accuracy"] = autoattack_accuracy(ctx, model, test, label)["robust_accuracy"]
    if sets:
        c = evaluate_corruptions(ctx, model, sets)
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
    """Evaluate the AT and RiFT models on the test split; write ``summary.json`` and print the table."""
    cfg = ctx.cfg
    theta_at = at_state(ctx)
    theta_rift = load_state(ctx.run_dir / "interpolate" / "model.pt", "the RiFT (interpolated) model")
    alpha_info = json.loads((ctx.run_dir / "interpolate" / "alpha.json").read_text())
    ft_done = json.loads((ctx.run_dir / "finetune" / "done.json").read_text())["outputs"]
    test = test_dataset(ctx)
    sets, cinfo = corruption_sets(ctx)
    with ctx.tracker.stage("evaluation") as run_log:
        at = evaluate_one(ctx, theta_at, test, sets, "AT")
        rift = evaluate_one(ctx, theta_rift, test, sets, "RiFT")
        summary = {
            "at": at, "rift": rift, "modules": ft_done["modules"], "alpha": alpha_info["alpha"],
            "selection_split": cfg.selection_split, "test_examples": len(test),
            "pgd": {"epsilon": cfg.eval.attack.epsilon, "step_size": cfg.eval.attack.step_size,
                    "num_steps": cfg.eval.attack.num_steps, "restarts": cfg.eval.restarts},
            "corruption_set": cinfo, "precision": ctx.precision.describe(),
        }
        if ctx.is_main:
            write_json(ctx.run_dir / "summary.json", summary)
            (ctx.run_dir / "summary.md").write_text(summary_markdown(summary))
            for key in ("clean_accuracy", "robust_accuracy", "corruption_accuracy", "autoattack_accuracy"):
                for model in ("at", "rift"):
                    if key in summary[model]:
                        run_log.log_metrics({f"{model}.{key}": summary[model][key]})
            run_log.log_artifact(ctx.run_dir / "summary.json")
            run_log.log_artifact(ctx.run_dir / "summary.md")
            ctx.tracker.parent.log_metrics({f"{m}.{k}": summary[m][k] for m in ("at", "rift")
                                            for k in ("clean_accuracy", "robust_accuracy", "corruption_accuracy")
                                            if k in summary[m]})
            ctx.tracker.parent.log_artifact(ctx.run_dir / "summary.md")
    outputs = {"summary": str(ctx.run_dir / "summary.json")}
    write_done(ctx, STAGE, outputs)
    ctx.runtime.barrier()
    return outputs


def summary_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(metric, AT, RiFT, delta) rows of the final table, accuracies in %."""
    rows = []
    names = [("clean_accuracy", "clean accuracy"), ("robust_accuracy", "robust accuracy (PGD-{n}, worst of {r})"),
             ("autoattack_accuracy", "AutoAttack accuracy"), ("corruption_accuracy", "corruption accuracy")]
    for key, label in names:
        if key not in summary["at"]:
            continue
        a, b = summary["at"][key], summary["rift"][key]
        label = label.format(n=summary["pgd"]["num_steps"], r=summary["pgd"]["restarts"])
        rows.append((label, fmt_pct(a), fmt_pct(b), f"{100 * (b - a):+.2f}"))
    return rows


def summary_markdown(summary: dict) -> str:
    """The AT-vs-RiFT table as Markdown, with the chosen module(s), alpha and the corruption-set label."""
    lines = ["| metric | AT | RiFT | delta |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(summary)]
    lines.append("")
    lines.append(f"Fine-tuned module(s): {', '.join(summary['modules'])}; alpha* = {summary['alpha']:g} "
                 f"(chosen on the {summary['selection_split']} split); {summary['test_examples']} test images.")
    if summary.get("corruption_set"):
        lines.append(f"Corruptions: {summary['corruption_set']['label']}.")
    return "\n".join(lines) + "\n"


def print_summary(summary: dict) -> None:
    """Print the AT-vs-RiFT table to the terminal (rich)."""
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
