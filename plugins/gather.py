"""Gather: the outputs of several inference workers back into one stream, in uniqueId order.

Scale-out workers (``pvapy-hpc-consumer --n-consumers N``, each frame to one of them) publish
their phase images on their own channels, so the IOC receives them interleaved and out of
order. The map cares about order (refinement updates the map in arrival order; planned
positions without uniqueIds are matched by order), so the IOC's external-phase path holds
the images here and releases them in uniqueId order:

* a run of consecutive uniqueIds is released at once, as one batch (no wait when nothing is
  missing: one worker, or the image that completes a run); the first images of a stream wait
  for ``timeout_s`` in case a smaller uniqueId is on its way, unless uniqueId 1 is among them;
* a missing uniqueId is waited for at most ``timeout_s`` (or until ``window`` images are held);
  then the gather gives up on it, counts it in ``gaps`` and goes on with the next one held;
* an image that arrives after its uniqueId was given up on is released at once, alone, and
  counted in ``late`` (it is not lost, only out of order); the wait then grows to twice what
  that image needed (up to ``max_timeout_s``): workers that lag each other by more than the
  wait (deep queues at saturation) keep their order from then on, while a frame really lost
  costs one wait;
* the same image twice (same uniqueId and timestamp, e.g. two workers sharing a frame) is
  dropped and counted in ``duplicates`` (and handed on with the next batch released as a
  problem, so the map stage counts it as dropped); a uniqueId seen before with another
  timestamp is a new sequence (a restarted detector): what is held goes out in order and
  counting restarts.

It holds references to the batches it was given, no copies, and releases whole arrays:
no Python object per frame leaves it. ``poll()`` releases what has waited too long; the host
calls it regularly (the IOC calls it from the map stage's tick). Thread-safe; the sink is
called under the gather's lock, so releases reach it in order.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ptychostream.batch import FrameBatch

log = logging.getLogger(__name__)


class Gather:
    """Reorder buffer between several producers of FrameBatches and one ``sink`` (see module
    docstring). ``window``: most images held while waiting for a missing one; ``timeout_s``:
    longest wait for a missing uniqueId at first (``max_timeout_s`` once late images showed
    that the workers lag each other more); ``memory``: uniqueIds remembered after release, to tell
    duplicates from late images and restarts (default the larger of 16 * window and 8192); an
    image more than ``memory`` uniqueIds behind the stream starts a new sequence."""

    def __init__(self, sink: Callable[[FrameBatch], Any], window: int = 1024,
                 timeout_s: float = 0.25, memory: int | None = None,
                 on_gaps: Callable[[int], Any] | None = None, name: str = "Gather",
                 max_timeout_s: float = 2.0) -> None:
        self.sink = sink
        self.window = max(1, int(window))
        self.base_timeout_s = float(timeout_s)
        self.max_timeout_s = max(float(max_timeout_s), self.base_timeout_s)
        self.memory = int(memory) if memory else max(16 * self.window, 8192)
        self.on_gaps = on_gaps
        self.name = name
        self._lock = threading.RLock()
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything held and seen (counters too): a new stream."""
        with self._lock:
            self.timeout_s = self.base_timeout_s
            self._given_up_at: dict[int, float] = {}
            self._held: dict[int, tuple[FrameBatch, int, float]] = {}
            self._arrivals: collections.deque = collections.deque()  # (time, uid) in arrival order
            self._next: int | None = None
            self._released: dict[int, float] = {}  # uid -> timestamp, the last ``memory``
            self._released_order: collections.deque = collections.deque()
            self._given_up: set[int] = set()
            self._given_up_order: collections.deque = collections.deque()
            self._problems: list[tuple[str, int, bool]] = []
            self.received = self.released = self.duplicates = self.gaps = 0
            self.late = self.restarts = self.max_held = 0

    @property
    def held(self) -> int:
        return len(self._held)

    def stats(self) -> dict:
        with self._lock:
            return {"received": self.received, "released": self.released, "held": self.held,
                    "max_held": self.max_held, "duplicates": self.duplicates, "gaps": self.gaps,
                    "late": self.late, "restarts": self.restarts,
                    "next_unique_id": self._next or 0, "timeout_s": self.timeout_s}

    # ------------------------------------------------------------------ input
    def push(self, batch: FrameBatch) -> None:
        """Take a batch from one producer; releases whatever is now in order."""
        n = len(batch)
        if not n:
            with self._lock:
                self._problems.extend(batch.problems)
            return
        now = time.monotonic()
        with self._lock:
            self.received += n
            self._problems.extend(batch.problems)
            batch.problems = []
            uids = batch.unique_ids
            if (not self._held and self._next is not None and int(uids[0]) == self._next
                    and (n == 1 or bool(np.all(np.diff(uids) == 1)))):
                self._emit([(batch, np.arange(n))], int(uids[-1]) + 1)  # in order already
                return
            for i in range(n):
                self._take(batch, i, int(uids[i]), now)
            self._release(now)

    def _take(self, batch: FrameBatch, i: int, uid: int, now: float) -> None:
        ts = float(batch.timestamps[i])
        if uid in self._held:
            held_batch, j, _ = self._held[uid]
            if float(held_batch.timestamps[j]) == ts:
                self._duplicate(uid)
                return
            self._restart(now)
        elif self._next is not None and uid < self._next:
            seen = self._released.get(uid)
            if seen is None and (uid in self._given_up or uid >= self._next - self.memory):
                self._given_up.discard(uid)  # given up on: late, not lost
                self.late += 1
                gave_up = self._given_up_at.pop(uid, None)
                if gave_up is not None:  # wait longer from now on: the workers lag this much
                    self.timeout_s = min(self.max_timeout_s,
                                         max(self.timeout_s, 2 * (now - gave_up + self.timeout_s)))
                self._emit([(batch, np.array([i]))], self._next)
                return
            if seen == ts:
                self._duplicate(uid)
                return
            self._restart(now)  # seen with another timestamp, or far back: a new sequence
        self._held[uid] = (batch, i, now)
        self._arrivals.append((now, uid))
        self.max_held = max(self.max_held, len(self._held))

    def _duplicate(self, uid: int) -> None:
        self.duplicates += 1
        self._problems.append((f"duplicate phase image (uniqueId {uid})", 1, False))

    def _restart(self, now: float) -> None:
        """A new sequence: what is held goes out in order, then counting starts again."""
        self.restarts += 1
        log.info("%s: uniqueIds restarted: releasing %d held images", self.name, len(self._held))
        self._release(now, everything=True)
        self._next = None
        self._released.clear()
        self._released_order.clear()
        self._given_up.clear()
        self._given_up_order.clear()
        self._given_up_at.clear()

    # ------------------------------------------------------------------ output
    def poll(self) -> None:
        """Release what has waited longer than ``timeout_s`` (call it regularly)."""
        with self._lock:
            if self._held:
                self._release(time.monotonic())

    def flush(self) -> None:
        """Release everything held, in order (the end of a stream)."""
        with self._lock:
            self._release(time.monotonic(), everything=True)

    def _oldest(self) -> float | None:
        while self._arrivals and self._arrivals[0][1] not in self._held:
            self._arrivals.popleft()
        return self._arrivals[0][0] if self._arrivals else None

    def _release(self, now: float, everything: bool = False) -> None:
        out: list[tuple[FrameBatch, np.ndarray]] = []
        nxt = self._next
        if nxt is None and 1 in self._held:
            nxt = 1  # a detector counts from 1 after a start: no need to wait for a smaller one
        while self._held:
            if nxt is None or nxt not in self._held:
                oldest = self._oldest()
                waited = oldest is not None and now - oldest >= self.timeout_s
                if not (everything or waited or len(self._held) > self.window):
                    break
                first = min(self._held)  # give up on the missing ones before it
                if nxt is not None and first > nxt:
                    self._give_up(nxt, first)
                nxt = first
            run = []
            while nxt in self._held:
                run.append(self._held.pop(nxt))
                nxt += 1
            out.extend((b, np.array([i])) for b, i, _ in run)
        if out:
            self._emit(out, nxt)

    def _give_up(self, first_missing: int, next_held: int) -> None:
        n = next_held - first_missing
        self.gaps += n
        now = time.monotonic()
        for uid in range(first_missing, min(next_held, first_missing + self.memory)):
            self._given_up.add(uid)
            self._given_up_order.append(uid)
            if n <= self.window:  # a big jump in the numbering is not a lag to learn from
                self._given_up_at[uid] = now
        while len(self._given_up_order) > self.memory:
            old = self._given_up_order.popleft()
            self._given_up.discard(old)
            self._given_up_at.pop(old, None)
        log.debug("%s: gave up waiting for %d uniqueId(s) from %d", self.name, n, first_missing)
        if self.on_gaps is not None:
            self.on_gaps(n)

    def _emit(self, parts: list[tuple[FrameBatch, np.ndarray]], nxt: int | None) -> None:
        """Hand ``parts`` (batch, indices) to the sink as few batches as can be, in order."""
        if nxt is not None and (self._next is None or nxt > self._next):
            self._next = nxt
        for batch in _merge(parts):
            for uid, ts in zip(batch.unique_ids.tolist(), batch.timestamps.tolist(),
                               strict=True):
                self._released[uid] = ts
                self._released_order.append(uid)
            self.released += len(batch)
            if self._problems:
                batch.problems = [*self._problems, *batch.problems]
                self._problems = []
            self.sink(batch)
        while len(self._released_order) > self.memory:
            self._released.pop(self._released_order.popleft(), None)


