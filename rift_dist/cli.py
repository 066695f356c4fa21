"""The ``rift`` command line: thin — parse, build, run, tear down.

    rift run CONFIG [--run-dir DIR] [--set key=value ...] [--nproc N] [--from-checkpoint PATH]
    rift train|mrc|finetune|interpolate|evaluate CONFIG [same options]
    rift evaluate CONFIG --checkpoint PATH        evaluate one checkpoint
    rift compare CONFIG [--run-dir DIR] [--nproc N] [--dry-run]   RiFT vs its alternatives (compare/)
    rift plan CONFIG [--set key=value ...]       parameters, modules, FLOPs, predicted GPU time per stage
    rift data corrupt|convert|verify ...
    rift submit|status|cancel|report ...          (SLURM through submitit; MLflow report)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import warnings

from rift_dist.config import ConfigError, load_config
from rift_dist.stages import STAGES

STAGE_COMMANDS = STAGES
"""One subcommand per stage of the stage table (``rift mrc CONFIG`` runs that stage alone)."""


def _nproc(text: str) -> int:
    """``--nproc N``: N >= 1 processes (0 or a negative N used to run in one process, silently)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} processes: give N >= 1 (or leave --nproc out for one process)")
    return n


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (e.g. configs/default.yaml)")
    p.add_argument("--run-dir", help="where the run lives (default: the config's run_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--nproc", type=_nproc, default=0, help="spawn torchrun with N processes on this node")
    p.add_argument("--from-checkpoint", help="start RiFT from this adversarially trained checkpoint (skips training)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


CLUSTER_COMMANDS = {
    "submit": "run the stage graph as SLURM jobs and arrays (submitit)",
    "status": "stages and jobs of a run directory, and send its pending MLflow writes",
    "cancel": "cancel the queued and running jobs of a submitted run",
    "report": "Table 1 of the paper from the runs in MLflow",
}
INSTALL_HINT = {
    "submitit": "pip install submitit (or make install)",
    "ffcv": "bash scripts/install_ffcv.sh .venv/bin/python",
    "deepspeed": "bash scripts/install_deepspeed.sh .venv/bin/python",
}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def _missing_part(exc: ImportError, command: str) -> SystemExit:
    """A loud exit for a subcommand whose optional part cannot be imported, with the install hint."""
    name = (getattr(exc, "name", "") or "").split(".")[0]
    hint = INSTALL_HINT.get(name, "make install")
    print(f"rift: '{command}' needs {name or 'a package'} which cannot be imported ({exc}); install it: {hint}",
          file=sys.stderr)
    return SystemExit(2)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``rift``.

    Only the subcommand named in ``argv`` gets its full arguments; the others are listed with their
    help line only, so ``rift --help`` and ``rift run ...`` import neither torch's data tools nor
    submitit (``rift --help`` takes well under a second).  A subcommand whose optional part (submitit,
    FFCV) is missing exits with status 2 and the install command, instead of silently disappearing.

    Args:
        argv: the command line without the program name (None = every subcommand in full, for docs/tests).
    """
    command = _command_of(argv) if argv is not None else None
    full = argv is None
    parser = argparse.ArgumentParser(prog="rift", description="Robust Critical Fine-Tuning (RiFT), distributed.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole stage graph")
    _add_run_arguments(p)
    for name in STAGE_COMMANDS:
        p = sub.add_parser(name, help=f"run the {name} stage (and nothing else)")
        _add_run_arguments(p)
        if name == "evaluate":
            p.add_argument("--checkpoint", help="evaluate this checkpoint instead of the run's models")
            p.add_argument("--n-examples", type=int, default=None, help="evaluate the first N test images only")
            p.add_argument("--autoattack", action="store_true", help="also run AutoAttack (standard)")
    p = sub.add_parser("compare", help="RiFT against its alternatives (most-critical, random, top-k, all-layers / "
                                       "WiSE-FT, logit mixing) on one AT model; Pareto front and paired CIs")
    _add_run_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan (seeds, methods, evaluations; with "
                                                          "--submit also the jobs and their sbatch scripts) and stop")
    p.add_argument("--submit", action="store_true", help="run it as SLURM jobs: one per seed, then a summary job")
    p.add_argument("--profile", help="launch profile YAML for --submit (e.g. launch/example_cluster.yaml)")
    p.add_argument("--profile-set", dest="profile_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile field for --submit (repeatable)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local", action="store_true", help="with --submit: run the jobs on this machine (submitit)")
    g.add_argument("--debug", action="store_true", help="with --submit: run the jobs in this process (submitit)")
    from rift_dist import plan

    plan.add_arguments(sub.add_parser("plan", help="print what a config costs (parameters, modules, checkpoint "
                                                   "size, FLOPs, predicted H200 time per stage); reads no data"))
    data_help = "data tools: corrupt (CIFAR-10-C style set), convert / verify (FFCV .beton files)"
    if full or command == "data":
        data = sub.add_parser("data", help=data_help).add_subparsers(dest="data_command", required=True)
        try:
            from rift_dist.data.corruptions.generate import add_corrupt_arguments

            add_corrupt_arguments(data.add_parser("corrupt", help="build a CIFAR-10-C style set (.npy layout)"))
            from rift_dist.data.ffcv import write as ffcv_write

            ffcv_write.add_convert_arguments(data.add_parser("convert", help="write FFCV .beton files"))
            ffcv_write.add_verify_arguments(data.add_parser("verify", help="check a .beton file"))
        except ImportError as exc:
            raise _missing_part(exc, "data") from exc
    else:
        sub.add_parser("data", help=data_help)
    if full or command in CLUSTER_COMMANDS:
        try:
            from rift_dist import cluster
        except ImportError as exc:
            raise _missing_part(exc, command or "submit") from exc
        cluster.add_arguments(sub)
    else:
        for name, text in CLUSTER_COMMANDS.items():
            sub.add_parser(name, help=text)
    return parser


def _torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-launch this command under torchrun with ``--nproc`` processes on this node.

    torchrun runs in its own process group, so that a Ctrl-C (the terminal signals its whole foreground
    group) or ``kill -TERM -<pgid>`` reaches it once, from here: SIGTERM / SIGINT reaching this process are
    passed on to torchrun, which passes them on to its workers, whose handlers finish the step, checkpoint
    and exit; this process then returns 128 + the signal (143 / 130).  (In one group torchrun got the
    signal twice -- from the group and from here -- and its second SignalException, raised inside its
    graceful shutdown, ended it at once; the workers, also signalled twice, exited without a checkpoint.)
    A second signal here kills torchrun's group at once.  When this process dies, torchrun gets SIGTERM
    (Linux ``PR_SET_PDEATHSIG``), i.e. the workers still checkpoint and stop.
    """
    import signal

    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "rift_dist.cli", *rest]
    print("rift: launching", " ".join(cmd), flush=True)
    child = subprocess.Popen(cmd, process_group=0, preexec_fn=_terminate_with_parent)  # noqa: PLW1509 - no threads yet
    forwarded: list[int] = []

    def forward(signum, frame):  # noqa: ARG001 - signal protocol
        if forwarded:  # a second signal: stop everything now
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            return
        forwarded.append(signum)
        child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 + forwarded[0] if forwarded and rc else rc


