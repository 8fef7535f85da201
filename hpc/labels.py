"""Training labels: the reconstructed phase cropped at every beam position (workflow step 2).

Each frame is paired with the reconstruction's phase interpolated on the 128 x 128 grid centred
on its (off-grid) beam position, with :func:`ptychostream.geometry.crop_at`, the same function
the simulation uses for its truth crops, so labels and truth line up pixel for pixel.

Phase retrieval fixes the phase only up to a constant (and, with a drifting probe, a linear
ramp). :func:`align_phase` removes both with one fixed rule, so labels agree between scans.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LABEL_FORMAT = 1
#: the phase at this percentile of the well-illuminated region is set to 0 rad
BACKGROUND_PERCENTILE = 2.0


def align_phase(
    obj: np.ndarray, mask: np.ndarray, ramp: bool = True, percentile: float = BACKGROUND_PERCENTILE
) -> tuple[np.ndarray, dict]:
    """Phase of the complex ``obj`` with its linear ramp and constant offset removed.

    Ramp: the median phase gradient along rows and columns over ``mask`` (edges of features rise
    and fall in equal measure, so the median sees only the ramp; a least-squares plane would be
    pulled by where the features happen to lie). Offset: the ``percentile`` of the phase over
    ``mask`` is set to 0, i.e. the least phase-shifting material (the background of an etched
    sample) sits at 0 rad whatever the scan contains. Works in the complex domain, so the
    offset never wraps features across +-pi.
    Returns (phase float32, {"offset": rad, "ramp": [rad/px along rows, along cols]}).
    """
    obj = np.asarray(obj)
    mask = np.asarray(mask, bool)
    if obj.shape != mask.shape:
        raise ValueError(f"object {obj.shape} and mask {mask.shape} differ in shape")
    if mask.sum() < 16:
        raise ValueError("the well-illuminated region has fewer than 16 pixels")
    work = obj.astype(np.complex128)
    slope = [0.0, 0.0]
    if ramp:
        rr, cc = np.indices(obj.shape, dtype=np.float64)
        for _ in range(2):  # a second pass mops up what wrapping hid in the first
            g_r = np.angle(work[1:, :] * np.conj(work[:-1, :]))[mask[1:, :] & mask[:-1, :]]
            g_c = np.angle(work[:, 1:] * np.conj(work[:, :-1]))[mask[:, 1:] & mask[:, :-1]]
            d_r, d_c = float(np.median(g_r)), float(np.median(g_c))
            work = work * np.exp(-1j * (d_r * rr + d_c * cc))
            slope[0] += d_r
            slope[1] += d_c
    # coarse offset from the circular mean, so the percentile is taken away from the wrap point
    coarse = float(np.angle(np.mean(work[mask] / np.maximum(np.abs(work[mask]), 1e-12))))
    work = work * np.exp(-1j * coarse)
    fine = float(np.percentile(np.angle(work[mask]), percentile))
    work = work * np.exp(-1j * fine)
    offset = (coarse + fine + np.pi) % (2 * np.pi) - np.pi
    return np.angle(work).astype(np.float32), {"offset": float(offset), "ramp": slope}


def make_labels(scan_path: str, recon_path: str, out_path: str) -> str:
    """Pair every frame of a scan with its phase label; write the labels HDF5, return its path.

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
    labels = crop_at(rec.phase, scan.positions_m, rec.origin_m, rec.pixel_size_m, n).astype(np.float32)
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
            "n_pairs": int(scan.n_frames),
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
