"""The training generator runs a group ahead of the batches (issue 26 item 5) only where
that holds no more memory: the whole split in memory, or hybrid segments that are views of
the mapped store; a disk feed, or hybrid segments read into buffers, stay within two sets.
The stream itself is tested against the reference in test_data.py for every feed."""
from __future__ import annotations

import numpy as np
import pytest

from hpcjobs import cli
from hpcjobs.data import open_store
from hpcjobs.data.feed import Feeder

from conftest import QUICKSTART


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "digits.h5")
    assert cli.main(["prepare", QUICKSTART, "--output", path]) == 0
    data = open_store(path)
    yield data
    data.close()


def _feeder(data, feed):
    return Feeder(data, feed=feed, memory_budget="48KiB", global_batch=32, seed=3)


def test_ahead_where_it_costs_no_memory(store):
    assert _feeder(store, "memory").ahead
    hybrid = _feeder(store, "hybrid")
    assert len(hybrid.plan.segments) > 2 and hybrid.maps(0) and hybrid.ahead
    assert not _feeder(store, "disk").ahead


def test_not_ahead_when_segments_are_read_into_buffers(store):
    f = _feeder(store, "hybrid")
    f.reader.view = lambda lo, hi: None  # a store whose rows cannot be mapped
    assert not f.ahead


@pytest.mark.parametrize("feed", ["hybrid", "memory"])
def test_a_stream_ahead_equals_one_that_is_not(store, feed):
    """The same batches with the generator a group ahead and without (many segment changes)."""
    def take(f, n):
        it = iter(f.train_dataset(0))
        return [tuple(t.numpy() for t in next(it)) for _ in range(n)]

    a, b = _feeder(store, feed), _feeder(store, feed)
    b._ahead = False
    assert a.ahead
    n = 3 * a.steps_per_pass
    for (xa, ya), (xb, yb) in zip(take(a, n), take(b, n)):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