def _terminate_with_parent() -> None:
    """In the torchrun child (before exec): get SIGTERM when the ``rift`` process dies (Linux prctl; else nothing)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.from_checkpoint:
        overrides.append(f"from_checkpoint={args.from_checkpoint}")
    if getattr(args, "n_examples", None) is not None:
        overrides.append(f"eval.n_examples={args.n_examples}")
    if getattr(args, "autoattack", False):
        overrides.append("eval.autoattack=true")
    cfg = load_config(args.config, overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    try:
        from rift_dist.data.ffcv.loader import check_ffcv_config
    except ImportError:
        pass
    else:
        nproc = getattr(args, "nproc", 0) or None
        check_ffcv_config(cfg, nproc)  # e.g. quasi_random order with several ranks -> ConfigError
    return cfg


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_python_formatwarning = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """``rift: warning: <message>`` for rift_dist's own UserWarnings (MLflow unreachable, a param that changed,
    ...); they were printed as Python prints them, with the file, line number and the source line that warned
    (``tracker = Tracker(cfg, run_dir, ...)``) under it.  Other libraries' warnings keep Python's format."""
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        return f"rift: warning: {message}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rift``; returns the exit status."""
    warnings.formatwarning = format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            from rift_dist.data.corruptions.generate import corrupt_command

            if args.data_command == "corrupt":
                return corrupt_command(args)
            from rift_dist.data.ffcv import write as ffcv_write

            return {"convert": ffcv_write.convert_command, "verify": ffcv_write.verify_command}[args.data_command](args)
        if args.command == "plan":
            from rift_dist.plan import plan_command

            return plan_command(args)
        if args.command in ("submit", "status", "cancel", "report"):
            from rift_dist import cluster

            return cluster.main(args)
        if getattr(args, "nproc", 0) and args.nproc > 1 and "RANK" not in os.environ:
            return _torchrun(args, argv)
        cfg = _config(args)
        from rift_dist import interrupts
        from rift_dist.pipeline import run_pipeline

        interrupts.install()  # SIGTERM / SIGINT: checkpoint at the next step, close MLflow runs, exit 143 / 130

        if args.command == "compare" and args.submit:
            from rift_dist.cluster.compare_jobs import submit_command

            return submit_command(args, cfg)
        if args.command == "compare":
            from rift_dist.compare import compare_command

            return compare_command(args, cfg)
        if args.command == "evaluate" and args.checkpoint:
            from rift_dist.evaluate_checkpoint import evaluate_checkpoint

            return evaluate_checkpoint(cfg, args.checkpoint, progress=not args.no_progress)
        stages = None if args.command == "run" else [args.command]
        run_pipeline(cfg, cfg.run_dir, stages or STAGES, progress=not args.no_progress)
        return 0
    except ConfigError as exc:
        print(f"rift: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rift: interrupted — re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # clear one-line errors for the errors we expect
        from rift_dist.interrupts import Interrupted

        if isinstance(exc, Interrupted):
            print(f"rift: {exc}; the checkpoint is written — re-run the same command to resume", file=sys.stderr)
            return exc.exit_code
        from rift_dist.errors import RiftError

        if isinstance(exc, RiftError):
            print(f"rift: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
