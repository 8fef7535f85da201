"""Accuracy of a model against the iterative reconstruction (workflow step 7, QA:SSIM).

The model (onnxruntime through :func:`ptychostream.engines.load_engine`, the way a model
reaches service) infers every frame of the scan; :class:`ptychostream.stitch.Stitcher` places
the phases on the reconstruction's own grid; :func:`ptychostream.metrics.phase_ssim` compares
the two on the well-illuminated region. Same preprocessing, stitching and metric as the edge.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)


def validate(
    model_path: str,
    scan_path: str,
    recon_path: str,
    engine: str = "onnxruntime",
    intensity_scale: float = 1.0,
    max_frames: int | None = None,
    seed: int = 0,
    threads: int = 0,
) -> dict:
    """SSIM of the model's stitched phase against the iterative phase of the same scan.

    ``max_frames``: validate on a random subset of the scan's frames (the paper validates the
    serving model on part of each new scan). ``engine``: "onnxruntime" (default) or "torch".
    Returns {"ssim", "mae_rad", "n_frames", "scan_id", "recon_id", "model", "seconds",
    "frames_per_s", "region_px"}.
    """
    from ptychostream.engines import load_engine
    from ptychostream.metrics import phase_ssim
    from ptychostream.scanfile import read_scan
    from ptychostream.stitch import Stitcher

    from .reconstruct import ReconstructionError, read_reconstruction

    scan = read_scan(scan_path)
    rec = read_reconstruction(recon_path)
    if rec.scan_id and rec.scan_id != scan.scan_id:
        raise ReconstructionError(f"reconstruction {rec.recon_id} is of scan {rec.scan_id}, not {scan.scan_id}")
    kwargs = {"threads": threads} if engine == "onnxruntime" and threads else {}
    model = load_engine(engine, model_path, **kwargs)
    if max_frames is not None and max_frames < scan.n_frames:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        pick = np.sort(np.random.default_rng(seed).choice(scan.n_frames, max_frames, replace=False))
        scan = scan.subset(pick)
    t0 = time.perf_counter()
    phases = model.infer(scan.frames, intensity_scale)
    seconds = time.perf_counter() - t0
    stitcher = Stitcher(rec.pixel_size_m, scan.frame_size, positions_m=scan.positions_m)
    stitcher.add_many(phases, scan.positions_m)
    stitched = stitcher.resample_to(rec.phase.shape, rec.origin_m)
    mask = rec.mask & np.isfinite(stitched)
    ssim = phase_ssim(stitched, rec.phase, mask=mask)
    diff = stitched[mask] - rec.phase[mask]
    mae = float(np.mean(np.abs(diff - np.median(diff))))
    log.info("validated %s on %s (%d frames): SSIM %.3f, MAE %.3f rad",
             model_path, scan.scan_id, scan.n_frames, ssim, mae)
    return {
        "ssim": float(ssim), "mae_rad": mae, "n_frames": int(scan.n_frames),
        "scan_id": scan.scan_id, "recon_id": rec.recon_id, "model": str(model_path),
        "seconds": float(seconds), "frames_per_s": float(scan.n_frames / max(seconds, 1e-9)),
        "region_px": int(mask.sum()),
    }
