"""The stage graph: what runs, where its inputs come from, and skipping what is done.

train -> mrc -> finetune -> interpolate -> evaluate.  Each stage reads the
artefacts of the stages before it from the run directory and writes its own;
a stage whose ``done.json`` matches the config is skipped, and a stage killed
half-way resumes from its checkpoints.  The same code runs in one process,
under torchrun, or inside a SLURM job.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch

from rift_dist.atomic import read_json, remove_stale_temporaries
from rift_dist import interrupts
from rift_dist.config import RunConfig, dump_yaml, flatten
from rift_dist.layout import RunLayout
from rift_dist.parallel.runtime import Runtime
from rift_dist.precision import resolve_precision
from rift_dist.preflight import check_module_names, check_run, usable_cpus  # noqa: F401 - check_module_names re-exported
from rift_dist.run_lock import RunDirLock, RunDirLockedError
from rift_dist.stages import STAGES, StageError, resolve, stage
from rift_dist.stages.context import StageContext
from rift_dist.stages.done_markers import read_done
from rift_dist.tracking import Tracker


def stage_function(name: str, cfg: RunConfig):
    """The ``run(ctx)`` function of stage ``name`` (the stage table's ``run``; ``cfg`` is not read).

    Raises:
        StageError: for an unknown stage name (lists the valid ones).
    """
    return resolve(stage(name).run)


def configure_torch(cfg: RunConfig) -> None:
    """Apply thread count and determinism switches."""
    if cfg.precision.threads:
        torch.set_num_threads(cfg.precision.threads)
    if cfg.precision.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def make_context(cfg: RunConfig, run_dir: Path, runtime: Runtime, progress: bool = True,
                 parent_run_id: str | None = None) -> StageContext:
    """Build the StageContext of a run (precision resolved, tracker on the main process only)."""
    precision = resolve_precision(cfg.precision, runtime.device)
    tracker = Tracker(cfg, run_dir, active=runtime.is_main, parent_run_id=parent_run_id)
    return StageContext(cfg, run_dir, runtime, tracker, precision, progress)


def stage_weights(cfg: RunConfig) -> dict[str, float]:
    """Predicted work of each stage, {stage: FLOPs per unit forward} (:func:`rift_dist.plan.stage_costs` with
    one FLOP per forward: only the ratios between stages matter for :class:`rift_dist.progress.PipelineETA`).

    Training imported from a checkpoint (``from_checkpoint``) has weight 0.  Builds the model once (to list
    the MRC modules); reads no data.
    """
    from rift_dist.plan import stage_costs
    from rift_dist.stages.criticality import mrc_module_names

    costs = stage_costs(cfg, 1.0, len(mrc_module_names(cfg)))
    weights = {name: c.flops for name, c in zip(STAGES, costs)}  # stage_costs lists the stages in STAGES order
    if cfg.from_checkpoint:
        weights["train"] = 0.0
    return weights


def run_stages(ctx: StageContext, stages: list[str] | tuple[str, ...] = STAGES) -> dict:
    """Run ``stages`` in order on an existing context, skipping the ones already done.

    Logs one line per stage when it finishes: its time and, when several stages run, the pipeline's
    elapsed time and ETA from the measured stage rates (:class:`rift_dist.progress.PipelineETA`).

    Returns {stage: outputs}.
    """
    from rift_dist.progress import PipelineETA

    results = {}
    eta = PipelineETA(stages, {})
    for name in stages:
        interrupts.check(ctx.runtime, where=f"the stages before '{name}'")
        done = read_done(ctx, name)
        if done is not None:
            ctx.log(f"[{name}] already done — reusing {RunLayout(ctx.run_dir).stage_dir(name)} (delete it to redo)")
            results[name] = done["outputs"]
            eta.skip(name)
            continue
        if len(stages) > 1 and not eta.measured:  # the first stage that runs: predict the work of each
            try:
                eta.set_weights(stage_weights(ctx.cfg))
            except Exception as exc:  # noqa: BLE001 - an ETA never stops a run
                eta.set_weights({s: 1.0 for s in stages}, basis=f"equal work per stage (no FLOP model: {exc})")
        t0 = time.time()
        ctx.log(f"[{name}] started")
        tracker = getattr(ctx, "tracker", None)
        if tracker is not None:
            if not RunLayout(ctx.run_dir).stage_dir(name).exists():  # a fresh start: nothing of an earlier run
                retired = tracker.retire_stage(name)
                if retired:
                    ctx.log(f"[{name}] {len(retired)} MLflow run(s) of an earlier '{name}' whose folder is gone moved "
                            f"to MLflow's deleted runs (tag rift.superseded; restorable there); this run starts "
                            f"new ones")
            tracker.stage_name = name
        try:
            results[name] = stage_function(name, ctx.cfg)(ctx)
        finally:
            if tracker is not None:
                tracker.stage_name = None
        eta.finish(name, time.time() - t0)
        ctx.log(eta.line(name) if len(stages) > 1 else f"[{name}] finished in {time.time() - t0:.1f}s")
    return results


def mlflow_link(tracker) -> str:
    """Where to see the run in the MLflow UI: the parent run page in the training-runs view.

    MLflow 3.17's UI starts in its GenAI mode; ``?workflowType=machine_learning`` opens the model
    training view.  For the embedded SQLite store the line also says how to start the UI.
    """
    run_id = getattr(tracker.parent, "run_id", None)
    if not getattr(tracker, "active", False) or not run_id or tracker.client is None:
        return ""
    try:
        exp = tracker.experiment_id
    except Exception:  # noqa: BLE001 - the store went away; the run itself is fine
        return ""
    page = f"#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
    if tracker.uri.startswith(("http://", "https://")):
        return f"MLflow: {tracker.uri.rstrip('/')}/{page}"
    return f"MLflow: mlflow ui --backend-store-uri {tracker.uri}   then open http://127.0.0.1:5000/{page}"


def close_stale_runs(tracker) -> int:
    """Mark KILLED the child runs of this pipeline's parent run that a dead process left RUNNING.

    Called by the next pipeline on the run directory, after it took the directory's lock (so no live
    local writer can own them): a SIGKILLed or OOM-killed run otherwise stays "Running" in MLflow forever.
    Children and grandchildren (per-alpha runs) are searched; each stale run gets tag
    ``rift.stale = "left RUNNING by a dead process; closed at the next start"``.  Returns how many were
    closed; does nothing (0) when tracking is off or the store does not answer.
    """
    client, parent = getattr(tracker, "client", None), getattr(tracker.parent, "run_id", None)
    if client is None or not parent:
        return 0
    try:
        exp = [tracker.experiment_id]
        children = client.search_runs(exp, f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
        owners = {parent} | {r.info.run_id for r in children}
        running = client.search_runs(exp, "attributes.status = 'RUNNING'", max_results=5000)
        stale = [r for r in running if r.data.tags.get("mlflow.parentRunId") in owners]
    except Exception:  # noqa: BLE001 - tracking never stops a run
        return 0
    from rift_dist.tracking import RunHandle

    for r in stale:
        handle = RunHandle(tracker, r.info.run_id)
        handle.set_tags({"rift.stale": "left RUNNING by a dead process; closed at the next start"})
        tracker.end(handle, "KILLED")
    return len(stale)


def cap_num_workers(cfg: RunConfig) -> str:
    """Cap ``data.num_workers`` at the CPUs each local process may use; returns a note when it was capped.

    The paper configs ask for 8 loader workers; on a 2-core machine (or 8 ranks sharing a 16-core node)
    that many processes only fight over the cores.  Each of the ``LOCAL_WORLD_SIZE`` processes on this
    node gets ``usable CPUs // LOCAL_WORLD_SIZE`` (at least 1); 0 (load in the main process) is kept.
    """
    want = cfg.data.num_workers
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")) or 1))
    limit = max(1, usable_cpus() // local)
    if want > limit:
        cfg.data.num_workers = limit
        return (f"rift: data.num_workers {want} -> {limit}: this process may use {usable_cpus()} CPU(s)"
                + (f" shared by {local} local processes" if local > 1 else ""))
    return ""


def check_stages_current(cfg: RunConfig, run_dir: Path, stages) -> None:
    """Refuse, before anything is written, a run whose finished stages were produced with another config.

    Reads each requested stage's ``done.json`` (if any) exactly as :func:`run_stages` will, so that a
    changed setting is refused while the run directory, its ``config.yaml`` and its MLflow runs are
    still untouched (validate, then write).

    Raises:
        StageError: naming the stage, the changed keys and what to delete (see ``read_done``).
    """
    probe = SimpleNamespace(cfg=cfg, run_dir=run_dir)
    for name in stages:
        read_done(probe, name)


@contextlib.contextmanager
def open_run(cfg: RunConfig, run_dir: str | Path | None = None, *, stages=(), progress: bool = True,
             parent_run_id: str | None = None, exclusive: bool = True, config_copy: Path | bool | None = True,
             check: bool = True, log_config: bool = True) -> Iterator[StageContext]:
    """Open one run for any entry point: config -> checks -> run directory and its lock -> runtime -> tracker,
    torn down in ``finally``.  ``rift run`` and every stage command (:func:`run_pipeline`), ``rift evaluate
    --checkpoint`` (:mod:`rift_dist.evaluate_checkpoint`) and every SLURM job (:func:`rift_dist.cluster.job.run_task`)
    use it.

    Validate, then write: with ``check``, :func:`rift_dist.preflight.check_run` (config errors, and the input
    paths ``stages`` read) runs before anything; with ``exclusive`` the main process takes the run directory's
    lock (:class:`rift_dist.run_lock.RunDirLock`: a second process on the directory is refused at once,
    naming the holder) and checks the done marker of each of ``stages`` against ``cfg`` before ``config_copy``
    (True: the run's ``config.yaml``, :attr:`rift_dist.layout.RunLayout.config`; a path; None: none) is
    written or MLflow is touched, so a refused command changes nothing.
    Then the tracker: continued or created parent run (``parent_run_id``: the parent of a pipeline submitted
    with ``rift submit``, whose status stays with its owner), stale child runs of a dead process closed
    (exclusive runs only), the config logged as the parent's params (``log_config``; a job of a submitted
    pipeline leaves that to ``rift submit``).

    Yields:
        the :class:`~rift_dist.stages.context.StageContext`.  When the body ends the tracker is finished:
        FINISHED, KILLED (:class:`~rift_dist.interrupts.Interrupted`, KeyboardInterrupt, SystemExit) or
        FAILED; the parent run is marked so only without ``parent_run_id``.  The lock is released and the
        process group torn down.

    Raises:
        ConfigError / PreflightError: the checks (nothing written).
        RunDirLockedError: another process holds the run directory.
        StageError: a finished stage was produced with a different config (nothing is written).
    """
    run_dir = Path(run_dir or cfg.run_dir)
    cfg.run_dir = str(run_dir)
    if check:
        check_run(cfg, stages)  # config checks (FFCV, eval, modules) and every input path, before anything is written
    note = cap_num_workers(cfg)
    configure_torch(cfg)
    runtime = Runtime(cfg)
    lock = RunDirLock(run_dir) if exclusive else None
    status = "FAILED"
    ctx = None
    try:
        if lock is not None:
            refusal = None
            if runtime.is_main:
                try:
                    lock.acquire()
                    check_stages_current(cfg, run_dir, list(stages))
                except StageError as exc:
                    refusal = (type(exc).__name__, str(exc))
            refusal = runtime.broadcast_object(refusal)
            if refusal is not None:
                cls = RunDirLockedError if refusal[0] == RunDirLockedError.__name__ else StageError
                raise cls(refusal[1])
        if runtime.is_main:
            if lock is not None:
                lock.record_holder()
            # temporaries of atomic writes that killed processes of this host left anywhere in the run
            # directory (a live writer's -- another array task's -- are kept: their PID is alive)
            remove_stale_temporaries(run_dir, recursive=True)
            if config_copy:
                copy_path = RunLayout(run_dir).config if config_copy is True else Path(config_copy)
                copy_path.parent.mkdir(parents=True, exist_ok=True)
                dump_yaml(cfg, copy_path)
        runtime.barrier()
        ctx = make_context(cfg, run_dir, runtime, progress, parent_run_id)
        if runtime.is_main and parent_run_id is None and lock is not None:
            close_stale_runs(ctx.tracker)  # we hold the run directory's lock: a RUNNING child's process is dead
        if runtime.is_main and log_config:
            ctx.tracker.parent.log_params(flatten(cfg))
            ctx.tracker.parent.set_tags({"rift.run_dir": str(run_dir.resolve())})
        if note:
            ctx.log(note)
        yield ctx
        status = "FINISHED"
    except (interrupts.Interrupted, KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        try:
            if ctx is not None:
                ctx.tracker.finish(status, end_parent=parent_run_id is None)
        finally:
            if lock is not None:
                lock.release()
            runtime.close()


def run_pipeline(cfg: RunConfig, run_dir: str | Path | None = None, stages=STAGES, progress: bool = True,
                 parent_run_id: str | None = None, print_table: bool = True) -> dict:
    """Run the RiFT stage graph for ``cfg`` in ``run_dir`` (default ``cfg.run_dir``) on this process's runtime.

    The run is opened by :func:`open_run` (checks, the run directory's lock, the stages' done markers against
    ``cfg``, then ``config.yaml`` and MLflow; teardown in ``finally``), then :func:`run_stages`.  Sets up the
    process group from the environment (torchrun / SLURM / single process).  Returns {stage: outputs}.

    With ``parent_run_id`` (a run of a pipeline submitted with ``rift submit``) the stages log into
    that MLflow parent run and leave its status to its owner; without it, the run directory's own
    parent run is continued (or created) and marked FINISHED / FAILED at the end.

    Raises:
        RunDirLockedError: another process holds the run directory.
        StageError: a finished stage was produced with a different config (nothing is written).
    """
    with open_run(cfg, run_dir, stages=stages, progress=progress, parent_run_id=parent_run_id) as ctx:
        runtime, run_dir = ctx.runtime, ctx.run_dir
        ctx.log(f"rift: run {run_dir} — {runtime.world_size} process(es) on {runtime.device}, {ctx.precision.describe()}")
        results = run_stages(ctx, list(stages))
        if print_table and runtime.is_main and ctx.layout.summary.is_file() and "evaluate" in stages:
            from rift_dist.eval.report import print_summary

            print_summary(read_json(ctx.layout.summary))
        if runtime.is_main and (link := mlflow_link(ctx.tracker)):
            print(link, flush=True)
        return results
