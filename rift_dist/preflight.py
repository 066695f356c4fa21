"""Inputs checked before the first stage starts: unresolved variables, data, corruption sets, checkpoints.

A Tiny-ImageNet paper config with ``RIFT_DATA_ROOT`` unset used to keep the literal
``${RIFT_DATA_ROOT}/Tiny-ImageNet-C``, train, search, fine-tune and sweep for hours, and only then fail
in evaluation.  :func:`input_problems` looks at every input path the requested stages will read, without
reading the data (nothing is unpacked, decoded or written), and returns one line per problem naming the
key, the value and the fix; :func:`check_inputs` raises them all at once.  ``rift run`` and the stage
commands call it before the run directory or MLflow is touched; ``rift submit --dry-run`` prints the same
lines as warnings about what a job will need.
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


def input_problems(cfg, stages) -> list[str]:
    """Problems with the inputs the given stages will read (empty when all is in place).

    Checked: unresolved variables in any path field; the data set location (``data.archive`` file, else
    ``data.root`` / env ``RIFT_DATA_ROOT`` directory; a relative ``data.root`` inside an archive is
    checked when the archive is unpacked); ``data.corruption_root`` when ``evaluate`` runs;
    ``from_checkpoint`` when ``train`` runs.  Nothing is read or written.
    """
    stages = list(stages)
    problems = unresolved_variables(cfg)
    bad_keys = {p.split(" = ", 1)[0] for p in problems}
    d = cfg.data
    if "data.archive" not in bad_keys and "data.root" not in bad_keys:
        if d.archive:
            if not Path(d.archive).expanduser().is_file():
                problems.append(f"data.archive = {d.archive!r}: no such file; point it at the data set's .tar.gz "
                                f"(e.g. ../shared/data/cifar10-jpeg.tar.gz) or set data.root instead")
        else:
            root = d.root or os.environ.get("RIFT_DATA_ROOT", "")
            src = "data.root" if d.root else "env RIFT_DATA_ROOT"
            if not root:
                problems.append("no data location: set data.root (or --set data.root=DIR), env RIFT_DATA_ROOT, "
                                "or data.archive")
            elif not Path(root).expanduser().is_dir():
                problems.append(f"{src} = {root!r}: no such directory; point it at the directory holding the "
                                f"{d.dataset} data")
    if "evaluate" in stages and d.corruption_root and "data.corruption_root" not in bad_keys:
        if not Path(d.corruption_root).expanduser().is_dir():
            problems.append(f"data.corruption_root = {d.corruption_root!r}: no such directory; download the "
                            f"corruption set there, or set data.corruption_root= and data.corruption_generate=true "
                            f"to build a re-generated set")
    if "train" in stages and cfg.from_checkpoint and "from_checkpoint" not in bad_keys:
        if not Path(cfg.from_checkpoint).expanduser().is_file():
            problems.append(f"from_checkpoint = {cfg.from_checkpoint!r}: no such file")
    return problems


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
