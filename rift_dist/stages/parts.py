"""Pieces of stages, for running one stage as many jobs (SLURM job arrays; see ``rift_dist.cluster``).

A whole stage (``rift_dist.stages.<stage>.run``) spreads its work over the ranks
of ONE process group.  On a cluster the MRC search and the interpolation sweep
are better spread over independent array tasks that start whenever a GPU is
free and fail (and are re-submitted) one by one.  These functions are those
pieces; each is resumable from the files it writes, and every piece reuses the
stage code, so an array run gives the same numbers as ``rift run``:

* MRC: :func:`prepare_mrc` makes the fixed adversarial set once
  (``mrc/adversarial_set.pt``); :func:`compute_mrc` computes the MRC of a group of
  modules (``mrc/modules/<name>.json``, the stage's own per-module files);
  :func:`gather_mrc` checks every module is there and lets the MRC stage gather
  them (``mrc.csv``, ``mrc/mrc.json``, the choice of module) without recomputing.
  Groups come from :func:`mrc_groups` (the stage's :func:`assign_modules`).
* Fine-tuning candidates (``finetune_candidates`` > 1 in a launch profile):
  :func:`gather_mrc` also records the k lowest-MRC modules (after ``mrc.exclude``)
  in ``finetune/candidates.json``; :func:`finetune_candidate` fine-tunes candidate
  j ALONE in ``finetune/candidates/<module>/`` (the stage's own code on a
  sub-run directory).
* Interpolation: :func:`interpolate_alphas` evaluates theta(alpha) for some
  alphas (``interpolate/alphas/alpha-X.json``, the stage's own per-alpha files;
  per candidate: ``interpolate/candidates/<module>/alpha-X.json``, alpha 0 — the
  AT model itself — once for all); :func:`gather_interpolation` picks alpha* with
  the stage's code.  With candidates it applies the paper's rule over every
  (candidate, alpha) pair: the best clean accuracy on the selection split among
  those whose robust accuracy is at most ``interpolation.tolerance`` below the
  AT model's (ties: higher robust accuracy, smaller alpha, lower MRC).  The
  chosen candidate's fine-tuned model becomes ``finetune/model.pt``; the others
  stay in their folders and are listed in ``interpolate/candidates.json``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from rift_dist import checkpoint
from rift_dist.config import RunConfig
from rift_dist.stages.common import (
    StageContext, StageError, at_state, load_state, new_model, write_done, write_json,
)


# ------------------------------------------------------------------------------------------ MRC


def mrc_module_names(cfg: RunConfig) -> list[str]:
    """The modules the MRC stage covers, in network order: ``mrc.modules`` or every Conv2d/Linear.

    Raises:
        StageError: when ``mrc.modules`` names an unknown module (lists the valid ones).
    """
    from rift_dist.models import build_model, module_names

    every = module_names(build_model(cfg))
    if not cfg.mrc.modules:
        return every
    unknown = [n for n in cfg.mrc.modules if n not in every]
    if unknown:
        raise StageError(f"mrc.modules names unknown module(s) {unknown}; valid modules: {', '.join(every)}")
    return [n for n in every if n in set(cfg.mrc.modules)]


def mrc_groups(cfg: RunConfig, num_tasks: int) -> list[list[str]]:
    """Split the MRC modules into at most ``num_tasks`` contiguous groups of balanced estimated cost.

    Uses the stage's :func:`~rift_dist.stages.criticality.assign_modules` with its cost model (the
    multiply-adds from the module's unit to the output) on a CPU copy of the model; empty groups
    (more tasks than modules) are dropped, so every returned group has at least one module.

    Raises:
        ValueError: ``num_tasks`` < 1.
    """
    from rift_dist.data.datasets import dataset_spec
    from rift_dist.models import build_model
    from rift_dist.stages.criticality import assign_modules, module_costs

    if num_tasks < 1:
        raise ValueError(f"the MRC array needs at least one task, got {num_tasks}")
    names = mrc_module_names(cfg)
    side = dataset_spec(cfg.data.dataset).image_size  # before any data is loaded
    costs = module_costs(build_model(cfg), names, (3, side, side))
    return [g for g in assign_modules(names, costs, min(num_tasks, len(names))) if g]


def module_file(run_dir: str | Path, name: str) -> Path:
    """The per-module MRC result file (written by the MRC stage's ``compute_modules``)."""
    return Path(run_dir) / "mrc" / "modules" / f"{name}.json"


def missing_modules(run_dir: str | Path, names: list[str]) -> list[str]:
    """The modules of ``names`` without an MRC result file yet."""
    return [n for n in names if not module_file(run_dir, n).is_file()]


def prepare_mrc(ctx: StageContext) -> dict:
    """Make (or reuse) the MRC stage's fixed adversarial set, sharded over this job's ranks.

    Returns {"adversarial_set": path, "num_examples": N}.

    Raises:
        StageError: when the adversarially trained model is missing.
    """
    from rift_dist.stages.criticality import build_adversarial_set

    model = new_model(ctx, at_state(ctx))
    model.eval()
    images, _ = build_adversarial_set(ctx, model)
    ctx.runtime.barrier()
    return {"adversarial_set": str(ctx.run_dir / "mrc" / "adversarial_set.pt"), "num_examples": len(images)}


def compute_mrc(ctx: StageContext, modules: list[str], run=None) -> list[dict]:
    """MRC of ``modules`` (one array task's group) on this process; per-module files as the stage writes them.

    Modules already done are read back, so a requeued task resumes with the ones left.  When ``run``
    (an MLflow handle) is given, the main process logs ``mrc.<module>``, ``robust_accuracy_drop.<module>``
    and ``seconds`` to it.  Returns the rows in the order of ``modules``.

    Raises:
        StageError: unknown module names, or a missing AT model.
    """
    import time

    from rift_dist.models import module_names
    from rift_dist.stages.criticality import build_adversarial_set, compute_modules

    t0 = time.time()
    model = new_model(ctx, at_state(ctx))
    model.eval()
    valid = module_names(model)
    unknown = [m for m in modules if m not in valid]
    if unknown:
        raise StageError(f"unknown module(s) {unknown}; valid modules: {', '.join(valid)}")
    images, labels = build_adversarial_set(ctx, model)
    todo = missing_modules(ctx.run_dir, modules)
    ctx.log(f"[mrc] task: {len(modules)} module(s) ({len(modules) - len(todo)} already done): {', '.join(modules)}")
    if ctx.runtime.world_size > 1:
        # every rank would compute the same modules; give each rank its share instead
        from rift_dist.stages.common import shard_bounds

        start, stop = shard_bounds(len(modules), ctx.runtime.rank, ctx.runtime.world_size)
        mine = modules[start:stop]
        rows_mine = compute_modules(ctx, model, images, labels, mine)
        rows = [r for part in ctx.runtime.all_gather_object(rows_mine) for r in part]
    else:
        rows = compute_modules(ctx, model, images, labels, modules)
    if run is not None and ctx.is_main:
        for r in rows:
            run.log_metrics({f"mrc.{r['module']}": r["mrc"], f"robust_accuracy_drop.{r['module']}": r["robust_accuracy_drop"]})
        run.log_metrics({"seconds": time.time() - t0, "modules": len(rows)})
    return rows


def gather_mrc(ctx: StageContext, candidates: int = 1, assignment: list[list[str]] | None = None) -> dict:
    """Gather the per-module MRC files into the MRC stage's table and choice (no module is recomputed).

    Runs the MRC stage on this process once every module has its file: it reads them back, writes
    ``mrc.csv``, ``mrc/mrc.json``, ``mrc/mrc.png``, logs to the ``mrc`` MLflow run and marks the
    stage done.  ``assignment`` (the array's groups) is added to ``mrc/mrc.json``.  With
    ``candidates`` > 1, also writes ``finetune/candidates.json``: the ``candidates`` lowest-MRC
    modules after ``mrc.exclude``, lowest first.

    Raises:
        StageError: when modules have no result file (names them: their array task failed or has not
            run; re-submit it), or ``candidates`` > 1 together with ``mrc.top_k`` > 1.
    """
    from rift_dist.stages import criticality

    if candidates > 1 and ctx.cfg.mrc.top_k > 1:
        raise StageError(f"finetune candidates ({candidates}) and mrc.top_k ({ctx.cfg.mrc.top_k}) cannot both be > 1: "
                         f"candidates are fine-tuned one module each; set one of them to 1")
    names = mrc_module_names(ctx.cfg)
    missing = missing_modules(ctx.run_dir, names)
    if missing:
        raise StageError(f"MRC results missing for {len(missing)} module(s): {', '.join(missing)} — their array task "
                         f"failed or has not run; re-submit it (rift submit {ctx.run_dir} --only mrc:{missing[0]})")
    if ctx.runtime.world_size > 1:
        raise StageError("the MRC gather runs on one process; submit it with one task")
    outputs = criticality.run(ctx)
    info_path = ctx.run_dir / "mrc" / "mrc.json"
    info = json.loads(info_path.read_text())
    if assignment is not None:
        info["array_assignment"] = assignment
        write_json(info_path, info)
    if candidates > 1:
        chosen = candidate_modules(ctx.cfg, ctx.run_dir, candidates, write=ctx.is_main)
        outputs = {**outputs, "candidates": chosen}
        ctx.log(f"[mrc] fine-tuning candidates (lowest MRC first): {', '.join(chosen)}")
    return outputs


# ------------------------------------------------------------------------------ fine-tuning candidates


def candidates_file(run_dir: str | Path) -> Path:
    """``finetune/candidates.json``: the candidate modules, lowest MRC first (written by :func:`gather_mrc`)."""
    return Path(run_dir) / "finetune" / "candidates.json"


def read_candidates(run_dir: str | Path) -> list[str]:
    """The candidate modules of a run, lowest MRC first.

    Raises:
        StageError: when ``finetune/candidates.json`` is missing (the MRC gather has not run).
    """
    path = candidates_file(run_dir)
    if not path.is_file():
        raise StageError(f"{path} is missing: the MRC gather writes it (with finetune candidates > 1); run it first")
    return list(json.loads(path.read_text())["candidates"])


def candidate_modules(cfg: RunConfig, run_dir: str | Path, k: int, write: bool = False) -> list[str]:
    """The k lowest-MRC modules after ``mrc.exclude`` (lowest first), from ``finetune/candidates.json`` when it
    was made for the same k, else from the MRC stage's ``mrc/mrc.json`` (and saved there when ``write``).

    Raises:
        StageError: when the MRC stage has not finished (``mrc/mrc.json`` missing).
    """
    from rift_dist.models import build_model, module_names
    from rift_dist.stages.criticality import choose_modules

    path = candidates_file(run_dir)
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("requested") == k:
            return list(data["candidates"])
    info = Path(run_dir) / "mrc" / "mrc.json"
    if not info.is_file():
        raise StageError(f"{info} is missing: the fine-tuning candidates come from the MRC stage; run it first")
    rows = json.loads(info.read_text())["rows"]
    chosen = choose_modules(rows, module_names(build_model(cfg)), cfg.mrc.exclude, k)
    if write:
        write_json(path, {"candidates": chosen, "requested": k})
    return chosen


def candidate_dir(run_dir: str | Path, module: str) -> Path:
    """The sub-run directory where candidate ``module`` is fine-tuned: ``finetune/candidates/<module>``."""
    return Path(run_dir) / "finetune" / "candidates" / module


def candidate_config(cfg: RunConfig, run_dir: str | Path, module: str) -> tuple[RunConfig, Path]:
    """(config, run dir) of candidate ``module``: ``finetune.modules = [module]`` in its sub-run directory,
    whose ``train/model.pt`` is a link to the run's AT model (a copy where links are not allowed)."""
    sub = candidate_dir(run_dir, module)
    target = sub / "train" / "model.pt"
    if not target.exists() and not target.is_symlink():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = Path(run_dir) / "train" / "model.pt"
        if not source.is_file():
            raise StageError(f"the adversarially trained model {source} is missing; run the train stage first")
        try:
            os.symlink(os.path.relpath(source, target.parent), target)
        except FileExistsError:
            pass  # another rank made it
        except OSError:
            shutil.copyfile(source, target)
    sub_cfg = copy.deepcopy(cfg)
    sub_cfg.finetune.modules = [module]
    sub_cfg.run_dir = str(sub)
    return sub_cfg, sub


def finetune_candidate_done(cfg: RunConfig, run_dir: str | Path, module: str) -> bool:
    """Whether candidate ``module`` has been fine-tuned (its sub-run's ``finetune/done.json`` exists)."""
    return (candidate_dir(run_dir, module) / "finetune" / "done.json").is_file()


# ------------------------------------------------------------------------------ interpolation


def alpha_file(run_dir: str | Path, alpha: float, candidate: str | None = None) -> Path:
    """Result file of theta(alpha): the stage's ``interpolate/alphas/alpha-X.json``, or per candidate
    ``interpolate/candidates/<module>/alpha-X.json`` (alpha 0 — the AT model — is shared: the stage's file)."""
    name = f"alpha-{alpha:.4f}.json"
    if candidate is None or alpha == 0.0:
        return Path(run_dir) / "interpolate" / "alphas" / name
    return Path(run_dir) / "interpolate" / "candidates" / candidate / name


def ft_model_path(run_dir: str | Path, candidate: str | None = None) -> Path:
    """The fine-tuned model theta_FT: ``finetune/model.pt`` or the candidate's own."""
    if candidate is None:
        return Path(run_dir) / "finetune" / "model.pt"
    return candidate_dir(run_dir, candidate) / "finetune" / "model.pt"


def interpolate_alphas(ctx: StageContext, alphas: list[float], candidate: str | None = None,
                       stage_run=None, run_tags: dict | None = None, candidate_index: int | None = None) -> list[dict]:
    """Evaluate theta(alpha) = (1 - alpha) theta_AT + alpha theta_FT on the selection split for ``alphas``.

    Exactly what the interpolation stage computes per alpha (same attack, restarts and seed), sharded
    over this job's ranks; results go to :func:`alpha_file` and alphas already there are skipped (a
    requeued task resumes).  With an MLflow ``stage_run`` (the ``interpolation`` run), each alpha is
    logged to its child run ``alpha=<a>`` (``alpha=<a>@candidate-<j>`` for candidates) and to the
    stage run's curve, as ``rift run`` does.  Returns the rows (alpha, clean_accuracy, robust_accuracy).

    Raises:
        StageError: a missing AT or fine-tuned model.
    """
    from rift_dist.data.loaders import get_dataset
    from rift_dist.stages.interpolation import evaluate_alpha

    cfg = ctx.cfg
    todo = [a for a in alphas if not alpha_file(ctx.run_dir, a, candidate).is_file()]
    rows = []
    if todo:
        theta_at = at_state(ctx)
        if all(a == 0.0 for a in todo) and not ft_model_path(ctx.run_dir, candidate).is_file():
            theta_ft = theta_at  # theta(0) is the AT model (shared by all candidates; none is chosen yet)
        else:
            theta_ft = load_state(ft_model_path(ctx.run_dir, candidate), "the fine-tuned model"
                                  + (f" of candidate {candidate}" if candidate else ""))
        selection = get_dataset(cfg, "selection")
    for alpha in alphas:
        path = alpha_file(ctx.run_dir, alpha, candidate)
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        row = evaluate_alpha(ctx, theta_at, theta_ft, alpha, selection)
        if candidate is not None and alpha != 0.0:
            row["candidate"] = candidate
        rows.append(row)
        if ctx.is_main:
            write_json(path, row)
            if stage_run is not None:
                from rift_dist.stages.interpolation import log_alpha

                key = f"alpha={alpha:g}" if candidate is None or alpha == 0.0 else f"alpha={alpha:g}@candidate-{candidate_index}"
                log_alpha(ctx, stage_run, alpha, row, Path(path), key=key,
                          tags={**(run_tags or {}), **({"rift.candidate": candidate} if candidate else {})},
                          curve=candidate is None)
        ctx.log(f"[interpolate] {'candidate ' + candidate + ' ' if candidate else ''}alpha {alpha:.2f}: "
                f"clean {100 * row['clean_accuracy']:.2f}% robust {100 * row['robust_accuracy']:.2f}%")
    ctx.runtime.barrier()
    return rows


def missing_alphas(run_dir: str | Path, alphas: list[float], candidate: str | None = None) -> list[float]:
    """The alphas of ``alphas`` without a result file yet."""
    return [a for a in alphas if not alpha_file(run_dir, a, candidate).is_file()]


def choose_candidate(per_candidate: dict[str, list[dict]], at_row: dict, tolerance: float) -> tuple[str, dict]:
    """The (candidate, row) the paper's alpha rule picks over every (candidate, alpha) pair.

    Args:
        per_candidate: {module: rows (alpha, clean_accuracy, robust_accuracy)} in candidate order
            (lowest MRC first); at_row: the AT model's row (alpha 0); tolerance: allowed robust drop.

    Ties on clean accuracy go to the higher robust accuracy, then the smaller alpha, then the
    earlier (lower-MRC) candidate.

    Raises:
        ValueError: no candidates.
    """
    from rift_dist.stages.interpolation import choose_alpha

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

    Without candidates: checks every alpha has its file, then runs the interpolation stage, which
    reads them back (nothing is re-evaluated) and writes ``interpolation.csv``, the plot,
    ``interpolate/model.pt`` and ``interpolate/alpha.json``.  With candidates: picks the candidate
    (:func:`choose_candidate`), makes its fine-tuned model the run's ``finetune/model.pt`` (fine-tune
    stage marked done with that module), copies its rows to the stage's per-alpha files, writes
    ``interpolate/candidates.json`` and runs the stage as above.

    Raises:
        StageError: when result files are missing (names the alphas / candidates to re-submit).
    """
    from rift_dist.stages import interpolation

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
        return interpolation.run(ctx)
    modules = read_candidates(ctx.run_dir)
    at_path = alpha_file(ctx.run_dir, 0.0)
    missing = [] if at_path.is_file() else ["alpha 0 (the AT model)"]
    for m in modules:
        missing += [f"{m} alpha {a:g}" for a in missing_alphas(ctx.run_dir, alphas, m)]
    if missing:
        raise StageError(f"interpolation results missing: {', '.join(missing)} — re-submit those array tasks "
                         f"(rift submit {ctx.run_dir})")
    at_row = json.loads(at_path.read_text())
    per = {m: [json.loads(alpha_file(ctx.run_dir, a, m).read_text()) for a in alphas] for m in modules}
    module, row = choose_candidate(per, at_row, cfg.interpolation.tolerance)
    ctx.log(f"[interpolate] candidate {module} chosen (alpha {row['alpha']:g}: clean {100 * row['clean_accuracy']:.2f}%, "
            f"robust {100 * row['robust_accuracy']:.2f}%; AT robust {100 * at_row['robust_accuracy']:.2f}%)")
    if ctx.is_main:
        sub = candidate_dir(ctx.run_dir, module)
        done = json.loads((sub / "finetune" / "done.json").read_text())["outputs"]
        checkpoint.save_atomic(checkpoint.load(ft_model_path(ctx.run_dir, module)), ctx.run_dir / "finetune" / "model.pt")
        if (sub / "finetune" / "history.json").is_file():
            shutil.copyfile(sub / "finetune" / "history.json", ctx.run_dir / "finetune" / "history.json")
        write_done(ctx, "finetune", {"model": str(ctx.run_dir / "finetune" / "model.pt"), "modules": [module],
                                     "best": done.get("best"), "candidates": modules,
                                     "candidate_dir": str(sub)})
        for a in alphas:
            if a != 0.0:
                write_json(alpha_file(ctx.run_dir, a), {k: v for k, v in per[module][alphas.index(a)].items()
                                                        if k != "candidate"})
        write_json(ctx.run_dir / "interpolate" / "candidates.json",
                   {"chosen": module, "row": row, "at": at_row, "rows": per,
                    "rule": "best clean accuracy among (candidate, alpha) with robust accuracy >= AT - tolerance; "
                            "ties: robust accuracy, smaller alpha, lower MRC"})
    ctx.runtime.barrier()
    outputs = interpolation.run(ctx)
    return {**outputs, "candidate": module}


def torch_threads_from_slurm() -> None:
    """Use SLURM's CPUs per task as torch's thread count (jobs that did not set ``precision.threads``)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        torch.set_num_threads(int(cpus))
