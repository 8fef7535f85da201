"""Agreement of two reconstructions of the same scan (e.g. Tike's and pty-chi's), as labels see it.

Tike needs numpy 1 and pty-chi numpy 2, so each engine runs in its own environment and writes its
reconstruction file; this compares the two files in either environment::

    ptychostream-hpc compare scan.h5 tike.recon.h5 ptychi.recon.h5

Both are labelled the same way (:func:`ptychostream.hpc.labels.make_labels`, same alignment
rules), then compared on the region both reconstructions illuminate well: SSIM of the two phase
maps (the figure the issue's goal names, >= 0.95), Pearson correlation and MAE of the label sets,
and each one's correlation with the simulation's truth when the scan file has it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def compare_reconstructions(scan_path: str, recon_a: str, recon_b: str) -> dict:
    """{"ssim", "label_corr", "label_mae_rad", "n_pixels", "a": {...}, "b": {...}}: the phase
    maps of ``recon_a`` and ``recon_b`` (same scan) on their common well-illuminated region, and
    their labels; ``a``/``b`` hold engine, iterations, seconds and, with truth in the scan file,
    corr/MAE of that engine's labels against the truth crops."""
    from ptychostream.geometry import place_on_grid
    from ptychostream.metrics import phase_ssim
    from ptychostream.scanfile import read_scan

    from .labels import make_labels, read_labels
    from .reconstruct import ReconstructionError, read_reconstruction

    ra, rb = read_reconstruction(recon_a), read_reconstruction(recon_b)
    if ra.scan_id != rb.scan_id:
        raise ReconstructionError(f"{recon_a} is of scan {ra.scan_id}, {recon_b} of {rb.scan_id}")
    if not np.isclose(ra.pixel_size_m, rb.pixel_size_m, rtol=1e-6):
        raise ReconstructionError("the two reconstructions have different pixel sizes")
    with tempfile.TemporaryDirectory() as tmp:
        la = read_labels(make_labels(scan_path, recon_a, str(Path(tmp) / "a.h5")))
        lb = read_labels(make_labels(scan_path, recon_b, str(Path(tmp) / "b.h5")))
    # phase maps on a's grid (maps share one lattice, so this is a whole-pixel copy)
    pa = np.where(ra.mask, ra.phase, np.nan)
    pb = place_on_grid(np.where(rb.mask, rb.phase, np.nan), rb.origin_m, rb.pixel_size_m,
                       ra.phase.shape, ra.origin_m)
    common = np.isfinite(pa) & np.isfinite(pb)
    ssim = phase_ssim(pb, pa, mask=common) if common.sum() >= 49 else float("nan")
    w = la["label_weight"].astype(bool) & lb["label_weight"].astype(bool)
    a, b = la["labels"][w], lb["labels"][w]
    out = {
        "scan_id": ra.scan_id, "ssim": float(ssim), "n_pixels": int(common.sum()),
        "label_corr": float(np.corrcoef(a, b)[0, 1]) if w.sum() > 1 else float("nan"),
        "label_mae_rad": float(np.mean(np.abs(a - b))) if w.any() else float("nan"),
    }
    truth = read_scan(scan_path).truth_crops
    for key, path, rec, lab in (("a", recon_a, ra, la), ("b", recon_b, rb, lb)):
        info = {"path": str(path), "engine": rec.engine,
                "iterations": rec.iterations, "seconds": rec.seconds, "recon_id": rec.recon_id}
        if truth is not None:
            m = lab["label_weight"].astype(bool)
            info["truth_corr"] = float(np.corrcoef(lab["labels"][m], truth[m])[0, 1])
            info["truth_mae_rad"] = float(np.mean(np.abs(lab["labels"][m] - truth[m])))
        out[key] = info
    log.info("%s: %s vs %s: SSIM %.3f, label corr %.3f, MAE %.3f rad", ra.scan_id, ra.engine,
             rb.engine, out["ssim"], out["label_corr"], out["label_mae_rad"])
    return out
