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
import os
import shutil
from pathlib import Path

import torch

from rift_dist.plotting import save_figure
from rift_dist import checkpoint, interrupts
from rift_dist.atomic import atomic_write_text, read_json, read_json_piece, write_json
from rift_dist.seeding import stream_seed
from rift_dist.config import AttackConfig
from rift_dist.eval.protocol import evaluate_model
from rift_dist.layout import RunLayout
from rift_dist.stages import StageError
from rift_dist.stages.context import StageContext, at_state, load_state, new_model
from rift_dist.stages.done_markers import write_done

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


def log_result(ctx: StageContext, alpha: float, row: dict, candidate: str | None = None) -> None:
    """The progress line of one alpha's result."""
    ctx.log(f"[interpolate] {'candidate ' + candidate + ' ' if candidate else ''}alpha {alpha:.2f}: "
            f"clean {100 * row['clean_accuracy']:.2f}% robust {100 * row['robust_accuracy']:.2f}%")


def run(ctx: StageContext) -> dict:
    """Sweep alpha on the selection split, choose alpha*, save theta(alpha*) as the RiFT model."""
    from rift_dist.data.loaders import get_dataset

    cfg = ctx.cfg
    theta_at = at_state(ctx)
    theta_ft = load_state(ctx.layout.finetuned_model(), "the fine-tuned model")
    selection = get_dataset(cfg, "selection")
    rows = []
    with ctx.tracker.stage("interpolation") as parent:
        for alpha in cfg.interpolation.alphas:
            part = ctx.layout.alpha_result(alpha)
            row = read_json_piece(part)
            if row is not None:
                rows.append(row)
                if ctx.is_main and not part.with_suffix(".logged").is_file():
                    log_alpha(ctx, parent, alpha, row, part)
                continue
            row = evaluate_alpha(ctx, theta_at, theta_ft, alpha, selection)
            rows.append(row)
            if ctx.is_main:
                write_json(part, row)
                log_alpha(ctx, parent, alpha, row, part)
            log_result(ctx, alpha, row)
            interrupts.check(ctx.runtime, where=f"interpolation alpha {alpha:g} (its result is saved)")
        at_row = next((r for r in rows if r["alpha"] == 0.0), None)
        if at_row is None:
            at_row = evaluate_alpha(ctx, theta_at, theta_ft, 0.0, selection)
        best = choose_alpha(rows + ([at_row] if at_row not in rows else []), at_row["robust_accuracy"],
                            cfg.interpolation.tolerance)
        if ctx.is_main:
            path = ctx.layout.interpolation_table
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=("alpha", "clean_accuracy", "robust_accuracy"))
            w.writeheader()
            for r in sorted(rows, key=lambda r: r["alpha"]):
                w.writerow(r)
            atomic_write_text(path, buf.getvalue())  # a kill mid-write never leaves half a table
            sel = selection_attack(cfg)
            attack = f"PGD-{sel.num_steps}" + (f", worst of {cfg.eval.selection_restarts} restarts"
                                               if cfg.eval.selection_restarts > 1 else "")
            plot_curve(ctx.layout.interpolation_plot, rows, best["alpha"], at_row["robust_accuracy"],
                       cfg.interpolation.tolerance, cfg.selection_split, len(selection), attack)
            checkpoint.save_atomic(interpolate_state_dicts(theta_at, theta_ft, best["alpha"]),
                                   ctx.layout.model(STAGE))
            write_json(ctx.layout.alpha_choice, {"alpha": best["alpha"], "row": best, "at": at_row,
                                                 "split": cfg.selection_split})
            parent.log_metrics({"alpha_star": best["alpha"]})
            parent.log_artifact(path)
            parent.log_artifact(ctx.layout.interpolation_plot)
    ctx.log(f"[interpolate] alpha* = {best['alpha']:g} on the {cfg.selection_split} split "
            f"(clean {100 * best['clean_accuracy']:.2f}%, robust {100 * best['robust_accuracy']:.2f}%; "
            f"AT robust {100 * at_row['robust_accuracy']:.2f}%)")
    outputs = {"alpha": best["alpha"], "model": str(ctx.layout.model(STAGE))}
    write_done(ctx, STAGE, outputs)
    ctx.runtime.barrier()
    return outputs


# ------------------------------------------------------------------------------ SLURM array shards
# The sweep as an array (the stage table's ``shards``): task i evaluates a contiguous run of alphas
# (x fine-tuning candidate) and writes this stage's own per-alpha files; the gather job picks alpha*
# (and the candidate) by running :func:`run`, which reads them back without re-evaluating.


