"""The ``rift submit | status | cancel | report`` subcommands (thin: parse, load, call)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rift_dist.cluster.monitor import cancel, read_submission, status, wait
from rift_dist.layout import SUBMISSION, RunLayout
from rift_dist.cluster.profile import ClusterError, _parse_value, load_profile, profile_from_dict
from rift_dist.cluster.submission import submit
from rift_dist.stages import STAGES

def add_arguments(subparsers) -> None:
    """Add ``submit``, ``status``, ``cancel`` and ``report`` to the ``rift`` command line."""
    p = subparsers.add_parser("submit", help="run the stage graph as SLURM jobs and arrays (submitit)",
                              description="Submit CONFIG as jobs (see launch/*.yaml for profiles). Given a run "
                                          "directory instead of a config, re-submit what is not done there.")
    p.add_argument("config", help="experiment YAML, or a submitted run directory to re-submit what is not done")
    p.add_argument("--profile", help="launch profile YAML (e.g. launch/example_cluster.yaml); default for a run "
                                     "directory: the one it was submitted with")
    p.add_argument("--run-dir", help="where the run lives (default: the config's run_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--profile-set", dest="profile_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile field, e.g. stages.mrc.array_size=8 (repeatable)")
    p.add_argument("--stages", help="comma-separated stages to run (default: all that are not done)")
    p.add_argument("--only", action="append", default=[], metavar="JOB[:NAME,...]",
                   help="submit only this job, or these tasks of an array (module name, alpha, candidate or task "
                        "index), e.g. --only mrc:layer2.1.conv2 (repeatable); nothing after it is submitted")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local", action="store_true", help="run the jobs on this machine (submitit local executor)")
    g.add_argument("--debug", action="store_true", help="run the jobs in this process (submitit debug executor)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and sbatch scripts, submit nothing")
    p.add_argument("--wait", action="store_true", help="after submitting to SLURM, wait for the jobs to end")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    s = subparsers.add_parser("status", help="stages (local run) or jobs (submitted run) and their states; "
                                               "sends pending MLflow writes")
    s.add_argument("run_dir", help="the run directory (as given to rift run / rift submit --run-dir)")
    s.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    c = subparsers.add_parser("cancel", help="cancel the queued and running jobs of a submitted run")
    c.add_argument("run_dir", help=f"the run directory of a submitted run (holds {SUBMISSION})")
    c.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    from rift_dist import paper_table

    paper_table.add_arguments(subparsers.add_parser("report", help="Table 1 of the paper from the runs in MLflow"))


def _submit_command(args) -> int:
    from rift_dist.config import load_config

    target = Path(args.config)
    if target.is_dir():
        record = read_submission(target)
        cfg = load_config(RunLayout(target).config, list(args.overrides))
        run_dir = target
        if args.profile:
            profile = load_profile(args.profile, args.profile_overrides)
        else:
            stored = dict(record.get("profile", {}))
            name = stored.pop("name", "<stored>")
            for item in args.profile_overrides:
                key, _, value = item.partition("=")
                node = stored
                parts_ = key.split(".")
                for part in parts_[:-1]:
                    node = node.setdefault(part, {})
                node[parts_[-1]] = _parse_value(value)
            profile = profile_from_dict(stored, f"{RunLayout(target).submission} (profile {name})")
            profile.name = name
        executor = "local" if args.local else "debug" if args.debug else record.get("executor", profile.executor)
        config_path = record.get("config")
    else:
        cfg = load_config(args.config, list(args.overrides))
        run_dir = Path(args.run_dir or cfg.run_dir)
        profile = load_profile(args.profile, args.profile_overrides)
        executor = "local" if args.local else "debug" if args.debug else profile.executor
        if executor == "slurm" and not args.profile:
            raise ClusterError("a SLURM submission needs a launch profile: --profile launch/<cluster>.yaml (start "
                               "from launch/example_cluster.yaml); or run the jobs here with --local / --debug")
        config_path = str(Path(args.config).resolve())
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else list(STAGES)
    submit(cfg, profile, run_dir, executor=executor, stages=stages, only=args.only or None, dry_run=args.dry_run,
           config_path=config_path)
    if args.wait and executor == "slurm" and not args.dry_run:
        wait(run_dir)
        return 1 if status(run_dir)["failed"] else 0
    return 0


def main(args) -> int:
    """Run ``rift submit|status|cancel|report`` from parsed arguments; returns the exit status."""
    try:
        if args.command == "submit":
            return _submit_command(args)
        if args.command == "status":
            result = status(args.run_dir)
            return 1 if result["failed"] else 0
        if args.command == "cancel":
            cancel(args.run_dir)
            return 0
        if args.command == "report":
            from rift_dist import paper_table

            return paper_table.main(args)
    except ClusterError as exc:
        print(f"rift: {exc}", file=sys.stderr)
        return 2
    raise ClusterError(f"unknown cluster command {args.command!r}")
