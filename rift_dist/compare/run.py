"""The command ``rift compare``: its plan (``--dry-run``), its up-front checks, and the run over every seed."""

from __future__ import annotations

import copy
from pathlib import Path

from rift_dist.atomic import atomic_write_text
from rift_dist.compare.methods import CompareError, finetuned_method
from rift_dist.compare.report import method_table, noise_verdict, pareto_rows, plot_pareto, summary_markdown, write_pareto_csv
from rift_dist.compare.seed import run_seed
from rift_dist.config import RunConfig, flatten


def plan_text(cfg: RunConfig) -> str:
    """What ``rift compare`` will do for ``cfg`` (``--dry-run``): seeds, methods and what each trains, the sweep,
    the evaluations and the outputs.  Builds the model on the CPU; reads no data."""
    from rift_dist.models import build_model, module_names

    model = build_model(cfg)
    names = module_names(model)
    n_params = sum(p.numel() for p in model.parameters())
    seeds = list(cfg.compare.seeds) or [cfg.seed]
    alphas = sorted(set(cfg.interpolation.alphas) | {0.0})
    trains = {"rift": "the lowest-MRC module" + (f" (finetune.modules: {', '.join(cfg.finetune.modules)})"
                                                 if cfg.finetune.modules else ""),
              "most-critical": "the highest-MRC module", "random-module": "one module drawn per seed",
              "all-layers": f"every parameter ({n_params:,})", "logit-mix": "nothing (all-layers model's logits)"}
    ft = {finetuned_method(m) for m in cfg.compare.methods}
    lines = [f"rift compare plan — {cfg.name}: {cfg.data.dataset}, {cfg.model.arch} ({len(names)} modules, "
             f"{n_params:,} parameters)",
             f"  seeds {seeds}: per seed one AT training ({cfg.train.epochs} epochs) and one MRC table, in "
             f"{cfg.run_dir}/seed-<s>/",
             f"  fine-tunings per seed: {len(ft)} ({cfg.finetune.epochs} epochs each), in seed-<s>/compare/<method>/"]
    for m in cfg.compare.methods:
        what = trains.get(m) or f"the {m[4:]} lowest-MRC modules"
        lines.append(f"    {m:14s} trains {what}")
    evals = len(cfg.compare.methods) * (len(alphas) - 1) + 1
    lines += [f"  sweep: alphas {', '.join(f'{a:g}' for a in alphas)} -> {evals} validation evaluations per seed "
              f"(clean, PGD-{cfg.eval.selection_attack_steps}, corruptions); alpha* by the 0.1-pp rule",
              f"  test: AT + one alpha* per method = {len(cfg.compare.methods) + 1} evaluations per seed "
              f"(clean, PGD-{cfg.eval.attack.num_steps} worst of {cfg.eval.restarts}, corruptions)",
              f"  statistics: {'per-image paired (McNemar-style s.e.)' if len(seeds) == 1 else 'paired t over seeds'}"
              f", {100 * cfg.compare.confidence:g} % intervals",
              f"  writes {cfg.run_dir}/compare/pareto.csv, summary.md, summary.json, pareto.png; MLflow experiment "
              f"'{cfg.tracking.experiment}': a parent run, a child per (method, seed)"]
    return "\n".join(lines)


def compare_seeds(cfg: RunConfig) -> list[int]:
    """The seeds of a comparison: ``compare.seeds``, or the run's ``seed`` when that list is empty."""
    return list(cfg.compare.seeds) or [cfg.seed]


def check_compare(cfg: RunConfig) -> None:
    """Every check ``rift compare`` makes before it writes anything (local run and submission alike).

    Raises:
        ConfigError / StageError: bad module names or inputs; CompareError: ``rift`` not among the methods.
    """
    from rift_dist.pipeline import check_module_names
    from rift_dist.preflight import check_inputs
    from rift_dist.stages import STAGES

    check_module_names(cfg)
    check_inputs(cfg, STAGES)
    if "rift" not in cfg.compare.methods:
        raise CompareError("compare.methods must include rift (every difference is reported against it)")


