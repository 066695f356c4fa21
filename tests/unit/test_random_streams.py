"""Named random streams (issue 12): no two uses of randomness share a stream, for any pair of run seeds."""

from __future__ import annotations

import pytest

from rift_dist.seeding import RANDOM_STREAMS, stream_seed


def test_every_stream_of_every_seed_is_its_own():
    seeds = {(s, name): stream_seed(s, name) for s in range(200) for name in RANDOM_STREAMS}
    assert len(set(seeds.values())) == len(seeds)
    # the old offsets collided: seed 12's selection stream (12 + 17) was seed 0's sweep stream (0 + 29)
    assert stream_seed(12, "train-selection") != stream_seed(0, "interpolation-sweep")
    assert stream_seed(3, "eval-pgd-extra", 20) != stream_seed(3, "eval-pgd-extra", 50)


def test_a_stream_is_reproducible_and_63_bit():
    assert stream_seed(7, "eval-pgd") == stream_seed(7, "eval-pgd")
    assert all(0 <= stream_seed(s, n) < 2 ** 63 for s in (0, 1, 2 ** 40) for n in RANDOM_STREAMS)


def test_an_unregistered_stream_is_refused():
    with pytest.raises(ValueError, match="unknown random stream 'eval-pdg'.*RANDOM_STREAMS"):
        stream_seed(0, "eval-pdg")
