"""Inputs checked before the first stage starts: unresolved variables, data, corruption sets, checkpoints.

A Tiny-ImageNet paper config with ``RIFT_DATA_ROOT`` unset used to keep the literal
``${RIFT_DATA_ROOT}/Tiny-ImageNet-C``, train, search, fine-tune and sweep for hours, and only then fail
in evaluation.  :func:`input_problems` looks at every input path the requested stages will read, without
reading the data (nothing is unpacked, decoded or written), and returns one line per problem naming the
key, the value and the fix; :func:`check_inputs` raises them all at once.

:func:`check_run` is the one set of checks every entry point makes before any work: ``rift run`` / the
stage commands (:func:`rift_dist.pipeline.run_pipeline`) and ``rift submit`` (:func:`rift_dist.cluster.submission.submit`,
before the first job is queued).  It refuses config errors the loader cannot see (:func:`check_config`:
FFCV settings and availability, the ``eval`` section, module names) and the input paths above;
``rift submit --dry-run`` (and a profile with ``check_paths: false``) prints the path problems as warnings
about what a job will need instead of refusing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rift_dist.config import PATH_KEYS, ConfigError, flatten

_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


class PreflightError(ConfigError):
    """An input a requested stage needs is missing or names an unset variable (every problem is listed)."""


def unresolved_variables(cfg) -> list[str]:
    """One line per path field whose value still holds ``$VAR`` / ``${VAR}`` after expansion (VAR unset)."""
    out = []
    for key, value in flatten(cfg).items():
        if key.split(".")[-1] not in PATH_KEYS or not isinstance(value, str):
            continue
        for name in dict.fromkeys(_VAR.findall(value)):
            out.append(f"{key} = {value!r}: environment variable {name} is not set; export {name}=DIR "
                       f"(or --set {key}=PATH)")
    return out


def _relative_note(value: str) -> str:
    """`` (relative to the current directory: /abs/path)`` for a relative path, else ``""``: a relative data path
    is read from where ``rift`` runs, not from the config file's folder, which the message did not say."""
    path = Path(value).expanduser()
    return "" if path.is_absolute() else f" (relative to the current directory: {Path.cwd() / path})"


def run_dir_problem(run_dir: str | Path) -> str | None:
    """Why ``run_dir`` cannot be used as a run directory, or None (nothing is created).

    Refused: a path that exists and is not a directory, a path below a file, an existing directory this
    process cannot write, and a missing one whose nearest existing parent it cannot write (so it cannot be
    created).  Without this, ``rift run --run-dir FILE`` ended in a ``FileExistsError`` traceback from the
    run lock, after the config checks had passed.
    """
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        return (f"run directory {path} is a file, not a directory; give another --run-dir (or remove the file, "
                f"if it is not yours to keep)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        return f"run directory {path} cannot be created: {existing} is a file; give another --run-dir"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        return (f"run directory {path} {what} (permissions, or a read-only file system); give a --run-dir you "
                f"can write")
    return None


def input_problems(cfg, stages) -> list[str]:
    """Problems with the inputs the given stages will read (empty when all is in place).

    Checked: unresolved variables in any path field; the data set location (``data.archive`` file, else
    ``data.root`` / env ``RIFT_DATA_ROOT`` directory; a relative ``data.root`` inside an archive is
    checked when the archive is unpacked); ``data.corruption_root`` when ``evaluate`` runs;
    ``from_checkpoint`` when ``train`` runs (that it exists, and :func:`checkpoint_problems`: it is read into
    the configured model on the CPU); the run directory itself (:func:`run_dir_problem`).  No data is read and
    nothing is written.
    """
    from rift_dist.stages import stage

    external = {key for name in stages for key in stage(name).external}  # the stage table's outside inputs
    problems = unresolved_variables(cfg)
    if cfg.run_dir and "run_dir" not in {p.split(" = ", 1)[0] for p in problems}:
        if (problem := run_dir_problem(cfg.run_dir)) is not None:
            problems.append(problem)
    bad_keys = {p.split(" = ", 1)[0] for p in problems}
    d = cfg.data
    if "data.archive" not in bad_keys and "data.root" not in bad_keys:
        if d.archive:
            if not Path(d.archive).expanduser().is_file():
                problems.append(f"data.archive = {d.archive!r}{_relative_note(d.archive)}: no such file; point it at "
                                f"the data set's .tar.gz (e.g. ../shared/data/cifar10-jpeg.tar.gz) or set data.root "
                                f"instead")
        else:
            root = d.root or os.environ.get("RIFT_DATA_ROOT", "")
            src = "data.root" if d.root else "env RIFT_DATA_ROOT"
            if not root:
                problems.append("no data location: set data.root (or --set data.root=DIR), env RIFT_DATA_ROOT, "
                                "or data.archive")
            elif not Path(root).expanduser().is_dir():
                problems.append(f"{src} = {root!r}{_relative_note(root)}: no such directory; point it at the "
                                f"directory holding the {d.dataset} data")
    if "data.corruption_root" in external and d.corruption_root and "data.corruption_root" not in bad_keys:
        if not Path(d.corruption_root).expanduser().is_dir():
            problems.append(f"data.corruption_root = {d.corruption_root!r}: no such directory; download the "
                            f"corruption set there, or set data.corruption_root= and data.corruption_generate=true "
                            f"to build a re-generated set")
    if "from_checkpoint" in external and cfg.from_checkpoint and "from_checkpoint" not in bad_keys:
        if not Path(cfg.from_checkpoint).expanduser().is_file():
            problems.append(f"from_checkpoint = {cfg.from_checkpoint!r}: no such file")
        else:
            problems.extend(checkpoint_problems(cfg))
    return problems


