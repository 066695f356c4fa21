"""The command ``rift compare``: its plan (``--dry-run``), its up-front checks, and the run over every base and seed."""

from __future__ import annotations

import copy
from pathlib import Path

from rift_dist.atomic import atomic_write_text
from rift_dist.compare.bases import base_config, base_dir, check_base_checkpoints, compare_bases, describe, is_flat
from rift_dist.compare.methods import CompareError, finetuned_method
from rift_dist.compare.report import (csv_fields, method_table, noise_verdict, pareto_rows, plot_pareto,
                                      summary_markdown, write_pareto_csv)
from rift_dist.compare.seed import run_seed
from rift_dist.config import RunConfig, flatten


def plan_text(cfg: RunConfig) -> str:
    """What ``rift compare`` will do for ``cfg`` (``--dry-run``): bases, seeds, methods and what each trains, the
    sweep, the evaluations and the outputs.  Builds the model on the CPU; reads no data."""
    from rift_dist.models import build_model, module_names

    model = build_model(cfg)
    names = module_names(model)
    n_params = sum(p.numel() for p in model.parameters())
    seeds = compare_seeds(cfg)
    bases = compare_bases(cfg)
    where = "" if is_flat(cfg) else "base-<name>/"
    alphas = sorted(set(cfg.interpolation.alphas) | {0.0})
    trains = {"rift": "the lowest-MRC module" + (f" (finetune.modules: {', '.join(cfg.finetune.modules)})"
                                                 if cfg.finetune.modules else ""),
              "most-critical": "the highest-MRC module", "random-module": "one module drawn per seed",
              "all-layers": f"every parameter ({n_params:,})", "logit-mix": "nothing (all-layers model's logits)"}
    ft = {finetuned_method(m) for m in cfg.compare.methods}
    lines = [f"rift compare plan — {cfg.name}: {cfg.data.dataset}, {cfg.model.arch} ({len(names)} modules, "
             f"{n_params:,} parameters)",
             f"  AT bases: {len(bases)}" + ("" if is_flat(cfg) else f", each in {cfg.run_dir}/base-<name>/")]
    lines += [f"    {b.name:14s} {describe(cfg, b)}" for b in bases]
    imported = sum(bool(b.checkpoint) for b in bases)
    lines += [f"  seeds {seeds}: per {'seed' if is_flat(cfg) else 'base and seed'} one AT "
              + (f"training ({cfg.train.epochs} epochs)" if imported < len(bases) else "model")
              + (" (imported bases: the checkpoint, no training)" if imported else "")
              + f" and one MRC table, in {cfg.run_dir}/{where}seed-<s>/",
              f"  fine-tunings per seed: {len(ft)} ({cfg.finetune.epochs} epochs each), in {where}seed-<s>/compare/<method>/"]
    for m in cfg.compare.methods:
        what = trains.get(m) or f"the {m[4:]} lowest-MRC modules"
        lines.append(f"    {m:14s} trains {what}")
    evals = len(cfg.compare.methods) * (len(alphas) - 1) + 1
    aa = (f"; AutoAttack ({', '.join(cfg.eval.autoattack_attacks)}, {cfg.eval.autoattack_steps} steps) on "
          + (f"the first {cfg.compare.autoattack_examples} test images" if cfg.compare.autoattack_examples
             else "the test split") if cfg.compare.autoattack else "")
    lines += [f"  sweep: alphas {', '.join(f'{a:g}' for a in alphas)} -> {evals} validation evaluations per seed "
              f"(clean, PGD-{cfg.eval.selection_attack_steps}, corruptions); alpha* by the 0.1-pp rule",
              f"  test: AT + one alpha* per method = {len(cfg.compare.methods) + 1} evaluations per seed "
              f"(clean, PGD-{cfg.eval.attack.num_steps} worst of {cfg.eval.restarts}, corruptions{aa})",
              f"  statistics: {'per-image paired (McNemar-style s.e.)' if len(seeds) == 1 else 'paired t over seeds'}"
              f", {100 * cfg.compare.confidence:g} % intervals, within each base",
              f"  writes {cfg.run_dir}/compare/pareto.csv, summary.md, summary.json, pareto.png; MLflow experiment "
              f"'{cfg.tracking.experiment}': a parent run, a child per "
              + ("(method, seed)" if is_flat(cfg) else "(base, method, seed)")]
    return "\n".join(lines)


