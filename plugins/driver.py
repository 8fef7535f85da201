"""PluginDriver: what areaDetector's NDPluginDriver does for every plugin, in one place.

A bounded input queue (``push`` never blocks: a full queue counts a drop), a worker thread that
takes whole batches (raw frames are gathered up to ``batch_size``, a partial batch goes after
``flush_s``, so the last frames of a scan are not held back), the plugin's ``process`` on the
batch, and the hand-over of its output to the next stage: data flows one way, each stage
passing its batch to the sinks after it. Frames a plugin cannot use are dropped and counted
with their reason (``FrameBatch.drop``), and the stream goes on.

Status reflects the state now: persistent conditions (no model, input disconnected) stand until
cleared; a transient error (a bad frame) shows for ``error_hold_s``. Repeated problems are
logged as one line per ``log_period_s`` with a count, never one line per frame.

A plugin is any object with ``name`` and ``process(batch) -> FrameBatch`` (optionally
``idle() -> bool``: work for when the queue is empty, True if it did some); it knows nothing of
its host.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ptychostream.batch import FrameBatch

log = logging.getLogger(__name__)

NO_ALARM, MINOR, MAJOR = 0, 1, 2


class FrameError(ValueError):
    """A malformed array (wrong shape or type, missing attributes): dropped, counted, reported."""


class NotReady(RuntimeError):
    """The plugin cannot process now (e.g. no model loaded): the batch is dropped and counted."""


class Plugin(Protocol):
    name: str

    def process(self, batch: FrameBatch) -> FrameBatch: ...


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority (Linux threads have their own): on a few cores a
    later stage then takes what the first stage leaves, instead of stalling it (inference's
    parallel kernels wait for their slowest thread). Best effort: refused or absent, no change."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:
        log.debug("thread priority unchanged: %s", exc)


def name_os_thread() -> None:
    """Give the calling thread its Python name in the OS too (Linux ``comm``, 15 characters), so
    ``top -H`` and /proc/PID/task/*/comm show which stage uses the CPU. Best effort."""
    import ctypes

    try:
        name = threading.current_thread().name.encode()[:15]
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # 15: PR_SET_NAME
    except (AttributeError, OSError, TypeError) as exc:
        log.debug("thread name unchanged: %s", exc)


class RateLimitedLog:
    """One WARNING for the first of a kind of problem, then one summary per ``period_s``."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0) -> None:
        self.logger, self.period_s = logger, period_s
        self._last: dict[str, float] = {}
        self._count: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def first(self, kind: str) -> bool:
        """True the first time ``kind`` is seen (e.g. to log one traceback, not hundreds)."""
        with self._lock:
            if kind in self._last:
                return False
            self._last[kind] = time.monotonic() - self.period_s
            return True

    def warning(self, kind: str, message: str, n: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            self._count[kind] += n
            if last is not None and now - last < self.period_s:
                return
            count = self._count.pop(kind)
            self._last[kind] = now
        more = f" ({count} in the last {self.period_s:.0f} s)" if last is not None else ""
        self.logger.warning("%s%s", message, more)


class PluginDriver:
    """Hosts one plugin: queue, batching worker thread, counters, status with alarm severity.

    ``decode(items) -> FrameBatch`` turns raw frames that ``push`` received (e.g. p4p Values)
    into a batch in the worker, so the producer's callback stays cheap. ``sinks`` receive every
    output batch (the next stage's ``push_batch``, a publisher). ``on_stats(stats)`` is called
    from the worker at most every ``stats_period_s``.

    ``workers`` > 1 runs that many worker threads on one queue, for a plugin whose ``process``
    may run concurrently (onnxruntime sessions release the GIL and allow it): each takes the
    next batch, and outputs reach the sinks in the order the batches were taken. Idle work and
    ticks stay on the first worker."""

    def __init__(self, plugin: Plugin, sinks: list[Callable[[FrameBatch], Any]] | None = None,
                 queue_size: int = 256, batch_size: int = 1, flush_s: float = 0.02,
                 decode: Callable[[list], FrameBatch] | None = None,
                 error_hold_s: float = 5.0, stats_period_s: float = 0.25,
                 on_stats: Callable[[dict], None] | None = None, log_period_s: float = 10.0,
                 max_queue: int = 100_000, nice: int = 0, workers: int = 1) -> None:
        self.plugin = plugin
        self.name = getattr(plugin, "name", "plugin")
        self.sinks = list(sinks or [])
        self.decode = decode
        self.batch_size = max(1, int(batch_size))
        self.flush_s = flush_s
        self.error_hold_s = error_hold_s
        self.stats_period_s = stats_period_s
        self.on_stats = on_stats
        self.max_queue = int(max_queue)
        self.nice = int(nice)  # > 0: this worker yields the CPU to the stages before it
        self.workers = max(1, int(workers))
        self.enabled = True
        self._log = RateLimitedLog(log, log_period_s)
        self._cv = threading.Condition()
        self._items: collections.deque = collections.deque()  # raw frames or FrameBatches
        self._queued = 0  # frames waiting
        self._queue_size = max(1, int(queue_size))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._in_progress = 0  # batches taken and not yet handed over
        self._taken = 0  # batches taken from the queue; their order is the hand-over order
        self._handed = 0  # batches handed to the sinks (or found empty)
        self._order = threading.Condition()
        self._gather = threading.Lock()  # one worker gathers a batch at a time: no interleaving
        self._lock = threading.Lock()
        self._conditions: dict[str, tuple[int, str, str]] = {}
        self._event: tuple[int, str, float, str] | None = None
        self.on_tick: Callable[[], None] | None = None  # after every batch and idle step
        self._last_uid: int | None = None
        self._fast_drops: dict[str, int] = {}
        self._fast_t = 0.0
        self._stats_t = 0.0
        self.reset_counters()

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        """ArrayCounter = 0 (areaDetector semantics): all counters restart."""
        with self._lock:
            self.array_counter = 0
            self.dropped = 0
            self.bad = 0
            self.missed = 0
            self.passed = 0  # passed on unprocessed (e.g. no model: the map still gets them)
            self.received = 0
            self.execution_time_ms = 0.0
            self.unique_id = 0
            self._rate_t, self._rate_n, self.array_rate = time.monotonic(), 0, 0.0

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @queue_size.setter
    def queue_size(self, n: int) -> None:
        n = int(n)
        if not 1 <= n <= self.max_queue:
            raise ValueError(f"QueueSize must be in [1, {self.max_queue}], got {n}")
        with self._cv:
            self._queue_size = n

    @property
    def queued(self) -> int:
        """Frames waiting in this stage's queue."""
        return self._queued

    @property
    def queue_free(self) -> int:
        return max(0, self._queue_size - self._queued)

    def stats(self) -> dict:
        """Counters for the plugin PVs; the rate is measured over windows of >= 1 s."""
        now = time.monotonic()
        status = self.status(now)
        with self._lock:
            dt = now - self._rate_t
            if dt >= 1.0:
                self.array_rate = (self.array_counter - self._rate_n) / dt
                self._rate_t, self._rate_n = now, self.array_counter
            return {
                "ArrayCounter_RBV": self.array_counter,
                "ArrayRate_RBV": round(self.array_rate, 2),
                "DroppedArrays_RBV": self.dropped,
                "BadArrays_RBV": self.bad,
                "MissedArrays_RBV": self.missed,
                "QueueSize": self.queue_size,
                "QueueFree_RBV": self.queue_free,
                "ExecutionTime_RBV": round(self.execution_time_ms, 3),
                "UniqueId_RBV": self.unique_id,
                "Status_RBV": status,
            }

    # ------------------------------------------------------------------ status
    def set_condition(self, key: str, severity: int, message: str, kind: str = "device") -> None:
        """A state that stands until cleared (no model, input disconnected, ...); ``kind`` says
        why for the alarm status (see ptychostream.ioc.pvtable.ALARM_STATUS)."""
        with self._lock:
            self._conditions[key] = (int(severity), message[:250], kind)

    def clear_condition(self, key: str) -> None:
        with self._lock:
            self._conditions.pop(key, None)

    def set_error(self, message: str, severity: int = MAJOR, kind: str = "device") -> None:
        """Report a transient problem on Status_RBV (shown for ``error_hold_s``)."""
        with self._lock:
            self._event = (int(severity), message[:250], time.monotonic(), kind)

    def status(self, now: float | None = None) -> tuple[str, int, str]:
        """(text, severity, kind): the worst standing condition, else a recent error, else OK."""
        now = time.monotonic() if now is None else now
        with self._lock:
            # the worst; at equal severity the detector link first (it explains the rest)
            worst = max(self._conditions.values(), default=None,
                        key=lambda c: (c[0], c[2] == "driver"))
            ev = self._event
        if ev is not None and now - ev[2] <= self.error_hold_s and (worst is None
                                                                   or ev[0] > worst[0]):
            return ev[1], ev[0], ev[3]
        if worst is not None:
            return worst[1], worst[0], worst[2]
        return ("OK" if self.array_counter or self.received else "Idle"), NO_ALARM, "none"

    # ------------------------------------------------------------------ input
    def _count_gap(self, uid: int) -> None:
        last = self._last_uid
        if last is not None and uid > last + 1:
            self.missed += uid - last - 1
        if last is None or uid > last or uid < last - 1_000_000:  # far back: a detector restart
            self._last_uid = uid

    def push(self, item, unique_id: int | None = None) -> bool:
        """Queue one raw frame for the worker; never blocks. ``unique_id``, when known, counts
        gaps in the detector's numbering as missed frames. False when dropped (full/disabled)."""
        with self._lock:
            self.received += 1
            if unique_id is not None:
                self._count_gap(int(unique_id))
        if not self.enabled:
            self._drop_fast("callbacks disabled")
            return False
        with self._cv:
            if self._queued >= self._queue_size:
                full = True
            else:
                full = False
                self._items.append(item)
                self._queued += 1
                self._cv.notify()
        if full:
            self._drop_fast("queue full")
            return False
        return True

    def _drop_fast(self, reason: str) -> None:
        """A drop in the producer's thread (the input callback): counted at once, reported at
        most once a second, so an overloaded input does not slow its own thread further."""
        with self._lock:
            self.dropped += 1
            self._fast_drops[reason] = self._fast_drops.get(reason, 0) + 1
            now = time.monotonic()
            if now - self._fast_t < 1.0:
                return
            self._fast_t, drops, self._fast_drops = now, self._fast_drops, {}
        for why, n in drops.items():
            if why != "callbacks disabled":
                self.set_error(f"dropped: {why} ({n} in the last second)", MINOR)
            self._log.warning(why, f"{self.name}: {n} array(s) dropped: {why}", n)

    def push_batch(self, batch: FrameBatch) -> bool:
        """Queue a whole batch from the stage before; never blocks (full: the batch is dropped)."""
        n = len(batch)
        if not n:
            return True
        with self._lock:
            self.received += n
        if not self.enabled:
            self._drop(n, "callbacks disabled", malformed=False)
            return False
        with self._cv:
            full = self._queued + n > self._queue_size
            if not full:
                self._items.append(batch)
                self._queued += n
                self._cv.notify()
        if full:
            self._drop(n, "queue full", malformed=False)
        return not full

    def reject(self, reason: str) -> None:
        """Count an array the host could not even hand over (malformed on arrival)."""
        with self._lock:
            self.received += 1
        self._drop(1, f"bad array: {reason}", malformed=True)

    def _drop(self, n: int, reason: str, malformed: bool) -> None:
        with self._lock:
            self.dropped += n
            if malformed:
                self.bad += n
        if malformed or reason != "callbacks disabled":
            self.set_error(f"{'bad array' if malformed else 'dropped'}: {reason}"
                           if not reason.startswith(("bad array", "dropped")) else reason,
                           MAJOR if malformed else MINOR)
        kind = reason.split(" (uniqueId")[0].split(":")[0]
        self._log.warning(kind, f"{self.name}: {n} array(s) dropped: {reason}", n)

    # ------------------------------------------------------------------ worker
    def start(self) -> PluginDriver:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"plugin-{self.name}",
                                          daemon=True) for k in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        with self._order:
            self._order.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def idle(self) -> bool:
        """Nothing queued and no batch in progress."""
        return self._queued == 0 and not self._in_progress

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.01)
        return self.idle()

    def _next(self, wait_s: float):
        """(work, seq): the next batch to process, a FrameBatch from the stage before or up to
        batch_size raw frames gathered until ``flush_s`` after the first, and its place in the
        hand-over order. None after ``wait_s`` idle."""
        with self._gather, self._cv:
            if not self._items and not self._cv.wait_for(
                    lambda: self._items or self._stop.is_set(), wait_s):
                return None
            if not self._items:
                return None
            self._in_progress += 1
            seq, self._taken = self._taken, self._taken + 1
            if isinstance(self._items[0], FrameBatch):
                b = self._items.popleft()
                self._queued -= len(b)
                return b, seq
            raw = [self._items.popleft()]
            deadline = time.monotonic() + self.flush_s
            while len(raw) < self.batch_size:
                if self._items and not isinstance(self._items[0], FrameBatch):
                    raw.append(self._items.popleft())
                    continue
                if self._items:  # a batch from upstream waits: do not hold it back
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cv.wait(remaining):
                    if not self._items:
                        break
            self._queued -= len(raw)
            return raw, seq

    def _run(self, worker: int = 0) -> None:
        name_os_thread()
        if self.nice:
            lower_priority(self.nice)
        has_idle = hasattr(self.plugin, "idle") and worker == 0
        wait = 0.1
        while not self._stop.is_set():
            taken = self._next(wait)
            if taken is None:  # nothing queued: the plugin's idle work (e.g. further passes)
                wait = 0.1
                try:
                    if has_idle and not self._stop.is_set() and self.plugin.idle():
                        wait = 0.0  # it had work: look for frames, then go on with it
                except Exception as exc:
                    self._log.warning("idle", f"{self.name}: idle work failed: {exc!r}")
                    self.set_error(f"{exc.__class__.__name__}: {exc}")
                if worker == 0:
                    self._tick()
                continue
            work, seq = taken
            wait = 0.0 if has_idle else 0.1  # after a batch: its idle work at once, if any
            try:
                self._handle(work, seq)
            except Exception as exc:  # never let the worker die: report and go on
                n = len(work)
                if self._log.first(f"fail {exc.__class__.__name__}"):
                    log.exception("%s: batch of %d failed", self.name, n)
                self._drop(n, f"{exc.__class__.__name__}: {exc}", malformed=False)
            finally:
                with self._cv:
                    self._in_progress -= 1
            if worker == 0:
                self._tick()

    def _tick(self) -> None:
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception as exc:
                self._log.warning("tick", f"{self.name}: publishing failed: {exc!r}")
        self._publish_stats()

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_stats is None or (not force and now - self._stats_t < self.stats_period_s):
            return
        self._stats_t = now
        try:
            self.on_stats(self.stats())
        except Exception as exc:
            self._log.warning("stats", f"{self.name}: publishing counters failed: {exc!r}")

    def _handle(self, work, seq: int = 0) -> None:
        """Decode and process one batch, then hand its output to the sinks in its turn."""
        out, dt = None, 0.0
        try:
            batch = work if isinstance(work, FrameBatch) else self.decode(work)
            self._count_problems(batch)
            if not len(batch):
                return
            t0 = time.perf_counter()
            try:
                out = self.plugin.process(batch)
            except NotReady as exc:
                self._drop(len(batch), str(exc), malformed=False)
                return
            dt = time.perf_counter() - t0
            self._count_problems(out)
        finally:
            self._hand_over(seq, out, dt)

    def _hand_over(self, seq: int, out: FrameBatch | None, dt: float) -> None:
        """Wait for the batches taken before this one, then count it and pass it on: with
        several workers the next stage still sees the frames in the order they came."""
        with self._order:
            while self._handed != seq and not self._stop.is_set():
                self._order.wait(0.1)
            try:
                if out is None:
                    return
                skipped = sum(n for _, n in out.skipped)  # passed on, not lost: the next stage
                out.skipped = []  # has them
                done = len(out) - skipped
                with self._lock:
                    self.passed += skipped
                    self.array_counter += done
                    if done:
                        self.execution_time_ms = dt * 1e3 / done
                        self.unique_id = int(out.unique_ids[-1])
                if len(out):
                    for sink in self.sinks:
                        sink(out)
            finally:
                self._handed = max(self._handed, seq + 1)
                self._order.notify_all()

    def _count_problems(self, batch: FrameBatch) -> None:
        for reason, n, malformed in batch.problems:
            self._drop(n, reason, malformed)
        batch.problems = []
