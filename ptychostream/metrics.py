"""Accuracy metric: SSIM of two phase maps on their common region, with an explicit data range.

Used everywhere accuracy is reported (validation, QA:SSIM, the demo, benchmarks), so that
every SSIM in the project means the same thing.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


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
) -> float:
    """SSIM (scikit-image) of phase maps ``a`` and ``b`` on their common region.

    ``data_range`` defaults to the peak-to-peak range of ``b`` (the reference) on that region;
    pass it explicitly to compare figures across scans. ``align_offset`` removes the constant
    phase offset between the maps (phase retrieval fixes phase only up to a constant).
    Pixels outside the common region (NaN or masked) are filled with the reference.
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
    win = min(7, *(s if s % 2 else s - 1 for s in a.shape))
    return float(structural_similarity(a, b, data_range=data_range, win_size=max(win, 3)))
