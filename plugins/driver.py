"""PluginDriver: what areaDetector's NDPluginDriver does for every plugin, in one place.

A bounded input queue (``push`` never blocks: a full queue counts a drop), a worker thread that
takes up to ``batch_size`` arrays (a partial batch goes after ``flush_s``, so the last frames of
a scan are not held back), per-frame checks (malformed arrays are counted, the stream goes on),
the plugin's ``process`` and a sink for its outputs, and the counters behind the plugin PVs.

A plugin is any object with ``name``, ``check(frame) -> Frame`` (raise FrameError for a
malformed array) and ``process(frames) -> list[Frame]``; it knows nothing of its host.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ptychostream.ntndarray import Frame

log = logging.getLogger(__name__)

NO_ALARM, MINOR, MAJOR = 0, 1, 2


class FrameError(ValueError):
    """A malformed array (wrong shape or type, missing attributes): dropped, counted, reported."""


class NotReady(RuntimeError):
    """The plugin cannot process now (e.g. no model loaded): the batch is dropped and counted."""


class Plugin(Protocol):
    name: str

    def check(self, frame: Frame) -> Frame: ...

    def process(self, frames: list[Frame]) -> list[Frame]: ...


class PluginDriver:
    """Hosts one plugin: queue, batching worker thread, counters, status with alarm severity.

    ``decode`` turns what ``push`` receives (e.g. a p4p Value) into a Frame in the worker, so the
    producer's callback stays cheap; a decode failure counts as a malformed array.
    """

    def __init__(self, plugin: Plugin, sink: Callable[[list[Frame]], None] | None = None,
                 queue_size: int = 256, batch_size: int = 1, flush_s: float = 0.02,
                 decode: Callable[[Any], Frame] | None = None, error_hold_s: float = 5.0) -> None:
        self.plugin = plugin
        self.sink = sink
        self.decode = decode
        self.batch_size = max(1, int(batch_size))
        self.flush_s = flush_s
        self.error_hold_s = error_hold_s
        self.enabled = True
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False
        self.reset_counters()
        self.status, self.severity = "Idle", NO_ALARM
        self._error_time = 0.0

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        """ArrayCounter = 0 (areaDetector semantics): all counters restart."""
        with self._lock:
            self.array_counter = 0
            self.dropped = 0
            self.bad = 0
            self.received = 0
            self.execution_time_ms = 0.0
            self.unique_id = 0
            self._rate_t, self._rate_n, self.array_rate = time.monotonic(), 0, 0.0

    @property
    def queue_size(self) -> int:
        return self._q.maxsize

    @queue_size.setter
    def queue_size(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError("QueueSize must be >= 1")
        with self._q.mutex:  # queue.Queue documents maxsize; resize in place, keep what is queued
            self._q.maxsize = int(n)
            self._q.not_full.notify_all()

    @property
    def queue_free(self) -> int:
        return max(0, self._q.maxsize - self._q.qsize())

    def stats(self) -> dict:
        """Counters for the plugin PVs; the rate is measured over windows of >= 1 s."""
        now = time.monotonic()
        with self._lock:
            dt = now - self._rate_t
            if dt >= 1.0:
                self.array_rate = (self.array_counter - self._rate_n) / dt
                self._rate_t, self._rate_n = now, self.array_counter
            if self.severity and now - self._error_time > self.error_hold_s and not self._busy:
                self.status, self.severity = "OK", NO_ALARM
            return {
                "ArrayCounter_RBV": self.array_counter,
                "ArrayRate_RBV": round(self.array_rate, 2),
                "DroppedArrays_RBV": self.dropped,
                "BadArrays_RBV": self.bad,
                "QueueSize": self.queue_size,
                "QueueFree_RBV": self.queue_free,
                "ExecutionTime_RBV": round(self.execution_time_ms, 3),
                "UniqueId_RBV": self.unique_id,
                "Status_RBV": (self.status, self.severity),
            }

    def set_error(self, message: str, severity: int = MAJOR) -> None:
        """Report a problem on Status_RBV (held for ``error_hold_s`` after the last one)."""
        with self._lock:
            self.status, self.severity = message[:200], severity
            self._error_time = time.monotonic()

    def _drop(self, n: int, bad: bool = False) -> None:
        with self._lock:
            self.dropped += n
            if bad:
                self.bad += n

    def reject(self, reason: str) -> None:
        """Count an array the host could not even hand over (malformed on arrival)."""
        self.received += 1
        self._drop(1, bad=True)
        self.set_error(f"bad array: {reason}")

    # ------------------------------------------------------------------ input
    def push(self, item) -> bool:
        """Queue one array for the worker; never blocks. False when dropped (full or disabled)."""
        self.received += 1
        if not self.enabled:
            return False
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            self._drop(1)
            return False

    # ------------------------------------------------------------------ worker
    def start(self) -> PluginDriver:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"plugin-{self.plugin.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def idle(self) -> bool:
        """Nothing queued and no batch in progress."""
        return self._q.empty() and not self._busy

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.01)
        return self.idle()

    def _next_batch(self) -> list:
        """Block for one item, then gather up to batch_size until ``flush_s`` after the first."""
        try:
            first = self._q.get(timeout=0.1)
        except queue.Empty:
            return []
        self._busy = True
        batch = [first]
        deadline = time.monotonic() + self.flush_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._q.get(timeout=remaining) if remaining > 0
                             else self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._handle(batch)
            except Exception as exc:  # never let the worker die: report and go on
                log.exception("%s: batch failed", self.plugin.name)
                self._drop(len(batch))
                self.set_error(f"{exc.__class__.__name__}: {exc}")
            finally:
                self._busy = False

    def _handle(self, batch: list) -> None:
        good: list[Frame] = []
        for item in batch:
            frame = None
            try:
                frame = self.decode(item) if self.decode else item
                good.append(self.plugin.check(frame))
            except Exception as exc:  # FrameError, or anything a decoder raises on bad input
                self._drop(1, bad=True)
                uid = getattr(frame, "unique_id", None)
                self.set_error(f"bad array{'' if uid is None else f' {uid}'}: {exc}")
                log.warning("%s: bad array dropped: %s", self.plugin.name, exc)
        if not good:
            return
        t0 = time.perf_counter()
        try:
            out = self.plugin.process(good)
        except NotReady as exc:
            self._drop(len(good))
            self.set_error(str(exc), MINOR)
            return
        dt = time.perf_counter() - t0
        with self._lock:
            self.array_counter += len(good)
            self.execution_time_ms = dt * 1e3 / len(good)
            self.unique_id = good[-1].unique_id
            if not self.severity:
                self.status = "OK"
        if self.sink is not None and out:
            self.sink(out)
