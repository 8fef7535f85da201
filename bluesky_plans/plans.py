"""Bluesky plans: ptychography scans (a Fermat spiral, or any given route) and their stubs.

Every plan is a small generator; side effects go through messages (moves, sets, reads), so a
plan can be inspected with ``bluesky.simulators.summarize_plan`` and ``check_limits`` before it
runs. Positions are in metres in the plans and converted to motor units by the stage. Each
point starts with a checkpoint, so one Ctrl-C pauses a scan at the next point.

    RE(spiral_ptycho_scan(det, stage, n_points=400, overlap=0.9, exposure=0.01, ioc=ioc))
    RE(ptycho_scan(det, stage, np.load("route.npy"), exposure=0.01, ioc=ioc))   # (N, 2) m
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp

from ptychostream.scanfile import check_positions, median_step
from ptychostream.simulation import overlap_ratio, spiral_positions, step_for_overlap

log = logging.getLogger(__name__)

DEFAULT_STEP_M = 50e-9  # the paper's training scans (overlap 0.9 with an 800 nm beam)


# --------------------------------------------------------------------------- geometry
def resolve_step(step: float | None = None, overlap: float | None = None,
                 beam_fwhm: float = 800e-9) -> float:
    """Step size (m) from either ``step`` (m) or a target ``overlap`` ratio; not both.

    Raises ValueError for a missing, non-positive or contradictory request."""
    if beam_fwhm <= 0:
        raise ValueError(f"beam size must be positive, got {beam_fwhm!r} m")
    if step is not None and overlap is not None:
        raise ValueError("give either step or overlap, not both")
    if overlap is not None:
        if not (-10.0 < overlap < 1.0):
            raise ValueError(f"overlap must be below 1 (1 means no motion), got {overlap!r}")
        return step_for_overlap(overlap, beam_fwhm)
    step = DEFAULT_STEP_M if step is None else float(step)
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"step must be a positive length in metres, got {step!r}")
    return step


def spiral_path(n_points: int, step_m: float, center: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(N, 2) beam positions (x, y) in metres of a Fermat spiral around ``center``."""
    if int(n_points) != n_points or n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
    return spiral_positions(int(n_points), step_m) + np.asarray(center, float)


# --------------------------------------------------------------------------- stubs
def configure_detector(detector, exposure: float | None = None, scan_name: str = "",
                       file_path: str | Path | None = None):
    """Set exposure, scan name and file path on the detector (those it has)."""
    if exposure is not None:
        if not (exposure > 0 and math.isfinite(exposure)):
            raise ValueError(f"exposure must be a positive time in seconds, got {exposure!r}")
        cam = getattr(detector, "cam", detector)  # areaDetector: det.cam.acquire_time
        yield from bps.mv(cam.acquire_time, exposure)
    if scan_name and hasattr(detector, "scan_id"):
        yield from bps.mv(detector.scan_id, scan_name)
    if file_path is not None and hasattr(detector, "file_path"):
        yield from bps.mv(detector.file_path, str(file_path))


class PositionTable:
    """Planned positions (N, 2) x, y in metres and the uniqueIds of the frames that will be taken
    there (None: unknown), with a short repr for plan summaries."""

    def __init__(self, positions_m: np.ndarray, unique_ids=None) -> None:
        self.xy = np.asarray(positions_m, np.float64).reshape(-1, 2)
        self.unique_ids = None if unique_ids is None else np.asarray(unique_ids, np.int64)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.xy if dtype is None else self.xy.astype(dtype)

    def __len__(self) -> int:
        return len(self.xy)

    def __repr__(self) -> str:
        return f"<{len(self.xy)} planned positions>"


def _call(fn, *args):
    """Run a quick local function when the RunEngine gets here (None in a dry run)."""
    from ptychostream.bluesky_plans.continual import call

    return (yield from call(fn, *args))


