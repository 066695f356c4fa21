"""Stage 4 — weight interpolation and the choice of alpha* (RiFT §3.3, Eq. 9; §4).

theta(alpha) = (1 - alpha) theta_AT + alpha theta_FT over every floating-point
state-dict entry (BatchNorm running statistics included); integer buffers such
as ``num_batches_tracked`` are copied, not blended.  alpha* is the alpha with
the best clean accuracy among those whose robust accuracy is at most
``interpolation.tolerance`` (0.1 percentage points) below the AT model's, all
measured on the selection split (validation by default; ``selection_split:
test`` reproduces the authors' test-set selection).

Artefacts: ``interpolation.csv`` (alpha, clean_accuracy, robust_accuracy),
``interpolate/interpolation.png``, ``interpolate/model.pt`` (theta(alpha*)).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from rift_dist.plotting import save_figure
from rift_dist import checkpoint, interrupts
from rift_dist.atomic import atomic_write_text
from rift_dist.distributed import stream_seed
from rift_dist.config import AttackConfig
from rift_dist.stages.common import (
    StageContext, at_state, evaluate_model, load_state, new_model, write_done, write_json,
)

STAGE = "interpolate"


def interpolate_state_dicts(theta_at: dict, theta_ft: dict, alpha: float) -> dict:
    """(1 - alpha) * theta_at + alpha * theta_ft for floating-point entries (RiFT Eq. 9).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are not blended: they come from theta_at at
    alpha 0 and from theta_ft otherwise, so alpha 0 is the AT state exactly and alpha 1 the FT state.

    Args:
        theta_at, theta_ft: state dicts with the same keys and shapes.
        alpha: interpolation factor in [0, 1].

    Returns:
        A new state dict (float entries keep their dtype). alpha 0 / 1 reproduce the inputs exactly.

    Raises:
        ValueError: when the keys or shapes differ (names them), or alpha is outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if theta_at.keys() != theta_ft.keys():
        diff = sorted(set(theta_at) ^ set(theta_ft))
        raise ValueError(f"state dicts differ in keys: {diff[:10]}")
    out = {}
    for k, a in theta_at.items():
        b = theta_ft[k]
        if a.shape != b.shape:
            raise ValueError(f"state dicts differ in shape at {k}: {tuple(a.shape)} vs {tuple(b.shape)}")
        if torch.is_floating_point(a):
            if alpha == 0.0:
                out[k] = a.clone()
            elif alpha == 1.0:
                out[k] = b.clone()
            else:
                out[k] = ((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
        else:
            out[k] = (a if alpha == 0.0 else b).clone()  # integer buffers: copied from an endpoint, not blended
    return out


def choose_alpha(rows: list[dict], at_robust_accuracy: float, tolerance: float = 0.001) -> dict:
    """The paper's rule: best clean accuracy among alphas with robust accuracy >= AT's - tolerance.

    Args:
        rows: [{"alpha", "clean_accuracy", "robust_accuracy"}], accuracies as fractions.
        at_robust_accuracy: the AT model's robust accuracy on the same split.
        tolerance: allowed drop (0.001 = 0.1 percentage points).

    Ties on clean accuracy go to the higher robust accuracy, then the smaller alpha.
    Returns the chosen row (alpha 0, the AT model itself, always qualifies when present).

    Raises:
        ValueError: when no row qualifies.
    """
    ok = [r for r in rows if r["robust_accuracy"] >= at_robust_accuracy - tolerance - 1e-12]
    if not ok:
        raise ValueError("no alpha keeps robust accuracy within the tolerance of the AT model (include alpha 0)")
    return max(ok, key=lambda r: (r["clean_accuracy"], r["robust_accuracy"], -r["alpha"]))


def plot_curve(path: Path, rows: list[dict], chosen: float, at_robust: float | None = None, tolerance: float = 0.001,
               split: str = "", n: int = 0, attack: str = "PGD") -> dict:
    """Clean and robust accuracy against alpha (RiFT Eq. 9), alpha* and the rule that chose it drawn.

    Args:
        path: PNG to write.
        rows: [{"alpha", "clean_accuracy", "robust_accuracy"}] (fractions).
        chosen: alpha*.
        at_robust: the AT model's robust accuracy on the same split; with it, the selection line
            "robust >= AT robust - tolerance" (RiFT §4) is drawn.
        tolerance: the rule's slack (fraction; 0.001 = 0.1 pp).
        split, n: the split and its number of images (title; binomial error bars +-1 standard error
            sqrt(p (1 - p) / n) when n > 0).
        attack: the exact attack of the robust curve (e.g. "PGD-10, worst of 1").

    Returns:
        the texts drawn: {"title", "xlabel", "ylabel", "legend": [labels], "caption"} (for tests).
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["alpha"])
    a = [r["alpha"] for r in rows]

    def se(key):
        return [100 * math.sqrt(max(r[key] * (1 - r[key]), 0.0) / n) if n else 0.0 for r in rows]

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.errorbar(a, [100 * r["clean_accuracy"] for r in rows], yerr=se("clean_accuracy"), fmt="o-", capsize=3,
                label="clean accuracy")
    ax.errorbar(a, [100 * r["robust_accuracy"] for r in rows], yerr=se("robust_accuracy"), fmt="s-", capsize=3,
                label=f"robust accuracy ({attack})")
    if at_robust is not None:
        ax.axhline(100 * (at_robust - tolerance), color="tab:red", ls=":",
                   label=f"rule: robust >= AT robust - {100 * tolerance:g} pp")
    ax.axvline(chosen, color="grey", ls="--", label=f"alpha* = {chosen:g}")
    ax.set_xlabel("interpolation factor alpha (0 = AT model, 1 = fine-tuned)", fontsize=10)
    ax.set_ylabel("accuracy (%)", fontsize=10)
    where = f"{split} split" + (f", n = {n} images" if n else "")
    ax.set_title(f"Interpolation sweep on the {where}" + (" (error bars: +-1 s.e.)" if n else ""), fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, ax, path)


def selection_attack(cfg) -> AttackConfig:
    """The PGD attack of the alpha sweep on the selection split (``eval.selection_attack_steps``)."""
    a = cfg.eval.attack
    return AttackConfig(a.epsilon, a.step_size, cfg.eval.selection_attack_steps, a.random_start)


def evaluate_alpha(ctx: StageContext, theta_at: dict, theta_ft: dict, alpha: float, selection) -> dict:
    """Clean and robust accuracy of theta(alpha) on the selection split: {"alpha", "clean_accuracy", "robust_accuracy"}."""
    model = new_model(ctx, interpolate_state_dicts(theta_at, theta_ft, alpha))
    ev = evaluate_model(ctx, model, selection, selection_attack(ctx.cfg), ctx.cfg.eval.selection_restarts,
                        seed=stream_seed(ctx.cfg.seed, "interpolation-sweep"), desc=f"alpha {alpha:g}")
    return {"alpha": alpha, "clean_accuracy": ev["clean_accuracy"], "robust_accuracy": ev["robust_accuracy"]}


def log_alpha(ctx: StageContext, stage_run, alpha: float, row: dict, part: Path | None = None,
              key: str | None = None, tags: dict | None = None, curve: bool = True) -> None:
    """Log one alpha's result: its own child run (``alpha=<a>``, param alpha) and a point of the stage's curve.

    The curve is logged on the interpolation run at step = the alpha's index in
    ``interpolation.alphas``, with the metric ``alpha`` at the same step, so MLflow can chart accuracy
    against alpha (x axis: the ``alpha`` metric) rather than against alpha x 100.  Called after the
    result file ``part`` is written; then ``part`` gets a ``.logged`` marker, so a kill between the two
    is replayed from the file on resume instead of losing the metrics.
    """
    key = key or f"alpha={alpha:g}"
    metrics = {"clean_accuracy": row["clean_accuracy"], "robust_accuracy": row["robust_accuracy"]}
    with ctx.tracker.stage(key, key=key, params={"alpha": alpha}, parent=stage_run) as r:
        if tags:
            r.set_tags(tags)
        r.log_metrics(metrics)
    if curve:
        alphas = list(ctx.cfg.interpolation.alphas)
        step = alphas.index(alpha) if alpha in alphas else len(alphas)
        stage_run.log_metrics({**metrics, "alpha": alpha}, step=step)
    if part is not None:
        part.with_suffix(".logged").touch()


def run(ctx: StageContext) -> dict:
    """Sweep alpha on the selection split, choose alpha*, save theta(alpha*) as the RiFT model."""
    from rift_dist.data.loaders import get_dataset

    cfg = ctx.cfg
    theta_at = at_state(ctx)
    theta_ft = load_state(ctx.run_dir / "finetune" / "model.pt", "the fine-tuned model")
    selection = get_dataset(cfg, "selection")
    done_dir = ctx.run_dir / STAGE / "alphas"
    rows = []
    with ctx.tracker.stage("interpolation") as parent:
        for alpha in cfg.interpolation.alphas:
            part = done_dir / f"alpha-{alpha:.4f}.json"
            if part.is_file():
                row = json.loads(part.read_text())
                rows.append(row)
                if ctx.is_main and not part.with_suffix(".logged").is_file():
                    log_alpha(ctx, parent, alpha, row, part)
                continue
            row = evaluate_alpha(ctx, theta_at, theta_ft, alpha, selection)
            rows.append(row)
            if ctx.is_main:
                write_json(part, row)
                log_alpha(ctx, parent, alpha, row, part)
            ctx.log(f"[interpolate] alpha {alpha:.2f}: clean {100 * row['clean_accuracy']:.2f}% "
                    f"robust {100 * row['robust_accuracy']:.2f}%")
            interrupts.check(ctx.runtime, where=f"interpolation alpha {alpha:g} (its result is saved)")
        at_row = next((r for r in rows if r["alpha"] == 0.0), None)
        if at_row is None:
            at_row = evaluate_alpha(ctx, theta_at, theta_ft, 0.0, selection)
        best = choose_alpha(rows + ([at_row] if at_row not in rows else []), at_row["robust_accuracy"],
                            cfg.interpolation.tolerance)
        if ctx.is_main:
            path = ctx.run_dir / "interpolation.csv"
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=("alpha", "clean_accuracy", "robust_accuracy"))
            w.writeheader()
            for r in sorted(rows, key=lambda r: r["alpha"]):
                w.writerow(r)
            atomic_write_text(path, buf.getvalue())  # a kill mid-write never leaves half a table
            sel = selection_attack(cfg)
            attack = f"PGD-{sel.num_steps}" + (f", worst of {cfg.eval.selection_restarts} restarts"
                                               if cfg.eval.selection_restarts > 1 else "")
            plot_curve(ctx.run_dir / STAGE / "interpolation.png", rows, best["alpha"], at_row["robust_accuracy"],
                       cfg.interpolation.tolerance, cfg.selection_split, len(selection), attack)
            checkpoint.save_atomic(interpolate_state_dicts(theta_at, theta_ft, best["alpha"]),
                                   ctx.run_dir / STAGE / "model.pt")
            write_json(ctx.run_dir / STAGE / "alpha.json", {"alpha": best["alpha"], "row": best, "at": at_row,
                                                            "split": cfg.selection_split})
            parent.log_metrics({"alpha_star": best["alpha"]})
            parent.log_artifact(path)
            parent.log_artifact(ctx.run_dir / STAGE / "interpolation.png")
    ctx.log(f"[interpolate] alpha* = {best['alpha']:g} on the {cfg.selection_split} split "
            f"(clean {100 * best['clean_accuracy']:.2f}%, robust {100 * best['robust_accuracy']:.2f}%; "
            f"AT robust {100 * at_row['robust_accuracy']:.2f}%)")
    outputs = {"alpha": best["alpha"], "model": str(ctx.run_dir / STAGE / "model.pt")}
    write_done(ctx, STAGE, outputs)
    ctx.runtime.barrier()
    return outputs
