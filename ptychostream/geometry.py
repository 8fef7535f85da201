"""Where a frame sits on the sample: the one coordinate convention used everywhere.

Positions are beam positions (x, y) in metres, as in the areaDetector attributes
PosX/PosY. A map (simulated truth, reconstruction, stitched image) is a regular
grid whose pixel [row, col] centre lies at ``origin + (col, row) * pixel_size``.
A frame of N x N pixels centred on beam position p has pixel k centred at
``p + (k - (N - 1) / 2) * pixel_size`` along each axis.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def object_pixel_size(
    energy_ev: float, distance_m: float, detector_pixel_m: float, frame_size: int
) -> float:
    """Far-field sampling: object pixel = wavelength * distance / (N * detector pixel)."""
    wavelength = 1.239841984e-6 / energy_ev
    return wavelength * distance_m / (frame_size * detector_pixel_m)


def map_geometry(
    positions_m: np.ndarray, pixel_m: float, frame_size: int, margin_px: int = 0
) -> tuple[tuple[int, int], tuple[float, float]]:
    """Shape (rows, cols) and origin (x0, y0) of a map that holds every frame of a scan.

    The origin snaps to the global lattice (whole multiples of the pixel size), so every map of
    the same pixel size (live, offline, truth) shares one grid and differs only in extent."""
    pos = np.asarray(positions_m, float)
    half = (frame_size - 1) / 2 + margin_px + 1
    x0 = snap(pos[:, 0].min() - half * pixel_m, pixel_m)
    y0 = snap(pos[:, 1].min() - half * pixel_m, pixel_m)
    cols = int(np.ceil((pos[:, 0].max() - x0) / pixel_m + half)) + 1
    rows = int(np.ceil((pos[:, 1].max() - y0) / pixel_m + half)) + 1
    return (rows, cols), (float(x0), float(y0))


def snap(coord_m: float, pixel_m: float) -> float:
    """Largest lattice point (a whole multiple of ``pixel_m``) at or below ``coord_m``."""
    return float(np.floor(coord_m / pixel_m + 1e-9) * pixel_m)


def frame_corner_px(
    position_m, origin_m, pixel_m: float, frame_size: int
) -> tuple[float, float]:
    """Fractional map index (row, col) of a frame's pixel [0, 0]."""
    x, y = position_m
    half = (frame_size - 1) / 2
    return (y - origin_m[1]) / pixel_m - half, (x - origin_m[0]) / pixel_m - half


def place_on_grid(
    image: np.ndarray, origin_m, pixel_m: float, shape: tuple[int, int], target_origin_m
) -> np.ndarray:
    """``image`` (pixel [0, 0] at ``origin_m``) on another grid of the same pixel size.

    Maps share one lattice (see :func:`map_geometry`), so this is a whole-pixel copy of the
    overlap, NaN elsewhere; an off-lattice origin is interpolated (bilinear)."""
    img = np.asarray(image, np.float32)
    out = np.full(shape, np.nan, np.float32)
    dr = (origin_m[1] - target_origin_m[1]) / pixel_m
    dc = (origin_m[0] - target_origin_m[0]) / pixel_m
    if abs(dr - round(dr)) > 1e-3 or abs(dc - round(dc)) > 1e-3:
        rr, cc = np.indices(shape, dtype=np.float64)
        return ndimage.map_coordinates(img, [rr - dr, cc - dc], order=1, cval=np.nan,
                                       mode="constant", prefilter=False).astype(np.float32)
    dr, dc = int(round(dr)), int(round(dc))
    r0, c0 = max(0, dr), max(0, dc)
    r1, c1 = min(shape[0], dr + img.shape[0]), min(shape[1], dc + img.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = img[r0 - dr : r1 - dr, c0 - dc : c1 - dc]
    return out


def crop_at(
    image: np.ndarray, positions_m: np.ndarray, origin_m, pixel_m: float, frame_size: int,
    order: int = 1,
) -> np.ndarray:
    """Interpolate ``image`` on the N x N grid centred on each beam position (off-grid positions
    included): returns (len(positions), N, N). Used for simulated frames, truth crops and labels."""
    pos = np.atleast_2d(np.asarray(positions_m, float))
    k = np.arange(frame_size, dtype=np.float64)
    out = np.empty((len(pos), frame_size, frame_size), np.result_type(image.dtype, np.float32))
    for i, p in enumerate(pos):
        r0, c0 = frame_corner_px(p, origin_m, pixel_m, frame_size)
        rr, cc = np.meshgrid(r0 + k, c0 + k, indexing="ij")
        out[i] = ndimage.map_coordinates(image, [rr, cc], order=order, mode="nearest", prefilter=False)
    return out


# --------------------------------------------------------------------------- the ramp ambiguity
# A linear phase ramp in the object with the opposite one in the probe (a shift of the probe's
# far field) gives every frame the same intensities: the frames cannot tell it, so a learning
# probe drifts into one and the map carries it (README, "The live map"). The labels take the
# map's ramp out (ptychostream.hpc.labels.align_phase); reconstructions and the live refiner
# hand it to the probe (move_ramp_to_probe), which keeps the pair as good a fit as before.
def median_phase_gradient(obj: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The linear phase ramp of the complex ``obj`` over ``mask``, rad/px along rows and
    columns: the median phase difference between neighbours (edges of features rise and fall
    in equal measure, so the median sees only the ramp, where a least-squares plane would be
    pulled by where the features lie)."""
    obj, mask = np.asarray(obj), np.asarray(mask, bool)
    g_r = np.angle(obj[1:, :] * np.conj(obj[:-1, :]))[mask[1:, :] & mask[:-1, :]]
    g_c = np.angle(obj[:, 1:] * np.conj(obj[:, :-1]))[mask[:, 1:] & mask[:, :-1]]
    return float(np.median(g_r)), float(np.median(g_c))


def move_ramp_to_probe(obj: np.ndarray, probe: np.ndarray, ramp,
                       pivot: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """(``obj`` without the phase ramp ``ramp`` (rad/px along rows, cols), ``probe`` (..., N, N)
    with the opposite one): every frame's exit wave changes by a constant phase only. The
    object's ramp pivots at ``pivot`` (row, col), the probe's at the beam's centre, so the
    phase stays where it was at both."""
    q_r, q_c = (float(v) for v in ramp)
    rr, cc = np.indices(np.shape(obj)[-2:], dtype=np.float64)
    obj = np.asarray(obj) * np.exp(-1j * (q_r * (rr - pivot[0]) + q_c * (cc - pivot[1])))
    p = np.asarray(probe)
    n = p.shape[-1]
    inten = (np.abs(p.reshape(-1, n, n)) ** 2).sum(0)
    k = np.arange(n, dtype=np.float64)
    r0, c0 = (inten.sum(1) @ k) / inten.sum(), (inten.sum(0) @ k) / inten.sum()
    u, v = np.meshgrid(k - r0, k - c0, indexing="ij")
    return obj.astype(np.complex64), (p * np.exp(1j * (q_r * u + q_c * v))).astype(np.complex64)
