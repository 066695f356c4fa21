"""What every stage shares: the context it runs in, artefact paths, done markers and the LR schedule.

A stage is a function ``run(ctx) -> dict`` of the config and the artefacts of
earlier stages (read from the run directory); it writes its own artefacts
into ``<run_dir>/<stage>/`` and the headline tables into ``<run_dir>``.  A
``done.json`` marker records what the stage produced and the config it was
produced with, so a re-run skips it.  Stage code never imports
``torch.distributed``: it talks to ``ctx.runtime`` (rank, world size,
collectives) and to the engine that :func:`rift_dist.parallel.parallelize` returns.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rift_dist import atomic, checkpoint
from rift_dist.atomic import CorruptFileError, read_json
from rift_dist.config import RunConfig, flatten
from rift_dist.parallel.runtime import Runtime
from rift_dist.models import build_model
from rift_dist.precision import Precision
from rift_dist.stages import STAGES, StageError
from rift_dist.stages import stage as stage_entry
from rift_dist.tracking import Tracker


@dataclass
class StageContext:
    """Everything a stage needs besides the config: where, on which rank, how precise, where to log."""

    cfg: RunConfig
    run_dir: Path
    runtime: Runtime
    tracker: Tracker
    precision: Precision
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    def path(self, *parts: str) -> Path:
        """A path inside the run directory (parents created)."""
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message, flush=True)

    def bar(self, iterable, total: int | None = None, desc: str = ""):
        """Progress on the main process: a tqdm bar on a terminal, a line per 10 % or minute in a log file
        (:func:`rift_dist.progress.progress`); plain iteration elsewhere."""
        if not (self.is_main and self.progress):
            return iterable
        from rift_dist.progress import progress

        return progress(iterable, total=total, desc=desc, stream=sys.stderr)


# ------------------------------------------------------------------------------ done markers


def stage_signature(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The config values that ``stage`` and every stage before it depend on (the table's ``keys``).

    Raises:
        StageError: for an unknown stage name.
    """
    flat = flatten(cfg)
    keys: list[str] = []
    for name in STAGES[: STAGES.index(stage_entry(stage).name) + 1]:
        keys.extend(stage_entry(name).keys)
    return {k: flat[k] for k in sorted(flat) if any(k == p or (p.endswith(".") and k.startswith(p)) or
                                                   (not p.endswith(".") and k.startswith(p)) for p in keys)}


def read_done(ctx: StageContext, stage: str) -> dict | None:
    """The done marker of ``stage`` if it finished with the same relevant config, else None.

    Raises:
        StageError: when the stage finished with a different config (names the changed keys).
    """
    marker = ctx.run_dir / stage / "done.json"
    if not marker.is_file():
        return None
    try:
        data = read_json(marker)
    except CorruptFileError as exc:  # a flipped byte: the stage is redone (from its checkpoints where it has them)
        print(f"rift: WARNING: {exc.path} is corrupt (checksum); stage '{stage}' is run again", file=sys.stderr,
              flush=True)
        return None
    now = json.loads(json.dumps(stage_signature(ctx.cfg, stage), default=str))
    before = data.get("signature", {})
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        later = [s for s in STAGES[STAGES.index(stage) + 1:] if (ctx.run_dir / s).exists()] if stage in STAGES else []
        redo = " ".join(str(ctx.run_dir / s) for s in [stage] + later)
        raise StageError(
            f"stage '{stage}' in {ctx.run_dir} was produced with a different config (changed: {', '.join(changed)}). "
            f"Use a new --run-dir, or delete {redo} to redo it"
            + (" and the stages built on it." if later else ".")
        )
    return data


def stage_done(cfg: RunConfig, run_dir: str | Path, stage: str) -> bool:
    """Whether ``stage`` finished in ``run_dir`` with the same relevant config (its done marker).

    Raises:
        StageError: when it finished with a different config (names the changed keys and the fix).
    """
    from types import SimpleNamespace

    return read_done(SimpleNamespace(cfg=cfg, run_dir=Path(run_dir)), stage) is not None


def write_done(ctx: StageContext, stage: str, outputs: dict) -> None:
    """Record that ``stage`` finished (main process only), atomically."""
    if not ctx.is_main:
        return
    write_json(ctx.path(stage, "done.json"), {"outputs": outputs, "signature": stage_signature(ctx.cfg, stage)})


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, a JSON object with its sha256 (:func:`rift_dist.atomic.write_json`)."""
    atomic.write_json(path, data)


# ------------------------------------------------------------------------------ models


def new_model(ctx: StageContext, state_dict: dict | None = None) -> nn.Module:
    """Build the configured model on the run's device (channels_last when asked), optionally loading a state dict."""
    model = build_model(ctx.cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return ctx.precision.prepare_model(model.to(ctx.device))


def load_state(path: Path, what: str) -> dict:
    """Load a state-dict artefact.

    Raises:
        StageError: when the file is missing (says which stage makes it) or unreadable.
    """
    if not path.is_file():
        raise StageError(f"{what} not found at {path}; run the stage that makes it first (rift run CONFIG runs them all)")
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        raise StageError(f"{what}: {exc}") from exc


def at_state(ctx: StageContext) -> dict:
    """The adversarially trained model's state dict (from the train stage or ``from_checkpoint``).

    ``ctx.extra["at_model"]`` (a path) points elsewhere: ``rift compare`` runs each method's stages in
    ``compare/<method>/`` on the one AT model of the seed's run directory.
    """
    path = ctx.extra.get("at_model") or ctx.run_dir / "train" / "model.pt"
    return load_state(Path(path), "the adversarially trained model")


def multistep_lr(base: float, milestones: list[int], gamma: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based) under a multi-step schedule (decay after each milestone epoch)."""
    return base * gamma ** sum(epoch >= m for m in milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
