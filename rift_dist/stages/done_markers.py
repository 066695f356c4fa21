"""Done markers: a stage's ``done.json`` records what it produced and the config values it depends on.

The values are those of the stage table's ``keys`` (:data:`rift_dist.stages.STAGE_TABLE`) of the stage and
of every stage before it, so a changed setting redoes that stage and the ones after it; a re-run with the
same values reuses the stage's outputs (RIFT.md "Stages").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rift_dist.atomic import CorruptFileError, read_json, write_json
from rift_dist.config import RunConfig, flatten
from rift_dist.layout import RunLayout
from rift_dist.stages import STAGES, StageError
from rift_dist.stages import stage as stage_entry


def stage_signature(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The config values that ``stage`` and every stage before it depend on (the table's ``keys`` and the
    ``keys_when`` that apply to ``cfg``).

    Raises:
        StageError: for an unknown stage name.
    """
    flat = flatten(cfg)
    keys: list[str] = []
    for name in STAGES[: STAGES.index(stage_entry(stage).name) + 1]:
        keys.extend(stage_entry(name).keys_for(flat))
    return {k: flat[k] for k in sorted(flat) if any(k == p or (p.endswith(".") and k.startswith(p)) or
                                                   (not p.endswith(".") and k.startswith(p)) for p in keys)}


def read_done(ctx, stage: str) -> dict | None:
    """The done marker of ``stage`` if it finished with the same relevant config, else None.

    ``ctx``: a :class:`~rift_dist.stages.context.StageContext`, or anything with ``cfg`` and ``run_dir``.

    Raises:
        StageError: when the stage finished with a different config (names the changed keys).
    """
    layout = RunLayout(ctx.run_dir)
    marker = layout.done_marker(stage)
    if not marker.is_file():
        return None
    try:
        data = read_json(marker)
    except CorruptFileError as exc:  # a flipped byte: the stage is redone (from its checkpoints where it has them)
        _warn_once(marker, f"{exc.path} is corrupt ({exc.why}); stage '{stage}' is run again")
        return None
    now = json.loads(json.dumps(stage_signature(ctx.cfg, stage), default=str))
    before = data.get("signature", {})
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        later = [s for s in STAGES[STAGES.index(stage) + 1:] if layout.stage_dir(s).exists()] if stage in STAGES else []
        redo = " ".join(str(layout.stage_dir(s)) for s in [stage] + later)
        raise StageError(
            f"stage '{stage}' in {ctx.run_dir} was produced with a different config (changed: {', '.join(changed)}). "
            f"Use a new --run-dir, or delete {redo} to redo it"
            + (" and the stages built on it." if later else ".")
        )
    missing = [rel for rel in essential_outputs(stage) if not (layout.root / rel).is_file()]
    if missing:  # deleted by hand (or lost): the stage is run again and rebuilds them from what is on disk
        _warn_once(marker, f"stage '{stage}' in {ctx.run_dir} is marked done but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} missing; stage '{stage}' is run again")
        return None
    return data


def essential_outputs(stage: str) -> list[str]:
    """The files (relative to the run directory) without which a finished ``stage`` does not count as done:
    those of its stage-table ``writes`` that a stage ``reads``, and its headline tables in the run directory
    (``mrc.csv``, ``interpolation.csv``, ``summary.json``, ``summary.md``).  Folders and figures are not among them.

    Raises:
        StageError: for an unknown stage name.
    """
    entry = stage_entry(stage)
    read = {r for s in STAGES for r in stage_entry(s).reads}
    return [w for w in entry.writes if not w.endswith("/") and (w in read or ("/" not in w and not w.endswith(".png")))]


_warned: set[tuple[str, str]] = set()


def _warn_once(marker: Path, message: str) -> None:
    # read_done runs for the up-front check and again when the stage starts: say it once per process
    if (str(marker), message) not in _warned:
        _warned.add((str(marker), message))
        print(f"rift: WARNING: {message}", file=sys.stderr, flush=True)


def stage_done(cfg: RunConfig, run_dir: str | Path, stage: str) -> bool:
    """Whether ``stage`` finished in ``run_dir`` with the same relevant config (its done marker).

    Raises:
        StageError: when it finished with a different config (names the changed keys and the fix).
    """
    from types import SimpleNamespace

    return read_done(SimpleNamespace(cfg=cfg, run_dir=Path(run_dir)), stage) is not None


def write_done(ctx, stage: str, outputs: dict) -> None:
    """Record that ``stage`` finished (main process only), atomically."""
    if not ctx.is_main:
        return
    marker = {"outputs": outputs, "signature": stage_signature(ctx.cfg, stage)}
    write_json(RunLayout(ctx.run_dir).done_marker(stage), marker)