def compare_seeds(cfg: RunConfig) -> list[int]:
    """The seeds of a comparison: ``compare.seeds``, or the run's ``seed`` when that list is empty."""
    return list(cfg.compare.seeds) or [cfg.seed]


def check_compare(cfg: RunConfig) -> None:
    """Every check ``rift compare`` makes before it writes anything (local run and submission alike).

    The same checks as ``rift run`` (:func:`rift_dist.preflight.check_run` over every stage: FFCV settings, the
    ``eval`` section, corruption and module names, input paths and the run directory), then the comparison's own.

    Raises:
        ConfigError / PreflightError: what ``rift run`` refuses; CompareError: ``rift`` not among the methods, or
        an imported base whose checkpoint is missing, unreadable or of another architecture.
    """
    from rift_dist.preflight import check_run
    from rift_dist.stages import STAGES

    check_run(cfg, STAGES)
    if "rift" not in cfg.compare.methods:
        raise CompareError("compare.methods must include rift (every difference is reported against it)")
    check_base_checkpoints(cfg)


def run_compare(cfg: RunConfig, run_dir: str | Path | None = None, progress: bool = True,
                seeds: list[int] | None = None, summarize: bool = True, bases: list[str] | None = None) -> dict:
    """Run the comparison of ``cfg.compare`` in ``run_dir`` (default ``cfg.run_dir``) on this process's runtime.

    Validates first (module names, inputs, imported bases' checkpoints, the run directory's lock), then runs
    every base and seed (:func:`run_seed`), then writes ``compare/`` and logs it to MLflow.  Re-running
    resumes: finished stages, fine-tunings and evaluated points are reused.

    Args:
        seeds: run only these seeds (default: :func:`compare_seeds`); bases: only these bases (names; default
            every base of :func:`rift_dist.compare.bases.compare_bases`).  With ``summarize=False`` exactly one
            of each, and the lock taken is that (base, seed)'s folder (a SLURM job per (base, seed), side by side).
        summarize: write ``compare/`` and end the MLflow parent run (False: a seed job of a submission,
            whose last job summarises; the seeds' results stay on disk and are read back by it).

    Returns:
        {"rows": pareto rows, "table": the first base's method table, "verdict": str (every base's),
        "bases": {name: {"table", "verdict"}}}; {"seeds": [...], "bases": [...]} without ``summarize``.

    Raises:
        ConfigError / StageError / CompareError / RunDirLockedError: before anything is written where possible.
    """
    from rift_dist.pipeline import cap_num_workers, configure_torch
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.run_lock import RunDirLock
    from rift_dist.atomic import write_json
    from rift_dist.eval.corruption import corruption_sets
    from rift_dist.tracking import Tracker

    run_dir = Path(run_dir or cfg.run_dir)
    cfg.run_dir = str(run_dir)
    check_compare(cfg)
    all_seeds, all_bases = compare_seeds(cfg), compare_bases(cfg)
    seeds = list(seeds) if seeds else all_seeds
    names = list(bases) if bases else [b.name for b in all_bases]
    if not set(seeds) <= set(all_seeds) or (not summarize and len(seeds) != 1):
        raise CompareError(f"seeds {seeds} are not one seed of compare.seeds {all_seeds}")
    if not set(names) <= {b.name for b in all_bases} or (not summarize and len(names) != 1):
        raise CompareError(f"bases {names} are not one base of compare.bases {[b.name for b in all_bases]}")
    chosen = [b for b in all_bases if b.name in names]
    flat = is_flat(cfg)
    note = cap_num_workers(cfg)
    configure_torch(cfg)
    runtime = Runtime(cfg)
    lock = RunDirLock(run_dir if summarize else base_dir(cfg, run_dir, names[0]) / f"seed-{seeds[0]}")
    top = None
    status = "FAILED"
    try:
        if runtime.is_main:
            lock.acquire()
            lock.record_holder()
        runtime.barrier()
        top = Tracker(cfg, run_dir, active=runtime.is_main)
        top.parent.set_tags({"rift.kind": "compare", "rift.run_dir": str(run_dir.resolve()),
                             "rift.bases": ",".join(b.name for b in all_bases)})
        params = {k: v for k, v in flatten(cfg).items() if k.startswith(("compare.", "data.", "model."))}
        params["compare.bases"] = ",".join(f"{b.name}={b.checkpoint}" if b.checkpoint else b.name for b in all_bases)
        top.parent.log_params(params)
        log = (lambda m: print(m, flush=True)) if runtime.is_main else (lambda m: None)
        if note:
            log(note)
        results: dict[str, dict[int, dict]] = {}
        test_sets, cinfo = None, None
        for base in chosen:
            cfg_b = base_config(cfg, base)
            cfg_b.tracking.uri = top.uri or cfg.tracking.uri  # the stages' runs in the parent's store, not in
            # <seed dir>/../mlflow.db (the default store of a run directory)
            results[base.name] = {}
            for s in seeds:
                cfg_s = copy.deepcopy(cfg_b)
                cfg_s.seed = s
                seed_dir = base_dir(cfg, run_dir, base.name) / f"seed-{s}"
                cfg_s.run_dir = str(seed_dir)
                if test_sets is None:
                    from rift_dist.pipeline import make_context

                    probe = make_context(cfg_s, seed_dir, runtime, progress)
                    probe.tracker.active = False
                    test_sets, cinfo = corruption_sets(probe)
                results[base.name][s] = run_seed(top, cfg_s, seed_dir, runtime, progress, test_sets, log,
                                                 base=base.name, flat=flat)
        if not summarize:
            status = "FINISHED"
            return {"seeds": seeds, "bases": names}
        rows = [r for b in chosen for r in pareto_rows(results[b.name], b.name)]
        reports = []
        for b in chosen:
            table = method_table(results[b.name], list(cfg.compare.methods), cfg.compare.confidence)
            verdict, _ = noise_verdict(table)
            front = {s: [r for r in rows if r["base"] == b.name and r["seed"] == s and r["split"] == "val"
                         and r["on_front"]] for s in seeds}
            reports.append({"base": b, "results": results[b.name], "table": table, "verdict": verdict,
                            "front": front})
        verdict = (reports[0]["verdict"] if len(reports) == 1 else
                   " ".join(f"Base {r['base'].name}: {r['verdict']}" for r in reports))
        info = {"corruption": (cinfo or {}).get("label", "none") + (
                " on the test split; the validation split gets the same corruptions re-generated" if cinfo else "")}
        out = run_dir / "compare"
        if runtime.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_pareto_csv(out / "pareto.csv", rows, csv_fields(cfg))
            plot_pareto(out / "pareto.png", {r["base"].name: r["results"] for r in reports},
                        list(cfg.compare.methods))
            atomic_write_text(out / "summary.md", summary_markdown(cfg, reports, info))
            write_json(out / "summary.json", {
                "table": reports[0]["table"], "verdict": verdict, "seeds": seeds,
                "bases": [{"base": r["base"].name, "checkpoint": r["base"].checkpoint, "table": r["table"],
                           "verdict": r["verdict"]} for r in reports]})
            for name in ("pareto.csv", "summary.md", "summary.json", "pareto.png"):
                top.parent.log_artifact(out / name, "compare")
            print((out / "summary.md").read_text(), flush=True)
            print(f"rift compare: wrote {out}/pareto.csv, summary.md, pareto.png", flush=True)
        status = "FINISHED"
        return {"rows": rows, "table": reports[0]["table"], "verdict": verdict,
                "bases": {r["base"].name: {"table": r["table"], "verdict": r["verdict"]} for r in reports}}
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
        check_base_checkpoints(cfg)  # an imported base that cannot be used is refused by the plan too
        print(plan_text(cfg))
        return 0
    run_compare(cfg, cfg.run_dir, progress=not args.no_progress)
    return 0