def missing_alphas(run_dir: str | Path, alphas: list[float], candidate: str | None = None) -> list[float]:
    """The alphas of ``alphas`` without a result file yet."""
    return [a for a in alphas if not RunLayout(run_dir).alpha_result(a, candidate).is_file()]


def results_on_disk(run_dir: str | Path) -> str:
    """``"N alpha result(s)"`` for the per-alpha results on disk ("" when there are none)."""
    folder = RunLayout(run_dir).stage_dir(STAGE)
    n = len(list(folder.rglob(RunLayout.ALPHA_GLOB))) if folder.is_dir() else 0
    return f"{n} alpha result(s)" if n else ""


def interpolate_alphas(ctx: StageContext, alphas: list[float], candidate: str | None = None,
                       stage_run=None, run_tags: dict | None = None, candidate_index: int | None = None) -> list[dict]:
    """Evaluate theta(alpha) = (1 - alpha) theta_AT + alpha theta_FT on the selection split for ``alphas``.

    Exactly what :func:`run` computes per alpha (:func:`evaluate_alpha`), sharded over this job's ranks;
    results go to :meth:`~rift_dist.layout.RunLayout.alpha_result` and alphas already there are skipped (a
    requeued task resumes).
    With an MLflow ``stage_run`` (the ``interpolation`` run), each alpha is logged by :func:`log_alpha`
    to its child run ``alpha=<a>`` (``alpha=<a>@candidate-<j>`` for candidates) and to the stage run's
    curve, as ``rift run`` does.  Returns the rows (alpha, clean_accuracy, robust_accuracy).

    Raises:
        StageError: a missing AT or fine-tuned model.
    """
    from rift_dist.data.loaders import get_dataset

    todo = missing_alphas(ctx.run_dir, alphas, candidate)
    rows = []
    if todo:
        theta_at = at_state(ctx)
        if all(a == 0.0 for a in todo) and not ctx.layout.finetuned_model(candidate).is_file():
            theta_ft = theta_at  # theta(0) is the AT model (shared by all candidates; none is chosen yet)
        else:
            theta_ft = load_state(ctx.layout.finetuned_model(candidate), "the fine-tuned model"
                                  + (f" of candidate {candidate}" if candidate else ""))
        selection = get_dataset(ctx.cfg, "selection")
    for alpha in alphas:
        path = ctx.layout.alpha_result(alpha, candidate)
        row = read_json_piece(path)
        if row is not None:
            rows.append(row)
            continue
        row = evaluate_alpha(ctx, theta_at, theta_ft, alpha, selection)
        if candidate is not None and alpha != 0.0:
            row["candidate"] = candidate
        rows.append(row)
        if ctx.is_main:
            write_json(path, row)
            if stage_run is not None:
                log_alpha(ctx, stage_run, alpha, row, path, key=alpha_run_key(alpha, candidate_index if candidate else None),
                          tags={**(run_tags or {}), **({"rift.candidate": candidate} if candidate else {})},
                          curve=candidate is None)
        log_result(ctx, alpha, row, candidate)
    ctx.runtime.barrier()
    return rows


def alpha_run_key(alpha: float, candidate_index: int | None = None) -> str:
    """The MLflow child run (and key file) of one alpha: ``alpha=<a>``, or ``alpha=<a>@candidate-<j>``."""
    return f"alpha={alpha:g}" if candidate_index is None or alpha == 0.0 else f"alpha={alpha:g}@candidate-{candidate_index}"


def choose_candidate(per_candidate: dict[str, list[dict]], at_row: dict, tolerance: float) -> tuple[str, dict]:
    """The (candidate, row) the paper's alpha rule picks over every (candidate, alpha) pair.

    Args:
        per_candidate: {module: rows (alpha, clean_accuracy, robust_accuracy)} in candidate order
            (lowest MRC first); at_row: the AT model's row (alpha 0); tolerance: allowed robust drop.

    The best clean accuracy on the selection split among the pairs whose robust accuracy is at most
    ``tolerance`` below the AT model's (:func:`choose_alpha`); ties go to the higher robust accuracy,
    then the smaller alpha, then the earlier (lower-MRC) candidate.

    Raises:
        ValueError: no candidates.
    """
    if not per_candidate:
        raise ValueError("no fine-tuning candidates to choose from")
    best = None
    for index, (module, rows) in enumerate(per_candidate.items()):
        pool = rows + ([at_row] if not any(r["alpha"] == 0.0 for r in rows) else [])
        row = choose_alpha(pool, at_row["robust_accuracy"], tolerance)
        key = (row["clean_accuracy"], row["robust_accuracy"], -row["alpha"], -index)
        if best is None or key > best[0]:
            best = (key, module, row)
    return best[1], best[2]