def _poll(read, done, timeout: float, poll: float = 0.05):
    """Poll ``read`` (a plan returning a value) until ``done(value)``; returns the last value,
    None in a dry run. Gives up after ``timeout`` s (the caller says what that means)."""
    deadline = time.monotonic() + timeout
    while True:
        value = yield from read()
        if value is None or done(value) or time.monotonic() > deadline:
            return value
        yield from bps.sleep(poll)


def planned_unique_ids(detector, n: int):
    """The uniqueIds the next ``n`` frames will carry, if the detector knows them (the simulated
    one does); planned positions are then matched by uniqueId, not by arrival order."""
    if not hasattr(detector, "next_unique_ids"):
        return None
    return (yield from _call(detector.next_unique_ids, n))


def prepare_ioc(ioc, positions_m: np.ndarray, unique_ids=None, detector=None,
                timeout: float = 30.0):
    """Make the IOC ready for the first frame of a scan; returns what was seen (a dict).

    1. frames of an earlier scan still queued are finished (queues empty);
    2. the planned positions, with the uniqueIds of the frames to come, go to
       ``Stitch:Positions`` and ``Stitch:Reset`` starts the new map, acknowledged when
       ``Stitch:NumFrames_RBV`` reads 0;
    3. the IOC is connected to the detector's stream (its ``NN:InputConnected_RBV`` where the
       IOC has one, else the detector's own view of its subscribers), so no frame is missed.
    Each wait gives up after ``timeout`` s with a warning: the scan then runs anyway."""
    seen: dict = {}

    def queues_idle():
        free = yield from bps.rd(ioc.nn.queue_free, default_value=None)
        size = yield from bps.rd(ioc.nn.queue_size, default_value=None)
        sfree = yield from bps.rd(ioc.stitch.queue_free, default_value=None)
        ssize = yield from bps.rd(ioc.stitch.queue_size, default_value=None)
        if None in (free, size, sfree, ssize):
            return None
        return int(free) >= int(size) and int(sfree) >= int(ssize)

    idle = yield from _poll(queues_idle, bool, timeout)
    if idle is False:
        log.warning("the IOC still had frames of an earlier scan queued after %.0f s", timeout)
    seen["idle"] = idle
    yield from bps.mv(ioc.stitch.positions, PositionTable(positions_m, unique_ids))
    yield from bps.mv(ioc.stitch.reset, 1)

    def num_frames():
        return (yield from bps.rd(ioc.stitch.num_frames, default_value=None))

    left = yield from _poll(num_frames, lambda v: int(v) == 0, timeout)
    if left not in (None, 0):
        log.warning("Stitch:Reset not acknowledged: Stitch:NumFrames_RBV still %s", left)
    seen["reset"] = None if left is None else left == 0
    seen["input_connected"] = yield from wait_for_input(ioc, detector, timeout)
    return seen


def wait_for_input(ioc, detector=None, timeout: float = 30.0):
    """Wait until the IOC receives the detector's stream. True/False; None when nothing can
    tell (dry run, or neither the IOC nor the detector reports it)."""
    flag = getattr(ioc.nn, "input_connected", None)  # NN:InputConnected_RBV, where served
    if flag is not None:
        def read():
            v = yield from bps.rd(flag, default_value=None)
            return None if v is None else bool(int(v))
    elif detector is not None and hasattr(detector, "has_subscriber"):
        def read():
            return (yield from _call(detector.has_subscriber))
    else:
        return None
    connected = yield from _poll(read, bool, timeout)
    if connected is False:
        log.warning("the IOC is not receiving %s's frames after %.0f s: the first frames of "
                    "the scan may be missed", getattr(detector, "name", "the detector"), timeout)
    return connected