def _merge(parts: list[tuple[FrameBatch, np.ndarray]]) -> list[FrameBatch]:
    """Consecutive parts of compatible batches (same model, same kind) as one batch each."""
    if not parts:
        return []
    groups: list[list[tuple[FrameBatch, np.ndarray]]] = [[parts[0]]]
    for b, idx in parts[1:]:
        g = groups[-1]
        last = g[-1][0]
        if last is b:  # frames of one batch in a row: one index array
            g[-1] = (b, np.concatenate([g[-1][1], idx]))
        elif _compatible(last, b):
            g.append((b, idx))
        else:
            groups.append([(b, idx)])
    return [_concat(g) for g in groups]


def _compatible(a: FrameBatch, b: FrameBatch) -> bool:
    return (a.model_version == b.model_version and a.model_name == b.model_name
            and a.frames == b.frames and (a.phase is None) == (b.phase is None)
            and a.data.shape[1:] == b.data.shape[1:] and a.data.dtype == b.data.dtype)


def _concat(group: list[tuple[FrameBatch, np.ndarray]]) -> FrameBatch:
    if len(group) == 1:
        b, idx = group[0]
        if len(idx) == len(b) and bool(np.all(idx == np.arange(len(b)))):
            return b
        return b.select(np.isin(np.arange(len(b)), idx)) if _increasing(idx) else _take(b, idx)
    first = group[0][0]

    def cat(get):
        return np.concatenate([get(b)[idx] for b, idx in group])

    extra = [b.extra[i] if b.extra else {} for b, idx in group for i in idx.tolist()]
    phase = None if first.phase is None else cat(lambda b: b.phase)
    return FrameBatch(cat(lambda b: b.data), cat(lambda b: b.unique_ids),
                      cat(lambda b: b.timestamps), cat(lambda b: b.positions),
                      cat(lambda b: b.pixel_size), extra, phase, first.model_version,
                      first.model_name, frames=first.frames)


def _increasing(idx: np.ndarray) -> bool:
    return len(idx) < 2 or bool(np.all(np.diff(idx) > 0))


def _take(b: FrameBatch, idx: np.ndarray) -> FrameBatch:
    return FrameBatch(b.data[idx], b.unique_ids[idx], b.timestamps[idx], b.positions[idx],
                      b.pixel_size[idx], [b.extra[i] for i in idx.tolist()] if b.extra else [],
                      None if b.phase is None else b.phase[idx], b.model_version, b.model_name,
                      frames=b.frames)
