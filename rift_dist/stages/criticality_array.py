"""The MRC stage as SLURM jobs (the stage table's ``shards`` of ``mrc``; see :mod:`rift_dist.cluster`).

A whole stage (:func:`rift_dist.stages.criticality.run`) spreads its modules over the ranks of ONE
process group.  On a cluster they are better spread over independent array tasks that start whenever
a GPU is free and fail (and are re-submitted) one by one:

* prepare (:func:`prepare_task`): the fixed adversarial set, once (``mrc/adversarial_set.pt``);
* compute (:func:`compute_task`): array task i computes the MRC of the i-th contiguous group of
  modules of balanced estimated cost (:func:`mrc_groups`, the stage's own ``assign_modules``) and
  writes the stage's own per-module files (``mrc/modules/<name>.json``);
* gather (:func:`gather_task`): checks every module is there and runs the stage, which reads them
  back (``mrc.csv``, ``mrc/mrc.json``, the choice of module) without recomputing; with fine-tuning
  candidates it also records the k lowest-MRC modules (``finetune/candidates.json``).

Each piece calls the stage's own code (module check, per-module files, metric logging), so an array
run gives the same numbers as ``rift run``.  Kept apart from ``criticality.py`` only for its length.
"""

from __future__ import annotations

import time
from pathlib import Path

from rift_dist.atomic import read_json, write_json
from rift_dist.models import module_names
from rift_dist.layout import RunLayout
from rift_dist.stages import StageError
from rift_dist.stages.context import StageContext, at_state, new_model
from rift_dist.stages.criticality import (
    assign_modules, build_adversarial_set, check_modules, compute_modules, log_rows, module_costs,
    mrc_module_names, run,
)

# array whose task i computes the MRC of the i-th balanced group of modules (the stage's own
# per-module files), and a gather that runs :func:`run`, which reads every module back.

def mrc_groups(cfg, num_tasks: int) -> list[list[str]]:
    """Split the MRC modules into at most ``num_tasks`` contiguous groups of balanced estimated cost.

    Uses :func:`assign_modules` with its cost model (the multiply-adds from the module's unit to the
    output) on a CPU copy of the model; empty groups (more tasks than modules) are dropped, so every
    returned group has at least one module.

    Raises:
        ValueError: ``num_tasks`` < 1.
    """
    from rift_dist.data.datasets import dataset_spec
    from rift_dist.models import build_model

    if num_tasks < 1:
        raise ValueError(f"the MRC array needs at least one task, got {num_tasks}")
    names = mrc_module_names(cfg)
    side = dataset_spec(cfg.data.dataset).image_size  # before any data is loaded
    costs = module_costs(build_model(cfg), names, (3, side, side))
    return [g for g in assign_modules(names, costs, min(num_tasks, len(names))) if g]


def missing_modules(run_dir: str | Path, names: list[str]) -> list[str]:
    """The modules of ``names`` without an MRC result file yet."""
    layout = RunLayout(run_dir)
    return [n for n in names if not layout.mrc_module(n).is_file()]


def adversarial_set_exists(run_dir: str | Path) -> bool:
    """Whether the fixed adversarial set ``mrc/adversarial_set.pt`` is on disk (the prepare job's output)."""
    return RunLayout(run_dir).adversarial_set.is_file()


def results_on_disk(run_dir: str | Path) -> str:
    """``"N module(s) measured"`` for the per-module results on disk ("" when there are none)."""
    folder = RunLayout(run_dir).mrc_modules
    return f"{len(list(folder.glob('*.json')))} module(s) measured" if folder.is_dir() else ""


def prepare_mrc(ctx: StageContext) -> dict:
    """Make (or reuse) the fixed adversarial set, sharded over this job's ranks.

    Returns {"adversarial_set": path, "num_examples": N}.

    Raises:
        StageError: when the adversarially trained model is missing.
    """
    model = new_model(ctx, at_state(ctx))
    model.eval()
    images, _ = build_adversarial_set(ctx, model)
    ctx.runtime.barrier()
    return {"adversarial_set": str(ctx.layout.adversarial_set), "num_examples": len(images)}


def compute_mrc(ctx: StageContext, modules: list[str], run=None) -> list[dict]:
    """MRC of ``modules`` (one array task's group) on this job's ranks; per-module files as the stage writes them.

    Modules already done are read back, so a requeued task resumes with the ones left; with several
    ranks each computes a contiguous share.  When ``run`` (an MLflow handle) is given, the main process
    logs ``mrc.<module>``, ``robust_accuracy_drop.<module>`` (:func:`log_rows`) and ``seconds`` to it.
    Returns the rows in the order of ``modules``.

    Raises:
        StageError: unknown module names, or a missing AT model.
    """
    t0 = time.time()
    model = new_model(ctx, at_state(ctx))
    model.eval()
    check_modules(modules, module_names(model))
    images, labels = build_adversarial_set(ctx, model)
    todo = missing_modules(ctx.run_dir, modules)
    ctx.log(f"[mrc] task: {len(modules)} module(s) ({len(modules) - len(todo)} already done): {', '.join(modules)}")
    start, stop = ctx.runtime.shard(len(modules))
    rows = compute_modules(ctx, model, images, labels, modules[start:stop])
    if ctx.runtime.world_size > 1:
        rows = [r for part in ctx.runtime.all_gather_object(rows) for r in part]
    if run is not None and ctx.is_main:
        log_rows(run, rows)
        run.log_metrics({"seconds": time.time() - t0, "modules": len(rows)})
    return rows


