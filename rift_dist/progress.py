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
