"""Bluesky plans: the spiral ptychography scan and the plan stubs it is made of.

Every plan is a small generator; side effects go through messages (moves, sets, reads), so a
plan can be inspected with ``bluesky.simulators.summarize_plan`` and ``check_limits`` before it
runs. Positions are in metres in the plans and converted to motor units by the stage.

    RE(spiral_ptycho_scan(det, stage, n_points=400, overlap=0.9, exposure=0.01, ioc=ioc))
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp

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
    """Planned positions (N, 2) x, y in metres, with a short repr for plan summaries."""

    def __init__(self, positions_m: np.ndarray) -> None:
        self.xy = np.asarray(positions_m, np.float64).reshape(-1, 2)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.xy if dtype is None else self.xy.astype(dtype)

    def __len__(self) -> int:
        return len(self.xy)

    def __repr__(self) -> str:
        return f"<{len(self.xy)} planned positions>"


def prepare_ioc(ioc, positions_m: np.ndarray):
    """Start a new stitched map on the IOC, sized for the planned positions."""
    yield from bps.mv(ioc.stitch.positions, PositionTable(positions_m))
    yield from bps.mv(ioc.stitch.reset, 1)


def _ioc_lost(ioc):
    """Frames the IOC has dropped or refused so far (both plugins)."""
    total = 0
    for plugin in (ioc.nn, ioc.stitch):
        for attr in ("dropped_arrays", "bad_arrays"):
            sig = getattr(plugin, attr, None)
            if sig is not None:
                value = yield from bps.rd(sig, default_value=None)
                total += int(value or 0)
    return total


def wait_for_ioc(ioc, n_frames: int, lost_before: int = 0, timeout: float = 60.0,
                 poll: float = 0.2):
    """Wait until the IOC has stitched (or lost) ``n_frames`` frames of this scan, then one
    stitch update period more, so ``Stitch:Image`` shows the whole scan. Returns frames stitched.

    Gives up after ``timeout`` s with a warning (the scan itself is complete)."""
    deadline = time.monotonic() + timeout
    stitched = 0
    while True:
        stitched = yield from bps.rd(ioc.stitch.num_frames, default_value=None)
        if stitched is None:  # not a live RunEngine (summarize_plan, check_limits)
            return 0
        lost = (yield from _ioc_lost(ioc)) - lost_before
        if stitched + lost >= n_frames:
            break
        if time.monotonic() > deadline:
            log.warning("IOC stitched %d of %d frames (%d lost) within %.0f s",
                        stitched, n_frames, lost, timeout)
            break
        yield from bps.sleep(poll)
    period = yield from bps.rd(ioc.stitch.update_period, default_value=0.5)
    yield from bps.sleep(float(period or 0.5) + poll)
    return int(stitched)


# --------------------------------------------------------------------------- scan
def spiral_ptycho_scan(detector, stage, n_points: int = 200, step: float | None = None,
                       overlap: float | None = None, exposure: float | None = None, *,
                       ioc=None, center: tuple[float, float] = (0.0, 0.0),
                       beam_fwhm: float = 800e-9, scan_name: str = "",
                       file_path: str | Path | None = None, ioc_timeout: float = 60.0,
                       md: dict | None = None):
    """Spiral ptychography scan: move, expose, read, at ``n_points`` Fermat-spiral positions.

    ``step`` (m) or a target ``overlap`` ratio (``1 - sqrt(3) step / beam``) sets the spacing;
    ``exposure`` (s) the acquire time. Positions are checked against the stage limits before
    anything moves. With ``ioc`` the stitched map is reset (sized for the scan) at the start,
    the IOC's PVs are recorded in the baseline stream, and the scan waits until the IOC has
    stitched every frame. Returns the run uid.
    """
    step_m = resolve_step(step, overlap, beam_fwhm)
    positions = spiral_path(n_points, step_m, center)
    scale = stage.units_per_m()
    targets = positions * scale
    for motor, values in ((stage.x, targets[:, 0]), (stage.y, targets[:, 1])):
        for v in (values.min(), values.max()):
            motor.check_value(float(v))  # fail before the run opens, not half-way
    scan_name = scan_name or time.strftime("scan-%Y%m%d-%H%M%S")
    if file_path is None and hasattr(detector, "write_dir"):
        file_path = Path(detector.write_dir) / f"{scan_name}.h5"
    _md = {
        "plan_name": "spiral_ptycho_scan",
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
        "plan_args": {"n_points": n_points, "step": step, "overlap": overlap,
                      "exposure": exposure, "center": list(center)},
        "hints": {"dimensions": [([stage.x.name], "primary")]},
        **(md or {}),
    }

    yield from configure_detector(detector, exposure, scan_name, file_path)
    lost_before = 0
    if ioc is not None:
        yield from prepare_ioc(ioc, positions)
        lost_before = yield from _ioc_lost(ioc)

    @bpp.stage_decorator([detector, stage])
    @bpp.run_decorator(md=_md)
    def _scan():
        for x, y in targets:
            yield from bps.mv(stage.x, float(x), stage.y, float(y))
            yield from bps.trigger_and_read([stage, detector])
        if ioc is not None:
            yield from wait_for_ioc(ioc, int(n_points), lost_before, ioc_timeout)

    plan = _scan()
    if ioc is not None:
        plan = bpp.baseline_wrapper(plan, [ioc])
    return (yield from plan)