def gather_mrc(ctx: StageContext, candidates: int = 1, assignment: list[list[str]] | None = None) -> dict:
    """Finish the stage from the per-module files (no module is recomputed): :func:`run` on this process.

    Once every module has its file, :func:`run` reads them back, writes ``mrc.csv``, ``mrc/mrc.json``,
    ``mrc/mrc.png``, logs to the ``mrc`` MLflow run and marks the stage done.  ``assignment`` (the
    array's groups) is added to ``mrc/mrc.json``.  With ``candidates`` > 1, also writes
    ``finetune/candidates.json``: the ``candidates`` lowest-MRC modules after ``mrc.exclude``.

    Raises:
        StageError: when modules have no result file (names them: their array task failed or has not
            run; re-submit it), or ``candidates`` > 1 together with ``mrc.top_k`` > 1.
    """
    from rift_dist.stages.finetune import candidate_modules

    if candidates > 1 and ctx.cfg.mrc.top_k > 1:
        raise StageError(f"finetune candidates ({candidates}) and mrc.top_k ({ctx.cfg.mrc.top_k}) cannot both be > 1: "
                         f"candidates are fine-tuned one module each; set one of them to 1")
    missing = missing_modules(ctx.run_dir, mrc_module_names(ctx.cfg))
    if missing:
        raise StageError(f"MRC results missing for {len(missing)} module(s): {', '.join(missing)} — their array task "
                         f"failed or has not run; re-submit it (rift submit {ctx.run_dir} --only mrc:{missing[0]})")
    if ctx.runtime.world_size > 1:
        raise StageError("the MRC gather runs on one process; submit it with one task")
    outputs = run(ctx)
    info_path = ctx.layout.mrc_result
    if assignment is not None:
        write_json(info_path, {**read_json(info_path), "array_assignment": assignment})
    if candidates > 1:
        chosen = candidate_modules(ctx.cfg, ctx.run_dir, candidates, write=ctx.is_main)
        outputs = {**outputs, "candidates": chosen}
        ctx.log(f"[mrc] fine-tuning candidates (lowest MRC first): {', '.join(chosen)}")
    return outputs


def runs_as_array(cfg, options: dict, candidates: int) -> bool:
    """Whether ``rift submit`` splits the stage (profile ``stages.mrc.mode: array``, the default)."""
    return options["mode"] != "job"


def array_tasks(cfg, run_dir: Path, options: dict, candidates: int, wanted: list[str] | None):
    """The MRC array's tasks not done yet: task i = the i-th group of :func:`mrc_groups` (``array_size``
    tasks; 0 = one per module).  ``wanted`` (``--only mrc:NAME,...``): module names or task indices; a
    module named alone gets a task of its own.  Returns (tasks, the gather's arguments)."""
    size = int(options["array_size"]) or len(mrc_module_names(cfg))
    groups = mrc_groups(cfg, size)
    tasks = []
    for i, group in enumerate(groups):
        names = list(group)
        if wanted:
            names = list(group) if str(i) in wanted else [m for m in group if m in wanted]
            if not names:
                continue
        elif not missing_modules(run_dir, group):
            continue
        tasks.append({"index": i, "label": ",".join(names), "names": names, "args": {"modules": names},
                      "what": f"MRC group {i}: {', '.join(names)}",
                      "run_key": f"mrc.task-{i}", "run_name": f"mrc-task-{i}"})
    return tasks, {"candidates": candidates, "assignment": groups}


def prepare_task(ctx: StageContext, args: dict, run) -> dict:
    """The prepare job: :func:`prepare_mrc`, logging ``num_examples`` to its own run."""
    out = prepare_mrc(ctx)
    run.log_metrics({"num_examples": out["num_examples"]})
    return out


def prepare_task_done(run_dir: Path, args: dict) -> bool:
    """Whether the prepare job's work is on disk."""
    return adversarial_set_exists(run_dir)


def compute_task(ctx: StageContext, args: dict, run) -> dict:
    """One array task: :func:`compute_mrc` of its group (the stage run, created by ``rift submit``, is set
    running once its first task is)."""
    if ctx.tracker.active and ctx.tracker.key_file("mrc").is_file():
        ctx.tracker.child("mrc")
    rows = compute_mrc(ctx, list(args["modules"]), run)
    return {"modules": [r["module"] for r in rows], "mrc": {r["module"]: r["mrc"] for r in rows}}


def compute_task_done(run_dir: Path, args: dict) -> bool:
    """Whether every module of the task has its result file."""
    return not missing_modules(run_dir, args.get("modules", []))


def compute_task_progress(run_dir: Path, args: dict) -> dict:
    """Where a requeued task resumes: how many of its modules are done."""
    mods = args["modules"]
    return {"modules_done": len(mods) - len(missing_modules(run_dir, mods)), "modules": len(mods)}


def gather_task(ctx: StageContext, args: dict, run) -> dict:
    """The gather job: :func:`gather_mrc`."""
    return gather_mrc(ctx, int(args.get("candidates", 1)), args.get("assignment"))
