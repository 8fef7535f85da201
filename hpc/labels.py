"""Training labels: the reconstructed phase cropped at every beam position (workflow step 2).

Each frame is paired with the reconstruction's phase interpolated on the 128 x 128 grid centred
on its (off-grid) beam position, with :func:`ptychostream.geometry.crop_at`, the same function
the simulation uses for its truth crops, so labels and truth line up pixel for pixel.

Phase retrieval fixes the phase only up to a constant (and, with a drifting probe, a linear
ramp; with the other Fourier convention, a sign). :func:`align_phase` fixes all three with one
rule (least phase-shifting material at 0 rad, material positive), so labels agree between scans
and with the simulation's convention, whatever pipeline made the reconstruction.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ptychostream.geometry import median_phase_gradient

log = logging.getLogger(__name__)

LABEL_FORMAT = 1
#: background="percentile": the phase at this percentile of the well-illuminated region is 0 rad
BACKGROUND_PERCENTILE = 2.0
#: |corr(level, log amplitude)| between the lowest and highest phase levels above this: the
#: amplitude tells which material absorbs (pure phase objects: ~0.2 from noise and edges)
AMPLITUDE_INFORMATIVE = 0.5


def _noise(work: np.ndarray, mask: np.ndarray) -> float:
    """Phase noise (rad) from neighbour differences: edges are few, so the median absolute
    difference sees the noise (MAD of a difference of two pixels: sigma * sqrt(2) * 0.6745)."""
    d = np.angle(work[:, 1:] * np.conj(work[:, :-1]))[mask[:, 1:] & mask[:, :-1]]
    return max(float(np.median(np.abs(d))) / (0.6745 * np.sqrt(2.0)), 0.005)


def _peak(p: np.ndarray, lo: float, hi: float, sigma: float) -> tuple[float, bool]:
    """The most common phase in [lo, hi] (histogram smoothed by ``sigma``), refined to the median
    of the pixels within ``sigma`` of it, and whether it is a true peak (density falling again
    before ``hi``) rather than the edge of a density still rising."""
    from scipy import ndimage

    sel = p[(p >= lo) & (p <= hi)]
    if sel.size < 8:
        return float(np.median(p)), False
    bins = max(8, int(np.ceil((hi - lo) / (sigma / 4))))
    hist, edges = np.histogram(sel, bins=bins, range=(lo, hi))
    smooth = ndimage.gaussian_filter1d(hist.astype(np.float64), 4.0)
    k = int(np.argmax(smooth))
    centre = 0.5 * (edges[k] + edges[k + 1])
    near = p[np.abs(p - centre) <= sigma]
    is_peak = k < 0.85 * bins and smooth[k] > 1.1 * smooth[-1]
    return (float(np.median(near)) if near.size else centre), bool(is_peak)


def _lowest_level(p: np.ndarray, sigma: float) -> tuple[float, bool]:
    """The lowest phase level: the most common phase between the 2nd percentile and four noise
    widths above it (a level's 2nd percentile lies within ~2 noise widths of its centre, and the
    percentile alone sits noise-widths below it); and whether that level shows as a peak."""
    q = float(np.percentile(p, BACKGROUND_PERCENTILE))
    return _peak(p, q, q + 4 * sigma, sigma)


def _amplitude_corr(p: np.ndarray, log_amp: np.ndarray, sigma: float) -> float:
    """Correlation of log amplitude with membership of the highest (vs the lowest) phase level,
    over the pixels of those two levels only (feature edges, where the reconstruction's amplitude
    wanders, are left out). 0 when the levels are not apart or there is no amplitude contrast."""
    lo, hi = _lowest_level(p, sigma)[0], -_lowest_level(-p, sigma)[0]
    if hi - lo < 6 * sigma or np.std(log_amp) < 1e-6:
        return 0.0
    near_lo, near_hi = np.abs(p - lo) <= 1.5 * sigma, np.abs(p - hi) <= 1.5 * sigma
    if near_lo.sum() < 8 or near_hi.sum() < 8:
        return 0.0
    sel = near_lo | near_hi
    return float(np.corrcoef(near_hi[sel].astype(np.float64), log_amp[sel])[0, 1])


def align_phase(
    obj: np.ndarray, mask: np.ndarray, ramp: bool = True, percentile: float = BACKGROUND_PERCENTILE,
    background: str = "auto", sign="auto",
) -> tuple[np.ndarray, dict]:
    """Phase of the complex ``obj`` with its linear ramp, sign and constant offset fixed.

    Phase retrieval leaves a constant (and, with a drifting probe, a linear ramp) free, and a
    reconstruction made with the other Fourier convention comes out conjugated (every phase
    negated): real Siemens-star data come out with the background at +0.6 rad and the spokes at 0.
    The rules give every scan the simulation's convention: the least phase-shifting material
    (etched ground, vacuum) at 0 rad, material phase-advancing positive.

    Ramp: the median phase gradient along rows and columns over ``mask``
    (:func:`ptychostream.geometry.median_phase_gradient`).

    ``sign``: 1 or -1 (keep or negate), a reference phase on the same grid (e.g. the serving
    model's stitched prediction: the sign that correlates with it), or "auto": material absorbs,
    so where the amplitude differs between the lowest and highest phase levels (see
    AMPLITUDE_INFORMATIVE) the sign that gives the more absorbing level the higher phase; a pure
    phase object carries no such cue and keeps its sign (give it a reference or a sign).

    ``background``: "lowest" (the least phase-shifting material: the most common phase within
    four noise widths above the 2nd percentile, i.e. the lowest level's centre, where the
    percentile alone sits noise-widths below it; right also where film covers most of the scan);
    "mode" (the most common level overall); "percentile" (the old rule: ``percentile`` of the
    phase); "auto": "lowest" where that level shows as a peak of the phase histogram, else
    "percentile" (in noisy reconstructions of the simulated three-level sample, where the ground
    is the least common level, it has no peak: measured there, labels vs truth MAE 0.11 rad with
    the percentile, 0.16-0.24 with "lowest", 0.53-0.63 with "mode"). The noise width comes from
    neighbour differences.
    Works in the complex domain, so the offset never wraps features across +-pi.
    Returns (phase float32, {"offset": rad, "ramp": [rad/px along rows, along cols], "sign": +-1,
    "background": rule used, "amplitude_corr": see _amplitude_corr, before the sign,
    "noise_rad": the noise width}),
    with phase = sign * (angle(obj) - ramp - offset).
    """
    obj = np.asarray(obj)
    mask = np.asarray(mask, bool)
    if obj.shape != mask.shape:
        raise ValueError(f"object {obj.shape} and mask {mask.shape} differ in shape")
    if mask.sum() < 16:
        raise ValueError("the well-illuminated region has fewer than 16 pixels")
    if background not in ("auto", "mode", "lowest", "percentile"):
        raise ValueError(f"background must be auto, lowest, mode or percentile, got {background!r}")
    work = obj.astype(np.complex128)
    slope = [0.0, 0.0]
    if ramp:
        rr, cc = np.indices(obj.shape, dtype=np.float64)
        for _ in range(2):  # a second pass mops up what wrapping hid in the first
            d_r, d_c = median_phase_gradient(work, mask)
            work = work * np.exp(-1j * (d_r * rr + d_c * cc))
            slope[0] += d_r
            slope[1] += d_c
    # coarse offset from the circular mean, so levels sit away from the wrap point
    coarse = float(np.angle(np.mean(work[mask] / np.maximum(np.abs(work[mask]), 1e-12))))
    work = work * np.exp(-1j * coarse)
    p = np.angle(work[mask])
    sigma = _noise(work, mask)
    amp_corr = _amplitude_corr(p, np.log(np.maximum(np.abs(work[mask]), 1e-12)), sigma)
    if isinstance(sign, str):
        if sign != "auto":
            raise ValueError(f"sign must be 'auto', 1, -1 or a reference image, got {sign!r}")
        s = -1 if amp_corr > AMPLITUDE_INFORMATIVE else 1
    elif np.ndim(sign) == 0:
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {sign!r}")
        s = int(sign)
    else:
        ref = np.asarray(sign, np.float64)
        if ref.shape != obj.shape:
            raise ValueError(f"sign reference {ref.shape} and object {obj.shape} differ in shape")
        ok = mask & np.isfinite(ref)
        s = 1 if np.corrcoef(np.angle(work[ok]), ref[ok])[0, 1] >= 0 else -1
    if s < 0:
        work, p = np.conj(work), -p
    rule = background
    if rule in ("auto", "lowest"):
        level, is_peak = _lowest_level(p, sigma)
        if rule == "auto":
            rule = "lowest" if is_peak else "percentile"
    if rule == "percentile":
        level = float(np.percentile(p, percentile))
    elif rule == "mode":
        level = _peak(p, float(p.min()), float(p.max()), sigma)[0]
    work = work * np.exp(-1j * level)
    offset = (coarse + s * level + np.pi) % (2 * np.pi) - np.pi
    return np.angle(work).astype(np.float32), {
        "offset": float(offset), "ramp": slope, "sign": int(s), "background": rule,
        "amplitude_corr": amp_corr, "noise_rad": sigma}


def make_labels(scan_path: str, recon_path: str, out_path: str, align: bool | dict = True) -> str:
    """Pair every frame of a scan with its phase label; write the labels HDF5, return its path.

    ``align``: True aligns the reconstruction's complex object again with :func:`align_phase`'s
    rules (so a reconstruction from elsewhere, or one aligned with an older rule, gets the same
    convention); a dict passes options to it (``sign``, ``background``, ``ramp``); False takes
    the file's ``phase`` as it is.

    The file holds frames (N, 128, 128) as recorded, labels (N, 128, 128) float32 rad,
    label_weight (N, 128, 128) uint8 (1 where the reconstruction was well illuminated; where it
    was not, the label is 0 rad, the background value), positions (N, 2) m, scan id,
    reconstruction id and where both came from.
    """
    import h5py

    from ptychostream.geometry import crop_at
    from ptychostream.scanfile import read_scan

    from .reconstruct import ReconstructionError, read_reconstruction

    scan = read_scan(scan_path)
    rec = read_reconstruction(recon_path)
    if rec.scan_id and rec.scan_id != scan.scan_id:
        raise ReconstructionError(
            f"reconstruction {rec.recon_id} is of scan {rec.scan_id}, not {scan.scan_id}"
        )
    n = scan.frame_size
    if rec.frame_size != n:
        raise ReconstructionError(f"reconstruction probe is {rec.frame_size} px, frames are {n} px")
    if not np.isclose(rec.pixel_size_m, scan.object_pixel_size_m, rtol=1e-6):
        raise ReconstructionError(
            f"pixel size differs: reconstruction {rec.pixel_size_m:.4g} m, scan {scan.object_pixel_size_m:.4g} m"
        )
    if align is False:
        phase, alignment = rec.phase, {"sign": 1, "offset": float(rec.attrs.get("phase_offset_rad", 0.0)),
                                       "background": "as reconstructed"}
    else:
        phase, alignment = align_phase(rec.object, rec.mask, **(align if isinstance(align, dict) else {}))
    labels = crop_at(phase, scan.positions_m, rec.origin_m, rec.pixel_size_m, n).astype(np.float32)
    weight = crop_at(rec.mask.astype(np.float32), scan.positions_m, rec.origin_m, rec.pixel_size_m, n)
    weight = weight >= 0.5
    labels[~weight] = 0.0
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({
            "ptychostream_labels_format": LABEL_FORMAT, "scan_id": scan.scan_id,
            "recon_id": rec.recon_id, "scan_path": str(scan_path), "recon_path": str(recon_path),
            "pixel_size_m": rec.pixel_size_m, "engine": rec.engine, "created": time.time(),
            "n_pairs": int(scan.n_frames), "phase_sign": int(alignment["sign"]),
            "phase_offset_rad": float(alignment["offset"]), "phase_background": str(alignment["background"]),
        })
        f.create_dataset("frames", data=scan.frames, chunks=(1, n, n), compression="gzip")
        f.create_dataset("labels", data=labels, chunks=(1, n, n), compression="gzip")
        f.create_dataset("label_weight", data=weight.astype(np.uint8), chunks=(1, n, n),
                         compression="gzip")
        f.create_dataset("positions_m", data=scan.positions_m)
    tmp.replace(out)
    log.info("labels for %s from %s: %d pairs -> %s", scan.scan_id, rec.recon_id, scan.n_frames, out)
    return str(out)


def read_labels(path: str | Path) -> dict:
    """A labels file as a dict of arrays and attributes (frames, labels, label_weight,
    positions_m, scan_id, recon_id, ...)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labels file {path} does not exist")
    with h5py.File(path, "r") as f:
        if "labels" not in f or "frames" not in f:
            raise ValueError(f"{path} is not a ptychostream labels file (no frames/labels)")
        out = {k: f[k][()] for k in ("frames", "labels", "label_weight", "positions_m") if k in f}
        out.update({k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()})
    return out