def gather_interpolation(ctx: StageContext, candidates: int = 1) -> dict:
    """Choose alpha* from the per-alpha files (and, with candidates, the candidate) and finish the stage.

    Without candidates: checks every alpha has its file, then runs :func:`run`, which reads them back
    (nothing is re-evaluated) and writes ``interpolation.csv``, the plot, ``interpolate/model.pt`` and
    ``interpolate/alpha.json``.  With candidates: picks the candidate (:func:`choose_candidate`), makes
    its fine-tuned model the run's ``finetune/model.pt`` (fine-tune stage marked done with that module),
    copies its rows to the stage's per-alpha files, writes ``interpolate/candidates.json`` and runs the
    stage as above.

    Raises:
        StageError: when result files are missing (names the alphas / candidates to re-submit).
    """
    from rift_dist.stages.finetune import read_candidates

    cfg = ctx.cfg
    alphas = list(cfg.interpolation.alphas)
    if ctx.runtime.world_size > 1:
        raise StageError("the interpolation gather runs on one process; submit it with one task")
    if candidates <= 1:
        missing = missing_alphas(ctx.run_dir, alphas)
        if missing:
            raise StageError(f"interpolation results missing for alpha {', '.join(f'{a:g}' for a in missing)} — their "
                             f"array task failed or has not run; re-submit it "
                             f"(rift submit {ctx.run_dir} --only interpolate:{missing[0]:g})")
        return run(ctx)
    modules = read_candidates(ctx.run_dir)
    at_path = ctx.layout.alpha_result(0.0)
    missing = [] if at_path.is_file() else ["alpha 0 (the AT model)"]
    for m in modules:
        missing += [f"{m} alpha {a:g}" for a in missing_alphas(ctx.run_dir, alphas, m)]
    if missing:
        raise StageError(f"interpolation results missing: {', '.join(missing)} — re-submit those array tasks "
                         f"(rift submit {ctx.run_dir})")
    at_row = read_json(at_path)
    per = {m: [read_json(ctx.layout.alpha_result(a, m)) for a in alphas] for m in modules}
    module, row = choose_candidate(per, at_row, cfg.interpolation.tolerance)
    ctx.log(f"[interpolate] candidate {module} chosen (alpha {row['alpha']:g}: clean {100 * row['clean_accuracy']:.2f}%, "
            f"robust {100 * row['robust_accuracy']:.2f}%; AT robust {100 * at_row['robust_accuracy']:.2f}%)")
    if ctx.is_main:
        sub = ctx.layout.candidate(module)
        done = read_json(sub.done_marker("finetune"))["outputs"]
        checkpoint.save_atomic(checkpoint.load(ctx.layout.finetuned_model(module)), ctx.layout.finetuned_model())
        if sub.history("finetune").is_file():
            shutil.copyfile(sub.history("finetune"), ctx.layout.history("finetune"))
        write_done(ctx, "finetune", {"model": str(ctx.layout.finetuned_model()), "modules": [module],
                                     "best": done.get("best"), "candidates": modules,
                                     "candidate_dir": str(sub.root)})
        for a in alphas:
            if a != 0.0:
                write_json(ctx.layout.alpha_result(a), {k: v for k, v in per[module][alphas.index(a)].items()
                                                        if k != "candidate"})
        write_json(ctx.layout.interpolation_candidates,
                   {"chosen": module, "row": row, "at": at_row, "rows": per,
                    "rule": "best clean accuracy among (candidate, alpha) with robust accuracy >= AT - tolerance; "
                            "ties: robust accuracy, smaller alpha, lower MRC"})
    ctx.runtime.barrier()
    outputs = run(ctx)
    return {**outputs, "candidate": module}


def runs_as_array(cfg, options: dict, candidates: int) -> bool:
    """Whether ``rift submit`` makes the sweep an array (``stages.interpolate.mode: array``, the default; always
    with fine-tuning candidates)."""
    return not (options["mode"] == "job" and candidates <= 1)