def checkpoint_problems(cfg) -> list[str]:
    """``from_checkpoint`` read into the configured model on the CPU: one line when it is unreadable or does not
    fit (the train stage found that only after the run directory and its MLflow run were made), else none."""
    from rift_dist.models import build_model
    from rift_dist.models.convert import load_external_checkpoint
    from rift_dist.errors import RiftError

    try:
        load_external_checkpoint(Path(cfg.from_checkpoint).expanduser(), build_model(cfg))
    except RiftError as exc:
        return [f"from_checkpoint = {cfg.from_checkpoint!r}: {exc}"]
    return []


def check_module_names(cfg) -> None:
    """Fail before any work when ``finetune.modules``, ``mrc.modules`` or ``mrc.exclude`` names a module the
    model lacks (``mrc.exclude`` was checked only when the MRC stage chose the module, after training).

    Builds the configured model on the CPU (only when one of the lists is set) and compares the
    names with :func:`rift_dist.models.module_names` (the Conv2d/Linear layers, RiFT §3.2).

    Raises:
        ConfigError: naming the key, the unknown name(s), the architecture and the valid names.
    """
    lists = {"finetune.modules": cfg.finetune.modules, "mrc.modules": cfg.mrc.modules,
             "mrc.exclude": [n for n in cfg.mrc.exclude if n not in ("first", "last")]}
    if not any(lists.values()):
        return
    from rift_dist.models import build_model, module_names

    names = module_names(build_model(cfg))
    for key, wanted in lists.items():
        unknown = [n for n in wanted if n not in names]
        if unknown:
            extra = "first, last, " if key == "mrc.exclude" else ""
            raise ConfigError(f"{key}: no module named {', '.join(map(repr, unknown))} in {cfg.model.arch}; "
                              f"valid modules: {extra}{', '.join(names)}")


def check_corruption_names(cfg) -> None:
    """Fail before any work when ``data.corruptions`` names a corruption there is none of (it was refused only
    when the evaluation stage, or ``rift compare``'s sweep, built the corruption sets, after training).

    Raises:
        ConfigError: naming the unknown name(s) and the valid ones.
    """
    from rift_dist.data.corruptions import AUTHORS_CORRUPTIONS

    unknown = [c for c in cfg.data.corruptions if c not in AUTHORS_CORRUPTIONS]
    if unknown:
        raise ConfigError(f"data.corruptions: unknown corruption(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(AUTHORS_CORRUPTIONS)} (or leave it empty for the standard 15)")


def check_config(cfg, world_size: int | None = None) -> None:
    """The config checks that need more than the config file: run by ``rift run`` and ``rift submit`` alike.

    * FFCV (:func:`rift_dist.data.ffcv.loader.check_ffcv_config`): ``data.loader: ffcv`` while FFCV cannot
      be imported, ``data.order: quasi_random`` with more than one rank (``world_size``; None = from the
      launcher's environment), storage and JPEG quality.  Skipped when the FFCV module itself cannot be
      imported (then ``data.loader: ffcv`` fails in the loader with the install command).
    * The ``eval`` section (:func:`rift_dist.eval.protocol.validate_eval_config`): ``eval.corruption_protocol``,
      the AutoAttack names, step counts - checked here, not first in the evaluation stage hours later.
    * Corruption names (:func:`check_corruption_names`): every ``data.corruptions`` entry exists.
    * Module names (:func:`check_module_names`): ``finetune.modules`` / ``mrc.modules`` / ``mrc.exclude``
      exist in the model.

    Nothing is read from the data or written.

    Raises:
        ConfigError: the first problem, naming the key, the value and the fix.
    """
    try:
        from rift_dist.data.ffcv.loader import check_ffcv_config
    except ImportError:
        check_ffcv_config = None
    if check_ffcv_config is not None:
        check_ffcv_config(cfg, world_size)
    from rift_dist.eval.protocol import validate_eval_config

    validate_eval_config(cfg)
    check_corruption_names(cfg)
    check_module_names(cfg)


def check_run(cfg, stages, world_size: int | None = None, refuse_paths: bool = True) -> list[str]:
    """Every check made before the first stage runs (``rift run``) or the first job is queued (``rift submit``).

    :func:`check_config`, then :func:`input_problems` for ``stages``.

    Args:
        cfg: a RunConfig.
        stages: the stages that will run (their inputs are checked).
        world_size: ranks of the largest job (None = from the environment); for the FFCV order check.
        refuse_paths: raise on a missing input path (default); False returns the problems instead
            (``rift submit --dry-run`` prints them as warnings).

    Returns:
        the input-path problems (always empty when ``refuse_paths``).

    Raises:
        ConfigError: a config problem (see :func:`check_config`).
        PreflightError: missing inputs, when ``refuse_paths`` (lists every one).
    """
    check_config(cfg, world_size)
    if refuse_paths:
        check_inputs(cfg, stages)
        return []
    return input_problems(cfg, stages)


def check_inputs(cfg, stages) -> None:
    """Raise :class:`PreflightError` listing every problem of :func:`input_problems` (nothing is written)."""
    problems = input_problems(cfg, stages)
    if problems:
        raise PreflightError("inputs the run needs are missing (nothing was started):\n  - " + "\n  - ".join(problems))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup quotas are not read)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
