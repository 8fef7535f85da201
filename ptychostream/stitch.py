"""Stitching: phase images placed on one regular grid at their beam positions, overlaps averaged.

REFERENCE.md step 6. Each image is interpolated (bilinear) onto the map grid at its
off-grid position; the map is sum / count. The live stitching plugin and every
offline stitch (validation, demo) use this one class, so they agree exactly.
"""

from __future__ import annotations

import threading

import numpy as np
from scipy import ndimage

from ptychostream.geometry import frame_corner_px, map_geometry, place_on_grid, snap


class Stitcher:
    """Accumulates phase images on a map that grows as positions arrive.

    ``crop`` keeps only the central ``crop x crop`` pixels of each image (the well-illuminated
    part); None keeps the whole frame, as the paper does.
    """

    def __init__(self, pixel_m: float, frame_size: int = 128, crop: int | None = None,
                 positions_m: np.ndarray | None = None) -> None:
        self.pixel_m = float(pixel_m)
        self.frame_size = frame_size
        self.crop = crop
        self._lock = threading.Lock()
        self.reset(positions_m)

    def reset(self, positions_m: np.ndarray | None = None) -> None:
        """Start a new map; with planned positions the grid is sized for the whole scan at once."""
        with self._lock:
            self.n_frames = 0
            if positions_m is not None and len(positions_m):
                shape, self.origin = map_geometry(positions_m, self.pixel_m, self.frame_size)
                self._sum = np.zeros(shape)
                self._count = np.zeros(shape)
            else:
                self.origin = None
                self._sum = self._count = np.zeros((0, 0))

    @property
    def shape(self) -> tuple[int, int]:
        return self._sum.shape

    def _ensure(self, r0: int, c0: int, h: int, w: int) -> tuple[int, int]:
        """Grow the canvas (keeping its pixel grid) so rows r0..r0+h and cols c0..c0+w fit."""
        rows, cols = self._sum.shape
        top, left = max(0, -r0), max(0, -c0)
        bottom, right = max(0, r0 + h - rows), max(0, c0 + w - cols)
        if top or left or bottom or right:
            pad = ((top, bottom), (left, right))
            self._sum = np.pad(self._sum, pad)
            self._count = np.pad(self._count, pad)
            x0, y0 = self.origin
            self.origin = (x0 - left * self.pixel_m, y0 - top * self.pixel_m)
        return r0 + top, c0 + left

    def add(self, phase: np.ndarray, position_m) -> None:
        """Add one phase image at beam position (x, y) in metres."""
        phase = np.asarray(phase, np.float64)
        n = phase.shape[-1]
        with self._lock:
            if self.origin is None:  # first frame fixes the grid
                half = (n - 1) / 2 * self.pixel_m
                self.origin = (snap(position_m[0] - half, self.pixel_m),
                               snap(position_m[1] - half, self.pixel_m))
                self._sum = np.zeros((n, n))
                self._count = np.zeros((n, n))
            r, c = frame_corner_px(position_m, self.origin, self.pixel_m, n)
            ri, ci = int(np.floor(r)), int(np.floor(c))
            # sub-pixel shift onto the grid: the image's pixel k lands on index r + k
            img = np.pad(phase, ((0, 1), (0, 1)), mode="edge")
            img = ndimage.shift(img, (r - ri, c - ci), order=1, mode="nearest", prefilter=False)
            weight = np.zeros_like(img)
            lo, hi = (0, n) if self.crop is None else ((n - self.crop) // 2, (n + self.crop) // 2)
            weight[lo:hi, lo:hi] = 1.0
            weight = ndimage.shift(weight, (r - ri, c - ci), order=1, mode="constant", prefilter=False)
            ri, ci = self._ensure(ri, ci, n + 1, n + 1)
            win = (slice(ri, ri + n + 1), slice(ci, ci + n + 1))
            self._sum[win] += img * weight
            self._count[win] += weight
            self.n_frames += 1

    def add_many(self, phases: np.ndarray, positions_m: np.ndarray) -> None:
        for p, pos in zip(phases, positions_m, strict=True):
            self.add(p, pos)

    def image(self, min_weight: float = 0.5) -> np.ndarray:
        """The stitched map (float32); NaN where nothing was stitched."""
        with self._lock:
            out = np.full(self._sum.shape, np.nan, np.float32)
            ok = self._count >= min_weight
            out[ok] = self._sum[ok] / self._count[ok]
            return out

    def resample_to(self, shape: tuple[int, int], origin_m) -> np.ndarray:
        """The stitched map on another grid of the same pixel size (e.g. a reconstruction's)."""
        if self.origin is None:
            return np.full(shape, np.nan, np.float32)
        return place_on_grid(self.image(), self.origin, self.pixel_m, shape, origin_m)


def stitch(phases: np.ndarray, positions_m: np.ndarray, pixel_m: float, crop: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Offline stitch of a whole scan: returns (map, origin)."""
    s = Stitcher(pixel_m, phases.shape[-1], crop=crop, positions_m=positions_m)
    s.add_many(phases, positions_m)
    return s.image(), s.origin
