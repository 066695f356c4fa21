"""Progress for terminals and for log files.

On a terminal, a tqdm bar (it redraws one line with ``\\r``).  When the stream is not a terminal (a SLURM
log, ``make run > log``, CI), tqdm would write every redraw into the file; instead :func:`progress`
prints one plain line every ``every_fraction`` of the loop or every ``every_s`` seconds, whichever comes
first, with the rate and the loop's ETA, and one line at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO


def _fmt(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def log_lines(iterable: Iterable, total: int | None, desc: str, stream: TextIO, every_fraction: float = 0.1,
              every_s: float = 60.0) -> Iterator:
    """Yield from ``iterable``, printing '<desc>: i/total (p%), rate, ETA' lines to ``stream`` now and then."""
    t0 = last = time.monotonic()
    step = max(1, int(total * every_fraction)) if total else None
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        due = (step is not None and done % step == 0) or now - last >= every_s
        if due and (total is None or done < total):
            rate = done / max(now - t0, 1e-9)
            eta = f", ETA {_fmt((total - done) / rate)}" if total else ""
            pct = f" ({100 * done / total:.0f}%)" if total else ""
            stream.write(f"{desc}: {done}/{total or '?'}{pct}, {rate:.2f} it/s{eta}\n")
            stream.flush()
            last = now
    if done:
        stream.write(f"{desc}: {done}/{total or done} done in {_fmt(time.monotonic() - t0)}\n")
        stream.flush()


def progress(iterable: Iterable, total: int | None = None, desc: str = "", stream: TextIO | None = None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :func:`log_lines`."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=stream)
    return log_lines(iterable, total, desc, stream)


BASIS = "work: rift plan's FLOPs, an upper bound for MRC and evaluation"
"""What :class:`PipelineETA`'s default weights are, as its lines say."""


class PipelineETA:
    """The ETA of a whole pipeline from the measured time of the stages that ran, one log line per stage.

    Each stage has a predicted amount of work (``weights``: any unit; :func:`rift_dist.pipeline.stage_weights`
    gives :func:`rift_dist.plan.stage_costs`' FLOPs, the model of ``rift plan``).  After a stage finishes,
    the measured seconds per unit of work of the stages run so far (their total seconds over their total
    work) times the work of the stages still to run is the ETA.  Stages skipped because they were done, and
    stages of weight 0 (e.g. training imported from a checkpoint), count neither as measured nor as remaining.
    Before the first measured stage there is no ETA.

    Args:
        stages: the stages of the pipeline, in order.
        weights: {stage: predicted work >= 0}; a stage missing from it has weight 0.
        clock: seconds (monotonic); replaced in tests.
    """

    def __init__(self, stages, weights: dict, clock=time.monotonic):
        self.stages = list(stages)
        self.weights = {s: float(weights.get(s, 0.0)) for s in self.stages}
        self.clock = clock
        self.t0 = clock()
        self.measured: dict[str, float] = {}
        self.skipped: set[str] = set()
        self.basis = BASIS

    def set_weights(self, weights: dict, basis: str = "") -> None:
        """Replace the predicted work per stage (and say where it comes from in :meth:`line`)."""
        self.weights = {s: float(weights.get(s, 0.0)) for s in self.stages}
        self.basis = basis or BASIS

    def skip(self, stage: str) -> None:
        """``stage`` was already done: it takes no time in this run."""
        self.skipped.add(stage)

    def finish(self, stage: str, seconds: float) -> None:
        """``stage`` ran in ``seconds`` seconds."""
        self.measured[stage] = float(seconds)

    def remaining(self) -> list[str]:
        """Stages neither finished nor skipped, in order."""
        return [s for s in self.stages if s not in self.measured and s not in self.skipped]

    def eta_s(self) -> float | None:
        """Predicted seconds until the last stage ends (0 when none is left; None before a measured stage)."""
        left = self.remaining()
        if not left:
            return 0.0
        ran = [s for s in self.measured if self.weights.get(s, 0.0) > 0]
        work = sum(self.weights[s] for s in ran)
        if not ran or work <= 0:
            return None
        rate = sum(self.measured[s] for s in ran) / work
        return rate * sum(self.weights[s] for s in left)

    def line(self, stage: str) -> str:
        """'[mrc] finished in 39.0s; pipeline 2/5 stage(s), 2.8min elapsed, ETA 2.1min (...)' for a finished stage
        (the '[stage] finished in <seconds>s' head is what log readers parse)."""
        elapsed = self.clock() - self.t0
        done = len(self.measured) + len(self.skipped)
        head = (f"[{stage}] finished in {self.measured.get(stage, 0.0):.1f}s; pipeline {done}/{len(self.stages)} "
                f"stage(s), {_fmt(elapsed)} elapsed")
        eta = self.eta_s()
        left = self.remaining()
        if not left:
            return head + ", all stages done"
        if eta is None:
            return head + f", ETA after the first measured stage ({', '.join(left)} to go)"
        return (head + f", ETA {_fmt(eta)} (total ~{_fmt(elapsed + eta)}) for {', '.join(left)} "
                f"(measured s per predicted work so far x the work left; {self.basis})")
