"""``rift compare CONFIG --submit``: the comparison of RiFT with its alternatives as SLURM jobs (issue 16).

One job per (AT base, seed) (``compare.bases`` x ``compare.seeds``; named ``compare-seed-<s>`` for the one
default base, ``compare-<base>-seed-<s>`` with bases listed) runs that seed's whole comparison on that base -- the
AT model (trained or imported) and its MRC table, every method's fine-tuning, the validation sweeps and the test
points (:func:`rift_dist.compare.run_compare` with ``seeds=[s], bases=[b], summarize=False``) -- in
``<run_dir>/seed-<s>/`` (``<run_dir>/base-<b>/seed-<s>/``), side by side with the other jobs (each locks its own
folder).  One summary job, queued with ``afterok`` on every seed job, runs the
comparison over all seeds: everything is on disk by then, so it only reads the results back and writes
``compare/pareto.csv``, ``summary.md``, ``summary.json`` and ``pareto.png`` (on the CPU partition, without a
GPU).  The MLflow parent run is created here, before the first ``sbatch``; the seed jobs add their children
under it and the summary job ends it.  Seed jobs take the profile's ``finetune`` resources (one rank: a
comparison's fine-tunings are single-module or all-layer runs of one model), the summary job the ``gather``
ones.  A failed ``sbatch`` cancels the jobs this submission queued.

With the ``local`` / ``debug`` executors the same jobs run on this machine one after the other.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import submitit

from rift_dist.atomic import write_json
from rift_dist.cluster.profile import ClusterError, Profile, Resources

SUBMISSION_FILE = Path("compare") / "submission.json"


class CompareJob(submitit.helpers.Checkpointable):
    """One job of a submitted comparison: a (base, seed) (``seed`` given) or the summary over every one (``seed=None``).

    Checkpointable: when SLURM signals the job before its time limit or on preemption, submitit requeues the
    same call; the comparison resumes from what is on disk (finished stages, fine-tunings and points).
    """

    def __call__(self, cfg, run_dir: str, seed: int | None = None, base: str | None = None) -> dict:
        from rift_dist.compare import run_compare

        if seed is not None:
            return run_compare(copy.deepcopy(cfg), run_dir, progress=False, seeds=[seed], summarize=False,
                               bases=[base] if base else None)
        return {"verdict": run_compare(copy.deepcopy(cfg), run_dir, progress=False)["verdict"]}


def _one_rank(res: Resources, what: str) -> Resources:
    if res.nodes * res.ranks_per_node() != 1:
        raise ClusterError(
            f"rift compare --submit runs each {what} job as one rank, but the profile asks for {res.nodes} node(s) "
            f"x {res.ranks_per_node()} rank(s); set stages.finetune gpus_per_node: 1 (or tasks_per_node: 1) and "
            f"nodes: 1 in the profile, e.g. --profile-set stages.finetune.gpus_per_node=1")
    return res


def _header(what: str, cfg, run_dir: Path, config_path: str | None) -> list[str]:
    from rift_dist.compare import compare_bases

    return [f"# rift compare: {what}", f"# config:  {config_path or '(in memory)'}", f"# run dir: {run_dir}",
            f"# methods: {', '.join(cfg.compare.methods)}",
            f"# AT bases: {', '.join(b.name for b in compare_bases(cfg))}"]


def submit_compare(cfg, profile: Profile, run_dir: str | Path, *, executor: str | None = None, dry_run: bool = False,
                   config_path: str | None = None, log=print) -> dict:
    """Queue the comparison of ``cfg.compare`` as one job per (base, seed) plus a summary job (see the module docstring).

    Args:
        cfg: the run config (its ``compare`` section); profile: the launch profile; run_dir: the comparison's
            directory; executor: slurm, local or debug (default: the profile's); dry_run: print the jobs and
            their sbatch scripts and write nothing; config_path: shown in the scripts' headers.

    Returns:
        {"executor", "jobs": [{"name", "job_id", "seed", "base"}]} (empty job ids under ``dry_run``).

    Raises:
        ConfigError / StageError / CompareError: what ``rift compare`` itself refuses (an imported base's
        checkpoint that is missing or does not fit the model included), before any write;
        ClusterError: a profile that asks for more than one rank per seed job, no SLURM, or a failed sbatch
        (the jobs already queued by this call are cancelled first).
    """
    from rift_dist.cluster.submission import _executor, _scancel, sbatch_script
    from rift_dist.compare import check_compare, compare_bases, compare_seeds, is_flat

    run_dir = Path(run_dir).resolve()
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(run_dir)
    check_compare(cfg)
    kind = executor or profile.executor
    seed_res = _one_rank(profile.resources("finetune"), "seed")
    sum_res = profile.resources("gather")
    python = profile.python or sys.executable
    flat = is_flat(cfg)
    units = [(b.name, s) for b in compare_bases(cfg) for s in compare_seeds(cfg)]  # (base, seed) per job
    names = [f"compare-seed-{s}" if flat else f"compare-{b}-seed-{s}" for b, s in units] + ["compare-summary"]
    whats = [f"seed {s}" if flat else f"base {b}, seed {s}" for b, s in units] + ["summary of every seed"]
    if dry_run:
        log(f"rift compare --submit --dry-run: {len(units)} seed job(s) and a summary job in {run_dir} "
            f"({kind}); nothing is submitted or written")
        for name, what, res in zip(names, whats, [seed_res] * len(units) + [sum_res]):
            script = sbatch_script(res, name, run_dir / "jobs" / name, python, ["<seed jobs>"] if name ==
                                   "compare-summary" else [], None, _header(what, cfg, run_dir, config_path))
            log(f"  {name}: {what}, {res.nodes} node(s) x {res.ranks_per_node()} rank(s), {res.gpus_per_node} GPU(s), "
                f"{res.time_min} min")
            log("\n".join(f"      | {line}" for line in script.splitlines()))
        return {"executor": kind, "jobs": [{"name": n, "job_id": ""} for n in names]}

    from rift_dist.tracking import Tracker

    tracker = Tracker(cfg, run_dir, active=True)  # the parent run, before the first sbatch (jobs continue it)
    tracker.parent.set_tags({"rift.kind": "compare", "rift.run_dir": str(run_dir), "rift.executor": kind})
    tracker.finish("RUNNING", end_parent=False)
    submitted, record = [], {"executor": kind, "submitted_at": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": []}
    try:
        for (b, s), name, what in zip(units, names, whats):
            folder = run_dir / "jobs" / name
            ex = _executor(kind, folder, seed_res, name, python, [], _header(what, cfg, run_dir, config_path))
            job = ex.submit(CompareJob(), cfg, str(run_dir), s, None if flat else b)
            submitted.append(job)
            record["jobs"].append({"name": name, "seed": s, "base": b, "job_id": str(job.job_id)})
            log(f"rift: {name} -> job {job.job_id}")
            if kind != "slurm":
                job.result()  # local / debug: one after the other
        dependency = [str(j.job_id) for j in submitted] if kind == "slurm" else []
        ex = _executor(kind, run_dir / "jobs" / names[-1], sum_res, names[-1], python, dependency,
                       _header("summary of every seed", cfg, run_dir, config_path))
        job = ex.submit(CompareJob(), cfg, str(run_dir), None)
        submitted.append(job)
        record["jobs"].append({"name": names[-1], "job_id": str(job.job_id)})
        log(f"rift: {names[-1]} -> job {job.job_id}" + (f" (after {', '.join(dependency)})" if dependency else ""))
        if kind != "slurm":
            job.result()
    except Exception as exc:
        cancelled, err = _scancel([str(j.job_id) for j in submitted]) if kind == "slurm" else ([], "")
        raise ClusterError(f"rift compare --submit failed after {len(submitted)} job(s) ({exc}); cancelled: "
                           f"{', '.join(cancelled) or 'none'}{'; scancel: ' + err if err else ''}. Fix the cause "
                           f"and submit again: finished seeds are reused") from exc
    write_json(run_dir / SUBMISSION_FILE, record)
    if kind == "slurm":
        log(f"rift: {len(submitted)} job(s) queued; `squeue -u $USER -n {','.join('rift-' + n for n in names)}` "
            f"follows them, the summary lands in {run_dir / 'compare'}")
    return record


def submit_command(args, cfg) -> int:
    """``rift compare CONFIG --submit [--profile P] [--profile-set K=V] [--local|--debug] [--dry-run]``."""
    from rift_dist.cluster.profile import load_profile
    from rift_dist.compare import plan_text

    if args.dry_run:
        print(plan_text(cfg))
    profile = load_profile(args.profile, args.profile_overrides)
    executor = "local" if args.local else "debug" if args.debug else None
    submit_compare(cfg, profile, cfg.run_dir, executor=executor, dry_run=args.dry_run, config_path=args.config)
    return 0
