"""The prefetching producer thread and the fast finiteness check."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from quantkit.streams import prefetch
from quantkit.transforms import all_finite


def test_prefetch_yields_everything_in_order():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))


def test_prefetch_reraises_the_producers_error_in_the_consumer():
    def items():
        yield 1
        raise ValueError("broken shard")
    got = []
    with pytest.raises(ValueError, match="broken shard"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1]


def test_prefetch_stops_the_producer_when_the_consumer_stops():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i
    for x in prefetch(items(), depth=2):
        if x == 5:
            break
    time.sleep(0.2)
    assert len(produced) < 20
    assert not [t for t in threading.enumerate() if t.name == "quantkit-prefetch"]


def test_prefetch_runs_ahead_by_at_most_depth_items():
    produced = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i
    it = prefetch(items(), depth=4)
    next(it)
    time.sleep(0.2)
    assert len(produced) <= 1 + 4 + 1      # the one taken, the queue, the one waiting to be put
    assert list(it) == list(range(1, 50))


def test_all_finite():
    x = torch.randn(64, 300)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 123] = bad
        assert not all_finite(y)
    huge = torch.full((4, 8), 3e38)          # finite, but the row sums overflow: the exact test decides
    assert all_finite(huge)
    assert all_finite(torch.ones(10)) and not all_finite(torch.tensor([1.0, float("nan")]))