def _ioc_counts(ioc):
    """(frames stitched, frames dropped by either plugin, frames missed) as the IOC says."""
    stitched = yield from bps.rd(ioc.stitch.num_frames, default_value=None)
    if stitched is None:
        return None
    dropped = 0
    for plugin in (ioc.nn, ioc.stitch):  # BadArrays are among the dropped ones
        dropped += int((yield from bps.rd(plugin.dropped_arrays, default_value=0)) or 0)
    missed = None
    sig = getattr(ioc.nn, "missed_arrays", None)  # NN:MissedArrays_RBV, where served
    if sig is not None:
        missed = int((yield from bps.rd(sig, default_value=0)) or 0)
    return int(stitched), dropped, missed


def wait_for_ioc(ioc, n_frames: int, before: tuple | None = None, timeout: float = 60.0,
                 poll: float = 0.2, stall: float = 5.0):
    """Wait until the IOC has stitched, dropped or missed every one of the ``n_frames`` frames
    of this scan, then one stitch update period more, so ``Stitch:Image`` shows the whole scan.

    Stops early when the counts have not moved for ``stall`` s (frames that never arrived),
    at the latest after ``timeout`` s. ``before``: the counts at the start of the scan.
    Returns (and logs) the report: frames sent, stitched, dropped, missed; None in a dry run."""
    start = time.monotonic()
    _, dropped0, missed0 = before or (0, 0, 0)
    last, last_change = None, start
    while True:
        yield from bps.checkpoint()
        counts = yield from _ioc_counts(ioc)
        if counts is None:  # not a live RunEngine (summarize_plan, check_limits)
            return None
        stitched, dropped, missed = counts
        dropped -= dropped0
        missed = None if missed is None else missed - (missed0 or 0)
        accounted = stitched + dropped + (missed or 0)
        now = time.monotonic()
        if counts != last:
            last, last_change = counts, now
        if accounted >= n_frames or now - last_change > stall or now - start > timeout:
            break
        yield from bps.sleep(poll)
    # frames that neither reached the map nor were dropped never arrived: the IOC counts only
    # the gaps it sees between uniqueIds, not the frames after the last one
    missed = max(missed or 0, n_frames - stitched - dropped)
    report = {"sent": int(n_frames), "stitched": stitched, "dropped": dropped,
              "missed": missed, "seconds": round(time.monotonic() - start, 2)}
    level = logging.INFO if stitched == n_frames else logging.WARNING
    log.log(level, "IOC: %d frames sent, %d stitched, %d dropped, %d missed", n_frames,
            stitched, dropped, missed)
    yield from _call(setattr, ioc, "last_report", report)
    period = yield from bps.rd(ioc.stitch.update_period, default_value=0.5)
    yield from bps.sleep(float(period or 0.5) + poll)
    return report


# --------------------------------------------------------------------------- scans
def _check_route(detector, stage, positions, beam_fwhm: float) -> np.ndarray:
    """Unit-checked positions in motor units, every one inside the limits (before the run)."""
    positions = check_positions(positions, getattr(detector, "pixel_m", None), beam_fwhm,
                                what="scan positions")
    targets = positions * stage.units_per_m()
    for motor, values in ((stage.x, targets[:, 0]), (stage.y, targets[:, 1])):
        for v in (values.min(), values.max()):
            motor.check_value(float(v))  # fail before the run opens, not half-way
    return targets


def _field(motor) -> str:
    fields = getattr(motor, "hints", {}).get("fields") or [motor.name]
    return fields[0]


