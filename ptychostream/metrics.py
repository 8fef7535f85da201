"""Accuracy metrics: SSIM, Pearson correlation and MAE of phase maps, over the illuminated area.

Used everywhere accuracy is reported (validation, QA:SSIM, the demo, benchmarks), so that
every figure in the project means the same thing. SSIM alone misleads on a mostly flat sample
(a flat map scores high, a map with a little noise on flat ground scores low; REFERENCE.md),
so :func:`map_figures` gives correlation and MAE beside it and :func:`flat_baseline` the
figures of a constant map.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from ptychostream.geometry import frame_corner_px


def common_region(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> tuple[slice, slice]:
    """Bounding box of the pixels finite in both maps (and in ``mask``)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        ok &= mask
    if not ok.any():
        raise ValueError("the two maps have no common finite region")
    rows, cols = np.nonzero(ok.any(axis=1))[0], np.nonzero(ok.any(axis=0))[0]
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def phase_ssim(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float | None = None,
    mask: np.ndarray | None = None,
    align_offset: bool = True,
    mask_mean: bool = False,
) -> float:
    """SSIM (scikit-image) of phase maps ``a`` and ``b`` on their common region.

    ``data_range`` defaults to the peak-to-peak range of ``b`` (the reference) on that region;
    pass it explicitly to compare figures across scans. ``align_offset`` removes the constant
    phase offset between the maps (phase retrieval fixes phase only up to a constant).
    Pixels outside the common region (NaN or masked) are filled with the reference.
    ``mask_mean``: average the local SSIM over the common pixels only, instead of over their
    bounding box (where the filled pixels would count as perfect agreement).
    """
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    region = common_region(a, b, mask)
    a, b = np.array(a[region], np.float64), np.array(b[region], np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        ok &= mask[region]
    if align_offset:
        a = a - np.median(a[ok] - b[ok])
    a[~ok] = b[~ok] = 0.0
    if data_range is None:
        data_range = float(np.ptp(b[ok])) or 1.0
    win = max(min(7, *(s if s % 2 else s - 1 for s in a.shape)), 3)
    if not mask_mean:
        return float(structural_similarity(a, b, data_range=data_range, win_size=win))
    _, smap = structural_similarity(a, b, data_range=data_range, win_size=win, full=True)
    return float(smap[ok].mean())


def illuminated_mask(
    positions_m: np.ndarray, shape: tuple[int, int], origin_m, pixel_m: float,
    beam_fwhm_m: float = 800e-9, radius_m: float | None = None,
) -> np.ndarray:
    """Map pixels within ``radius_m`` (default half the beam FWHM) of a beam position: the
    area a scan measured, the one every method is scored on. Independent of any probe, so the
    same area holds for truth, network, refinement and iterative maps."""
    r_px = (radius_m if radius_m is not None else beam_fwhm_m / 2) / pixel_m
    seeds = np.ones(shape, bool)
    for p in np.asarray(positions_m, float):
        r, c = frame_corner_px(p, origin_m, pixel_m, 1)
        ri, ci = int(round(r)), int(round(c))
        if 0 <= ri < shape[0] and 0 <= ci < shape[1]:
            seeds[ri, ci] = False
    if seeds.all():
        return np.zeros(shape, bool)
    return ndimage.distance_transform_edt(seeds) <= r_px


def align_median(est: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``est`` minus its median offset from ``truth`` over ``mask`` (finite pixels): phase is
    known only up to a constant, and the median is not pulled by the few wrong pixels."""
    ok = mask & np.isfinite(est) & np.isfinite(truth)
    return est - np.median(est[ok] - truth[ok])


def map_figures(est: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                data_range: float | None = None) -> dict[str, float]:
    """{"ssim", "corr", "mae", "coverage"} of ``est`` against ``truth`` over ``mask``.

    The constant offset is matched by the median; SSIM is :func:`phase_ssim` with the
    truth's range on the mask as data range (so a map and the flat map share one scale),
    averaged over the mask; corr is Pearson's; MAE in rad; coverage the fraction of the mask
    where ``est`` is finite (the figures are over that part)."""
    mask = np.asarray(mask, bool) & np.isfinite(truth)
    ok = mask & np.isfinite(est)
    if not ok.any():
        raise ValueError("the estimate has no finite pixel in the mask")
    if data_range is None:
        data_range = float(np.ptp(truth[mask])) or 1.0
    a = align_median(est, truth, ok)
    x, y = a[ok].astype(np.float64), truth[ok].astype(np.float64)
    sx, sy = x.std(), y.std()
    corr = float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy)) if sx > 0 and sy > 0 else 0.0
    return {
        "ssim": phase_ssim(a, truth, data_range=data_range, mask=ok, align_offset=False,
                           mask_mean=True),
        "corr": corr,
        "mae": float(np.abs(x - y).mean()),
        "coverage": float(ok.sum() / max(mask.sum(), 1)),
    }


def remove_ramp(est: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """(``est`` minus the plane fitted to ``est - truth`` over ``mask``, the plane's slope in rad
    per pixel). A linear phase ramp in the object with the opposite one in the probe (a shift
    of the probe's far field) leaves every diffraction pattern as it was: the one error the
    data cannot tell, so a benchmark reports how much of a map's error it is."""
    ok = np.asarray(mask, bool) & np.isfinite(est) & np.isfinite(truth)
    y, x = np.nonzero(ok)
    a = np.stack([np.ones(len(y)), y, x], axis=1)
    c = np.linalg.lstsq(a, (est - truth)[ok].astype(np.float64), rcond=None)[0]
    yy, xx = np.indices(est.shape)
    return (est - (c[0] + c[1] * yy + c[2] * xx)).astype(np.float32), float(np.hypot(c[1], c[2]))


def flat_baseline(truth: np.ndarray, mask: np.ndarray, data_range: float | None = None) -> dict:
    """The figures of a constant map: what a method must beat to show anything at all."""
    flat = np.zeros_like(truth, dtype=np.float32)
    return map_figures(flat, truth, mask, data_range)


def frame_mae(pred: np.ndarray, truth_crops: np.ndarray, beam: np.ndarray) -> dict[str, float]:
    """Per-frame MAE in the beam (rad), averaged over frames: as predicted ("mae") and with each
    frame's constant offset (its median difference) removed ("mae_offset_removed"): the gap is
    what a single diffraction pattern cannot tell, the offset."""
    beam = np.asarray(beam, bool)
    d = (np.asarray(pred, np.float32) - np.asarray(truth_crops, np.float32))[:, beam]
    off = np.median(d, axis=1, keepdims=True)
    return {"mae": float(np.abs(d).mean()), "mae_offset_removed": float(np.abs(d - off).mean())}