def _split(items: list, n: int) -> list[list]:
    """``items`` cut into ``n`` contiguous, nearly equal runs (no empty run)."""
    n = max(1, min(n, len(items)))
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        out.append(items[start:stop])
        start = stop
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def _alpha_label(pairs: list, names: dict[int, str]) -> str:
    by: dict = {}
    for j, a in pairs:
        by.setdefault(j, []).append(a)
    parts = []
    for j, alphas in by.items():
        who = "" if j is None else f"candidate {j}{' (' + names[j] + ')' if j in names else ''}: "
        parts.append(who + "alpha=" + ",".join(f"{a:g}" for a in alphas))
    return "; ".join(parts)


def array_tasks(cfg, run_dir: Path, options: dict, candidates: int, wanted: list[str] | None):
    """The sweep's tasks not done yet: (candidate, alpha) pairs (alpha 0, the AT model, once for all
    candidates) cut into ``array_size`` contiguous runs (0 = one task per pair).  ``wanted`` (``--only
    interpolate:A,...``): alpha values or task indices; [] = every pair.  Each task lists the per-alpha
    MLflow runs ``rift submit`` creates ahead of time.  Returns (tasks, the gather's arguments)."""
    from rift_dist.stages.finetune import candidate_names

    alphas = list(cfg.interpolation.alphas)
    if candidates <= 1:
        pairs = [(None, a) for a in alphas]
    else:
        pairs = [(None, 0.0)] + [(j, a) for j in range(candidates) for a in alphas if a != 0.0]
    size = int(options["array_size"]) or len(pairs)
    known = candidate_names(cfg, run_dir, candidates)

    def pair_done(j, a) -> bool:
        if j is None:
            return RunLayout(run_dir).alpha_result(a).is_file()
        return j in known and RunLayout(run_dir).alpha_result(a, known[j]).is_file()

    tasks = []
    for i, group in enumerate(_split(pairs, size)):
        if wanted:
            todo = group if str(i) in wanted else [
                (j, a) for j, a in group if any(_is_number(w) and float(w) == a for w in wanted)]
        elif wanted is not None:
            todo = list(group)
        else:
            todo = [(j, a) for j, a in group if not pair_done(j, a)]
        if not todo:
            continue
        label = _alpha_label(todo, known)
        tasks.append({"index": i, "label": label, "names": [f"{a:g}" for _, a in todo], "what": f"sweep part {i}: {label}",
                      "args": {"pairs": [[j, a] for j, a in todo]},
                      "child_runs": [{"key": alpha_run_key(a, j), "params": {"alpha": a}} for j, a in todo]})
    return tasks, {"candidates": candidates}


def alphas_task(ctx: StageContext, args: dict, run) -> dict:
    """One array task: :func:`interpolate_alphas` for its (candidate, alpha) pairs, logged under the stage run
    ``rift submit`` created (never created here: concurrent tasks would each make one)."""
    from rift_dist.stages.finetune import read_candidates

    pairs = [(None if j is None else int(j), float(a)) for j, a in args["pairs"]]
    modules = read_candidates(ctx.run_dir) if any(j is not None for j, _ in pairs) else []
    stage_run = ctx.tracker.child("interpolation") if ctx.tracker.active and ctx.tracker.key_file(
        "interpolation").is_file() else None
    tags = {k: v for k, v in {"slurm.job_id": os.environ.get("SLURM_JOB_ID"),
                              "slurm.array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}.items() if v}
    rows = []
    by: dict = {}
    for j, a in pairs:
        by.setdefault(j, []).append(a)
    for j, alphas in by.items():
        if j is not None and j >= len(modules):
            ctx.log(f"[interpolate] candidate {j} does not exist (only {len(modules)}); skipped")
            continue
        rows += interpolate_alphas(ctx, alphas, None if j is None else modules[j], stage_run, tags, j)
    return {"rows": rows}


def alphas_task_done(run_dir: Path, args: dict) -> bool:
    """Whether every (candidate, alpha) pair of the task has its result file."""
    from rift_dist.stages.finetune import read_candidates

    modules = read_candidates(run_dir) if RunLayout(run_dir).candidates.is_file() else []
    for j, a in args.get("pairs", []):
        if j is not None and int(j) >= len(modules):
            return False
        if not RunLayout(run_dir).alpha_result(a, None if j is None else modules[int(j)]).is_file():
            return False
    return True


def gather_task(ctx: StageContext, args: dict, run) -> dict:
    """The gather job: :func:`gather_interpolation`."""
    return gather_interpolation(ctx, int(args.get("candidates", 1)))
