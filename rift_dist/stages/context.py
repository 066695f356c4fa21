"""The context a stage runs in, and loading the models and state dicts a stage starts from.

A stage is a function ``run(ctx) -> dict`` of the config and the artefacts of
earlier stages (read from the run directory); it writes its own artefacts
into ``<run_dir>/<stage>/`` and the headline tables into ``<run_dir>``
(paths spelled by :class:`rift_dist.layout.RunLayout`).  Its done marker
(:mod:`rift_dist.stages.done_markers`) records what the stage produced and
the config it was produced with, so a re-run skips it.  Stage code never imports
``torch.distributed``: it talks to ``ctx.runtime`` (rank, world size,
collectives) and to the engine that :func:`rift_dist.parallel.parallelize` returns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rift_dist import checkpoint
from rift_dist.config import RunConfig
from rift_dist.layout import RunLayout
from rift_dist.parallel.runtime import Runtime
from rift_dist.models import build_model
from rift_dist.precision import Precision
from rift_dist.stages import StageError
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

    @property
    def layout(self) -> RunLayout:
        """The paths of this run directory (:class:`rift_dist.layout.RunLayout`)."""
        return RunLayout(self.run_dir)

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
    path = ctx.extra.get("at_model") or ctx.layout.model("train")
    return load_state(Path(path), "the adversarially trained model")
