"""The gather: phase batches of several workers back into one stream in uniqueId order, with
duplicates dropped, gaps given up on after a timeout, late images passed on, restarts seen."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ptychostream.batch import FrameBatch
from ptychostream.plugins.gather import Gather


def phases(uids, ts=None, version=1) -> FrameBatch:
    """A batch of 4x4 'phase images' whose pixels hold their uniqueId."""
    uids = np.asarray(uids, np.int64)
    data = np.repeat(uids.astype(np.float32), 16).reshape(len(uids), 4, 4)
    b = FrameBatch.from_arrays(data, uids, positions_m=np.c_[uids * 1e-9, -uids * 1e-9],
                               pixel_size_m=7e-9,
                               timestamps=uids * 0.01 if ts is None else ts, phase=data.copy())
    b.extra = [{"ScanId": f"s{u}"} for u in uids]
    b.frames, b.model_version, b.model_name = False, version, f"m{version}"
    return b


class Sink:
    def __init__(self) -> None:
        self.batches: list[FrameBatch] = []

    def __call__(self, b: FrameBatch) -> None:
        self.batches.append(b)

    @property
    def uids(self) -> list[int]:
        return [int(u) for b in self.batches for u in b.unique_ids]


def test_interleaved_workers_come_out_in_order_each_once():
    sink = Sink()
    g = Gather(sink, timeout_s=10)
    # two workers, each frame to one of them (distributor updates 1), batches of 4, out of order
    w1 = [1, 3, 5, 7, 9, 11, 13, 15]
    w2 = [2, 4, 6, 8, 10, 12, 14, 16]
    for chunk in (w2[:4], w1[:4], w1[4:], w2[4:]):
        g.push(phases(chunk))
    g.poll()
    assert sink.uids == list(range(1, 17))
    s = g.stats()
    assert (s["received"], s["released"], s["held"]) == (16, 16, 0)
    assert s["duplicates"] == s["gaps"] == s["late"] == s["restarts"] == 0
    out = sink.batches
    # everything travels with its image: pixels, positions, pixel size, attributes, model
    for b in out:
        assert np.array_equal(b.phase[:, 0, 0], b.unique_ids.astype(np.float32))
        assert np.array_equal(b.data[:, 0, 0], b.unique_ids.astype(np.float32))
        np.testing.assert_allclose(b.positions[:, 0], b.unique_ids * 1e-9)
        assert [e["ScanId"] for e in b.extra] == [f"s{u}" for u in b.unique_ids]
        assert (b.model_version, b.model_name, b.frames) == (1, "m1", False)
        np.testing.assert_allclose(b.timestamps, b.unique_ids * 0.01)
    assert len(out) <= 3, "released as runs, not one image at a time"


def test_in_order_batches_pass_straight_through():
    sink = Sink()
    g = Gather(sink, timeout_s=0.05)
    g.push(phases([11, 12, 13, 14]))
    assert sink.uids == []  # the very first images wait: a smaller uniqueId may be on its way
    time.sleep(0.06)
    g.poll()
    assert sink.uids == [11, 12, 13, 14]
    g.reset()
    g.push(phases([1, 2, 3, 4]))
    assert sink.uids[4:] == [1, 2, 3, 4], "uniqueId 1 starts a stream at once"
    sink.batches.clear()
    nxt = phases([5, 6, 7, 8])
    g.push(nxt)
    assert sink.batches[-1] is nxt, "in order: no wait, no copy"


def test_a_missing_image_is_given_up_after_the_timeout_and_passed_on_if_it_comes_late():
    sink = Sink()
    gaps = []
    g = Gather(sink, timeout_s=0.5, on_gaps=gaps.append)
    g.push(phases([1, 2, 3]))
    g.flush()
    g.push(phases([4, 6, 7]))  # 5 is missing
    assert sink.uids == [1, 2, 3, 4]
    g.poll()
    assert sink.uids == [1, 2, 3, 4], "5 is waited for"
    time.sleep(0.55)
    g.poll()
    assert sink.uids == [1, 2, 3, 4, 6, 7]
    g.push(phases([5]))  # late: released at once, alone
    g.push(phases([8]))
    assert sink.uids == [1, 2, 3, 4, 6, 7, 5, 8]
    s = g.stats()
    assert (s["gaps"], s["late"], s["duplicates"]) == (1, 1, 0) and gaps == [1]


def test_a_late_image_teaches_the_gather_to_wait_longer():
    sink = Sink()
    g = Gather(sink, timeout_s=0.05, max_timeout_s=5.0)
    g.push(phases([1]))
    g.push(phases([3]))  # worker A is ahead; 2 (worker B) lags
    time.sleep(0.06)
    g.poll()
    time.sleep(0.3)
    g.push(phases([2]))  # late by ~0.3 s after the give-up
    assert g.stats()["late"] == 1 and 0.6 < g.timeout_s <= 5.0
    g.push(phases([5]))
    time.sleep(0.05)
    g.poll()  # the same lag again: now waited for
    g.push(phases([4]))
    assert sink.uids == [1, 3, 2, 4, 5] and g.stats()["gaps"] == 1


def test_the_window_bounds_what_is_held():
    sink = Sink()
    g = Gather(sink, window=8, timeout_s=60)
    g.push(phases([1]))
    g.flush()
    g.push(phases(range(3, 12)))  # 9 held waiting for 2: more than the window
    assert sink.uids == [1, *range(3, 12)] and g.stats()["gaps"] == 1


def test_duplicates_are_dropped_and_counted_as_problems_of_the_next_release():
    sink = Sink()
    g = Gather(sink, timeout_s=60)
    g.push(phases([1, 2]))
    g.flush()
    g.push(phases([2]))  # already released: the same image again
    g.push(phases([4]))
    g.push(phases([4]))  # held twice
    g.push(phases([3]))
    assert sink.uids == [1, 2, 3, 4]
    assert g.stats()["duplicates"] == 2
    problems = [p for b in sink.batches for p in b.problems]
    assert sum(n for _, n, _ in problems) == 2
    assert all("duplicate" in r and not malformed for r, _, malformed in problems)


def test_a_restarted_detector_starts_a_new_sequence():
    sink = Sink()
    g = Gather(sink, timeout_s=0.05)
    g.push(phases([1, 2, 3, 4, 5]))
    g.flush()
    g.push(phases([1, 2, 3], ts=np.array([100.0, 100.1, 100.2])))  # same ids, new frames
    time.sleep(0.06)
    g.poll()
    assert sink.uids == [1, 2, 3, 4, 5, 1, 2, 3]
    s = g.stats()
    assert s["restarts"] == 1 and s["duplicates"] == 0 and s["gaps"] == 0


def test_batches_of_different_models_are_not_merged():
    sink = Sink()
    g = Gather(sink, timeout_s=60)
    g.push(phases([1]))
    g.flush()
    g.push(phases([3, 4], version=2))
    g.push(phases([2], version=1))
    assert sink.uids == [1, 2, 3, 4]
    assert [(b.model_version, len(b)) for b in sink.batches[1:]] == [(1, 1), (2, 2)]


@pytest.mark.parametrize(("seed", "window"), [(0, 64), (1, 64), (0, 8), (1, 8)])
def test_random_interleaving_of_four_workers(seed, window):
    rng = np.random.default_rng(seed)
    n = 400
    chunks = []
    for w in range(4):  # worker w gets frames w+1, w+5, ... in batches of 1-6
        mine = list(range(w + 1, n + 1, 4))
        while mine:
            k = int(rng.integers(1, 7))
            chunks.append(mine[:k])
            mine = mine[k:]
    # workers run at their own pace: keep each worker's order, interleave them at random
    order = sorted(range(len(chunks)), key=lambda i: (chunks[i][0] + rng.normal(0, 12)))
    sink = Sink()
    g = Gather(sink, window=window, timeout_s=60)
    for i in order:
        g.push(phases(chunks[i]))
    g.flush()
    s = g.stats()
    assert sorted(sink.uids) == list(range(1, n + 1)), "each image once, none lost"
    assert s["duplicates"] == 0 and s["restarts"] == 0 and s["released"] == n
    if window == 64:  # the window covers the workers' skew: perfect order
        assert sink.uids == list(range(1, n + 1)) and s["gaps"] == 0
    else:  # a skew beyond the window makes images late, out of order but not lost
        assert s["gaps"] > 0 and s["late"] >= s["gaps"]  # (before the stream start is known too)