def ptycho_scan(detector, stage, positions, exposure: float | None = None, *, ioc=None,
                beam_fwhm: float = 800e-9, scan_name: str = "",
                file_path: str | Path | None = None, ioc_timeout: float = 60.0,
                ioc_ready_timeout: float = 10.0, md: dict | None = None,
                _plan_md: dict | None = None):
    """Ptychography scan over a given route: move, expose, read at each beam position.

    ``positions``: (N, 2) beam positions x, y in metres (a real scan route; unit-checked, and
    checked against the stage limits before anything moves). ``exposure`` (s) the acquire
    time. With ``ioc``, before the first frame the IOC's map is reset, the planned positions
    (with the frames' uniqueIds) sent and its input checked; its PVs go in the baseline stream,
    and the scan ends once the IOC has accounted for every frame (report in ``ioc.last_report``
    and the log), or when its counts stop moving. ``ioc_ready_timeout`` (s) bounds each wait
    for readiness, ``ioc_timeout`` (s) the wait at the end. The live plot maps
    ``det_total_counts`` over x, y. Returns the run uid."""
    positions = np.asarray(positions, np.float64)
    targets = _check_route(detector, stage, positions, beam_fwhm)
    n_points = len(targets)
    scan_name = scan_name or time.strftime("scan-%Y%m%d-%H%M%S")
    if file_path is None and hasattr(detector, "write_dir"):
        file_path = Path(detector.write_dir) / f"{scan_name}.h5"
    step_m = median_step(positions)
    _md = {
        "plan_name": "ptycho_scan",
        "scan_name": scan_name,
        "detectors": [detector.name],
        "motors": [stage.x.name, stage.y.name],
        "num_points": int(n_points),
        "num_intervals": int(n_points) - 1,
        "step_m": step_m,
        "overlap": overlap_ratio(step_m, beam_fwhm),
        "beam_fwhm_m": beam_fwhm,
        "exposure_s": exposure,
        "scan_file": str(file_path) if file_path else "",
        "plan_args": {"positions": f"<{n_points} positions>", "exposure": exposure},
        "hints": {"dimensions": [([_field(stage.x)], "primary"),
                                 ([_field(stage.y)], "primary")]},
        **(_plan_md or {}),
        **(md or {}),
    }

    yield from configure_detector(detector, exposure, scan_name, file_path)

    def _run():
        for x, y in targets:
            yield from bps.checkpoint()
            yield from bps.mv(stage.x, float(x), stage.y, float(y))
            yield from bps.trigger_and_read([stage, detector])

    @bpp.stage_decorator([detector, stage])
    def _staged():
        before = None
        if ioc is not None:
            uids = yield from planned_unique_ids(detector, n_points)
            yield from prepare_ioc(ioc, positions, uids, detector, timeout=ioc_ready_timeout)
            before = yield from _ioc_counts(ioc)

        @bpp.run_decorator(md=_md)
        def _scan():
            yield from _run()
            if ioc is not None:
                yield from wait_for_ioc(ioc, n_points, before, ioc_timeout)

        plan = _scan()
        if ioc is not None:
            plan = bpp.baseline_wrapper(plan, [ioc])
        return (yield from plan)

    return (yield from _staged())


def spiral_ptycho_scan(detector, stage, n_points: int = 200, step: float | None = None,
                       overlap: float | None = None, exposure: float | None = None, *,
                       ioc=None, center: tuple[float, float] = (0.0, 0.0),
                       beam_fwhm: float = 800e-9, scan_name: str = "",
                       file_path: str | Path | None = None, ioc_timeout: float = 60.0,
                       ioc_ready_timeout: float = 10.0, md: dict | None = None):
    """Spiral ptychography scan: :func:`ptycho_scan` over ``n_points`` Fermat-spiral positions.

    ``step`` (m) or a target ``overlap`` ratio (``1 - sqrt(3) step / beam``) sets the spacing;
    ``exposure`` (s) the acquire time. Returns the run uid."""
    step_m = resolve_step(step, overlap, beam_fwhm)
    positions = spiral_path(n_points, step_m, center)
    plan_md = {
        "plan_name": "spiral_ptycho_scan",
        "step_m": step_m,
        "overlap": overlap_ratio(step_m, beam_fwhm),
        "plan_args": {"n_points": n_points, "step": step, "overlap": overlap,
                      "exposure": exposure, "center": list(center)},
    }
    return (yield from ptycho_scan(detector, stage, positions, exposure, ioc=ioc,
                                   beam_fwhm=beam_fwhm, scan_name=scan_name,
                                   file_path=file_path, ioc_timeout=ioc_timeout,
                                   ioc_ready_timeout=ioc_ready_timeout, md=md, _plan_md=plan_md))
