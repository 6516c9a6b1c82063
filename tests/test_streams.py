"""The stages of a stream (prefetching producer, writer thread, device copies) and the fast finiteness check."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from quantkit.streams import Worker, prefetch, to_device, to_host
from quantkit.transforms import all_finite, finite_flag


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


def test_finite_flag_is_all_finite_as_a_tensor():
    x = torch.randn(64, 300)
    cases = [x, torch.full((4, 8), 3e38), torch.ones(10), torch.tensor([1.0, float("nan")])]
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 123] = bad
        cases.append(y)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for c in cases:
            flag = finite_flag(c.to(dev))
            assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag) == all_finite(c)


def test_worker_runs_every_item_in_order_and_close_waits_for_them():
    done = []

    def slow(i):
        time.sleep(0.001)
        done.append(i)
    with Worker(slow, depth=3) as w:
        for i in range(200):
            w.put(i)
    assert done == list(range(200))


def test_worker_bounds_the_items_waiting():
    release = threading.Event()
    started = []

    def blocked(i):
        started.append(i)
        release.wait()
    w = Worker(blocked, depth=2)
    t = threading.Thread(target=lambda: [w.put(i) for i in range(10)])
    t.start()
    time.sleep(0.3)
    assert started == [0] and t.is_alive()     # one in hand, two queued: the fourth put blocks
    release.set()
    t.join()
    w.close()
    assert started == list(range(10))


def test_worker_error_reaches_the_caller_at_the_next_put_or_at_close():
    def fail_on_3(i):
        if i == 3:
            raise OSError("disk full")
    w = Worker(fail_on_3, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(1000):
            w.put(i)
            time.sleep(0.001)
    w.abort()
    w = Worker(fail_on_3, depth=8)
    for i in range(5):
        w.put(i)
    with pytest.raises(OSError, match="disk full"):
        w.close()


def test_worker_context_stops_without_finishing_on_an_exception():
    done = []
    with pytest.raises(KeyError):
        with Worker(lambda i: (time.sleep(0.01), done.append(i)), depth=50, name="quantkit-test-worker") as w:
            for i in range(50):
                w.put(i)
            raise KeyError("stop")
    time.sleep(0.1)
    assert len(done) < 50
    assert not [t for t in threading.enumerate() if t.name == "quantkit-test-worker"]


def test_device_copies_on_cpu_pass_items_through():
    items = [(i, torch.full((3,), float(i))) for i in range(5)]
    got = list(to_device(iter(items), torch.device("cpu")))
    assert [m for m, _ in got] == list(range(5)) and all(torch.equal(a, b) for (_, a), (_, b) in zip(got, items))
    x = torch.arange(4)
    assert to_host(x) is x


@pytest.mark.gpu
def test_device_copies_arrive_intact_and_in_order_on_cuda():
    dev = torch.device("cuda")
    items = [(i, torch.randn(1 << 20).pin_memory()) for i in range(8)]
    out = []
    for i, x in to_device(iter(items), dev):
        out.append((i, to_host(x * 2)))
    torch.cuda.current_stream().synchronize()
    assert [i for i, _ in out] == list(range(8))
    for (_, h), (_, x) in zip(out, items):
        assert h.is_pinned() and torch.equal(h, x * 2)