def run_compare(cfg: RunConfig, run_dir: str | Path | None = None, progress: bool = True,
                seeds: list[int] | None = None, summarize: bool = True) -> dict:
    """Run the comparison of ``cfg.compare`` in ``run_dir`` (default ``cfg.run_dir``) on this process's runtime.

    Validates first (module names, inputs, the run directory's lock), then runs every seed
    (:func:`run_seed`), then writes ``compare/`` and logs it to MLflow.  Re-running resumes: finished
    stages, fine-tunings and evaluated points are reused.

    Args:
        seeds: run only these seeds (default: :func:`compare_seeds`); with ``summarize=False`` exactly one,
            and the lock taken is that seed's folder ``seed-<s>/`` (a SLURM job per seed, side by side).
        summarize: write ``compare/`` and end the MLflow parent run (False: a seed job of a submission,
            whose last job summarises; the seeds' results stay on disk and are read back by it).

    Returns:
        {"rows": pareto rows, "table": method table, "verdict": str}; {"seeds": [...]} without ``summarize``.

    Raises:
        ConfigError / StageError / CompareError / RunDirLockedError: before anything is written where possible.
    """
    from rift_dist.pipeline import cap_num_workers, configure_torch
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.run_lock import RunDirLock
    from rift_dist.stages.common import write_json
    from rift_dist.stages.evaluation import corruption_sets
    from rift_dist.tracking import Tracker

    run_dir = Path(run_dir or cfg.run_dir)
    cfg.run_dir = str(run_dir)
    check_compare(cfg)
    all_seeds = compare_seeds(cfg)
    seeds = list(seeds) if seeds else all_seeds
    if not set(seeds) <= set(all_seeds) or (not summarize and len(seeds) != 1):
        raise CompareError(f"seeds {seeds} are not one seed of compare.seeds {all_seeds}")
    note = cap_num_workers(cfg)
    configure_torch(cfg)
    runtime = Runtime(cfg)
    lock = RunDirLock(run_dir if summarize else run_dir / f"seed-{seeds[0]}")
    top = None
    status = "FAILED"
    try:
        if runtime.is_main:
            lock.acquire()
            lock.record_holder()
        runtime.barrier()
        top = Tracker(cfg, run_dir, active=runtime.is_main)
        top.parent.set_tags({"rift.kind": "compare", "rift.run_dir": str(run_dir.resolve())})
        top.parent.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("compare.", "data.", "model."))})
        log = (lambda m: print(m, flush=True)) if runtime.is_main else (lambda m: None)
        if note:
            log(note)
        results, test_sets, cinfo = {}, None, None
        for s in seeds:
            cfg_s = copy.deepcopy(cfg)
            cfg_s.seed = s
            seed_dir = run_dir / f"seed-{s}"
            cfg_s.run_dir = str(seed_dir)
            if test_sets is None:
                from rift_dist.pipeline import make_context

                probe = make_context(cfg_s, seed_dir, runtime, progress)
                probe.tracker.active = False
                test_sets, cinfo = corruption_sets(probe)
            results[s] = run_seed(top, cfg_s, seed_dir, runtime, progress, test_sets, log)
        if not summarize:
            status = "FINISHED"
            return {"seeds": seeds}
        rows = pareto_rows(results)
        table = method_table(results, list(cfg.compare.methods), cfg.compare.confidence)
        verdict, _ = noise_verdict(table)
        front = {s: [r for r in rows if r["seed"] == s and r["split"] == "val" and r["on_front"]] for s in seeds}
        info = {"corruption": (cinfo or {}).get("label", "none") + (
                f" on the test split; the validation split gets the same corruptions re-generated" if cinfo else ""),
                "front": front}
        out = run_dir / "compare"
        if runtime.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_pareto_csv(out / "pareto.csv", rows)
            plot_pareto(out / "pareto.png", results, list(cfg.compare.methods))
            atomic_write_text(out / "summary.md", summary_markdown(cfg, results, table, info))
            write_json(out / "summary.json", {"table": table, "verdict": verdict, "seeds": seeds})
            for name in ("pareto.csv", "summary.md", "summary.json", "pareto.png"):
                top.parent.log_artifact(out / name, "compare")
            print((out / "summary.md").read_text(), flush=True)
            print(f"rift compare: wrote {out}/pareto.csv, summary.md, pareto.png", flush=True)
        status = "FINISHED"
        return {"rows": rows, "table": table, "verdict": verdict}
    finally:
        try:
            if top is not None:
                top.finish(status, end_parent=summarize or status != "FINISHED")
        finally:
            if runtime.is_main:
                lock.release()
            runtime.close()


def compare_command(args, cfg: RunConfig) -> int:
    """``rift compare CONFIG [--run-dir] [--nproc] [--dry-run]``; returns the exit status (``--submit``:
    :func:`rift_dist.cluster.compare_jobs.submit_command`)."""
    if args.local or args.debug or args.profile or args.profile_overrides:
        raise CompareError("--profile, --profile-set, --local and --debug go with --submit")
    if args.dry_run:
        print(plan_text(cfg))
        return 0
    run_compare(cfg, cfg.run_dir, progress=not args.no_progress)
    return 0
