"""Named random streams: every random draw of a run besides training's own noise has a name, never an offset.

``stream_seed(seed, "eval-pgd")`` is the base seed of the stream "eval-pgd" of a run with ``seed``; streams
and run seeds never share a seed (the old ``seed + 17`` / ``seed + 29`` offsets did: seed 12's selection
stream was seed 0's sweep stream).  :func:`seed_for` mixes integers (seed, epoch, step, restart, block) into
one 63-bit seed (FNV-1a).  Pure functions of integers: no torch, no state.
"""

from __future__ import annotations

import zlib


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived deterministically from integers (e.g. seed, epoch, step)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


# The random streams a run draws from besides training's own (seed, epoch, step) noise; one name each, so that
# no two uses share a stream for any pair of run seeds (the old ``seed + 17`` / ``seed + 29`` offsets did: seed
# 12's selection stream was seed 0's sweep stream).
RANDOM_STREAMS = ("train-selection", "interpolation-sweep", "mrc-examples", "mrc-noise", "eval-pgd", "eval-pgd-extra",
                  "eval-margin", "sanity-epsilon-sweep", "sanity-eps0", "sanity-square",
                  "compare-random-module", "compare-val-corruption")


def stream_seed(seed: int, stream: str, *parts: int) -> int:
    """The base seed of the named random stream ``stream`` (one of :data:`RANDOM_STREAMS`) of a run with ``seed``.

    ``seed_for(crc32(stream), seed, *parts)``: distinct streams and distinct run seeds give distinct 63-bit
    seeds (up to a hash collision), and the same (seed, stream, parts) always gives the same one.

    Raises:
        ValueError: an unregistered stream name (add it to ``RANDOM_STREAMS`` so that it is listed once).
    """
    if stream not in RANDOM_STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; add it to rift_dist.seeding.RANDOM_STREAMS")
    return seed_for(zlib.crc32(stream.encode()), seed, *parts)
