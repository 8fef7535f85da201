"""Simulated ptychography experiment: probe, sample, spiral scan, far-field frames.

Physically grounded so that tests, the demo, the simulated detector and the
benchmarks all exercise the real pipeline: a defocused Fresnel-zone-plate probe
(a donut), a pure phase object, a Fermat spiral scan, far-field diffraction with
Poisson noise at a chosen photon count. Geometry follows REFERENCE.md: 10 keV,
128x128 detector, ~800 nm beam.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ptychostream.geometry import crop_at, map_geometry, object_pixel_size
from ptychostream.scanfile import ScanData

log = logging.getLogger(__name__)

GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
# Nearest-neighbour spacing of a Fermat spiral r = c sqrt(n) is about 1.69 c (measured numerically
# over 100..10000 points); used to turn a step size into the spiral constant.
_SPIRAL_SPACING_PER_C = 1.69


# --------------------------------------------------------------------------- overlap
def overlap_ratio(step_m: float, beam_m: float) -> float:
    """Overlap ratio ``1 - sqrt(3) S / B`` of REFERENCE.md (can go negative for sparse scans)."""
    return 1.0 - math.sqrt(3.0) * step_m / beam_m


def step_for_overlap(overlap: float, beam_m: float) -> float:
    """Step size S giving the overlap ratio ``overlap`` for beam size B (inverse of overlap_ratio)."""
    return (1.0 - overlap) * beam_m / math.sqrt(3.0)


# --------------------------------------------------------------------------- scan
def spiral_positions(n_positions: int = 963, step_m: float = 50e-9) -> np.ndarray:
    """Fermat spiral of ``n_positions`` points with nearest-neighbour spacing ~``step_m``.

    Returns (N, 2) positions (x, y) in metres, centred on the scan centre.
    """
    n = np.arange(n_positions, dtype=np.float64)
    c = step_m / _SPIRAL_SPACING_PER_C
    r = c * np.sqrt(n + 0.5)
    theta = n * GOLDEN_ANGLE
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


# --------------------------------------------------------------------------- probe
def _fwhm_diameter(intensity: np.ndarray, pixel_m: float) -> float:
    """Outer full width at half maximum of a (possibly ring-shaped) radially symmetric spot."""
    n = intensity.shape[0]
    yy, xx = np.indices(intensity.shape)
    cy = (intensity * yy).sum() / intensity.sum()
    cx = (intensity * xx).sum() / intensity.sum()
    r = np.hypot(yy - cy, xx - cx)
    rbin = np.round(r).astype(int)
    prof = np.bincount(rbin.ravel(), intensity.ravel()) / np.maximum(np.bincount(rbin.ravel()), 1)
    prof = prof[: n // 2].copy()
    prof[:3] = 0.0  # ignore the on-axis Poisson spot of the annular pupil: the ring sets the size
    above = np.nonzero(prof >= prof.max() / 2)[0]
    if len(above) == 0:
        return 0.0
    k = above[-1]
    # linear interpolation of the half-max crossing beyond the last point above it
    if k + 1 < len(prof) and prof[k] != prof[k + 1]:
        k = k + (prof[k] - prof.max() / 2) / (prof[k] - prof[k + 1])
    return 2.0 * k * pixel_m


def make_probe(
    frame_size: int = 128,
    pixel_m: float = 12.9e-9,
    energy_ev: float = 10_000.0,
    fwhm_m: float = 800e-9,
    pupil_fill: float = 0.30,
    central_stop: float = 0.45,
) -> np.ndarray:
    """Defocused Fresnel-zone-plate probe: an annular pupil (zone plate with central stop)
    propagated out of focus until its outer FWHM is ``fwhm_m``; a donut in the sample plane.

    ``pupil_fill`` is the bright-field disk radius as a fraction of the detector half-width.
    Returns a complex64 (frame_size, frame_size) array normalised to unit total intensity.
    """
    wavelength = wavelength_m(energy_ev)
    q = np.fft.fftfreq(frame_size, d=pixel_m)
    qy, qx = np.meshgrid(q, q, indexing="ij")
    qr = np.hypot(qx, qy)
    q_max = pupil_fill / (2 * pixel_m)
    pupil = ((qr <= q_max) & (qr >= central_stop * q_max)).astype(np.complex128)
    pupil = ndimage.gaussian_filter(pupil.real, 0.5).astype(np.complex128)  # soft zone-plate edges

    def probe_at(dz: float) -> np.ndarray:
        field_ = np.fft.ifft2(pupil * np.exp(-1j * np.pi * wavelength * dz * qr**2))
        return np.fft.fftshift(field_)

    # Geometric estimate (diameter = 2 dz NA), then bisection on the measured FWHM.
    na = wavelength * q_max
    lo, hi = 0.0, 4.0 * fwhm_m / (2 * na)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _fwhm_diameter(np.abs(probe_at(mid)) ** 2, pixel_m) < fwhm_m:
            lo = mid
        else:
            hi = mid
    probe = probe_at(0.5 * (lo + hi))
    probe /= np.sqrt((np.abs(probe) ** 2).sum())
    return probe.astype(np.complex64)


def wavelength_m(energy_ev: float) -> float:
    """X-ray wavelength (m) for a photon energy in eV."""
    return 1.239841984e-6 / energy_ev


# --------------------------------------------------------------------------- sample
def _letters_mask(shape: tuple[int, int], text: str, rng: np.random.Generator) -> np.ndarray:
    """Rasterise ``text`` (DejaVu Sans Bold, shipped with matplotlib) in rows across ``shape``."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    h, w = shape
    mask = np.zeros(shape, bool)
    font = FontProperties(family="DejaVu Sans", weight="bold")
    words = text.split()
    n_rows = max(1, int(round(math.sqrt(len(words) * h / w))))
    rows = [words[i::n_rows] for i in range(n_rows)]
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([xx.ravel() + 0.5, (h - yy.ravel()) - 0.5], axis=1)
    for i, row in enumerate(rows):
        line = " ".join(row)
        tp = TextPath((0, 0), line, size=1.0, prop=font)
        ext = tp.get_extents()
        scale = min(0.9 * w / ext.width, 0.8 * h / n_rows / ext.height)
        verts = (tp.vertices - [ext.x0, ext.y0]) * scale
        x_off = (w - ext.width * scale) / 2
        y_off = h - (i + 0.5) * h / n_rows - ext.height * scale / 2
        verts = verts + [x_off, y_off]
        path = Path(verts, tp.codes)
        mask |= path.contains_points(pts).reshape(shape)
    return mask


def _etched_mask(shape: tuple[int, int], rng: np.random.Generator, feature_px: float) -> np.ndarray:
    """Random lithography-like pattern: lines, rectangles and dots at two etch depths."""
    h, w = shape
    depth = np.zeros(shape, np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    n_feat = int(3 * h * w / feature_px**2)
    for _ in range(n_feat):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        level = rng.choice([0.5, 1.0])
        kind = rng.integers(3)
        if kind == 0:  # rotated bar
            ang = rng.uniform(0, np.pi)
            length = rng.uniform(1, 4) * feature_px
            width = rng.uniform(0.2, 0.6) * feature_px
            u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
            v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
            sel = (np.abs(u) < length / 2) & (np.abs(v) < width / 2)
        elif kind == 1:  # rectangle
            a, b = rng.uniform(0.3, 1.2, 2) * feature_px
            sel = (np.abs(xx - cx) < a / 2) & (np.abs(yy - cy) < b / 2)
        else:  # dot
            rad = rng.uniform(0.15, 0.5) * feature_px
            sel = np.hypot(xx - cx, yy - cy) < rad
        depth[sel] = level
    return depth


def make_sample(
    shape: tuple[int, int],
    pixel_m: float,
    kind: str = "train",
    phase_max: float = 1.0,
    feature_m: float = 200e-9,
    seed: int = 0,
    text: str = "APS EPICS PTYCHO AI EDGE",
) -> np.ndarray:
    """Phase map (rad) of a pure phase object.

    ``kind="train"``: random etched patterns (the training areas of the paper);
    ``kind="test"``: letters, features the network never saw in training;
    ``kind="mixed"``: both halves side by side. Background phase is 0; features reach
    ``phase_max``. Edges are smoothed by one pixel, as a real etch is.
    """
    rng = np.random.default_rng(seed)
    feature_px = feature_m / pixel_m
    if kind == "train":
        depth = _etched_mask(shape, rng, feature_px)
    elif kind == "test":
        depth = _letters_mask(shape, text, rng).astype(np.float64)
    elif kind == "mixed":
        depth = _etched_mask(shape, rng, feature_px)
        half = shape[1] // 2
        depth[:, half:] = _letters_mask((shape[0], shape[1] - half), text, rng)
    else:
        raise ValueError(f"sample kind must be 'train', 'test' or 'mixed', not {kind!r}")
    depth = ndimage.gaussian_filter(depth, 1.0)
    return (phase_max * depth).astype(np.float32)


# --------------------------------------------------------------------------- experiment
@dataclass
class ExperimentConfig:
    """Everything that defines a simulated scan; defaults follow REFERENCE.md."""

    n_positions: int = 963
    step_m: float = 50e-9
    beam_fwhm_m: float = 800e-9
    energy_ev: float = 10_000.0
    detector_distance_m: float = 1.0
    detector_pixel_m: float = 75e-6  # Eiger2
    frame_size: int = 128
    exposure_s: float = 0.4
    flux_ph_per_s: float = 2.5e5  # photons/s in the beam: 0.4 s -> 1e5 photons per frame
    sample_kind: str = "train"
    phase_max: float = 1.0
    feature_m: float = 200e-9
    position_jitter_m: float = 2e-9  # real positions are off-grid
    seed: int = 0
    scan_id: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def object_pixel_m(self) -> float:
        return object_pixel_size(
            self.energy_ev, self.detector_distance_m, self.detector_pixel_m, self.frame_size
        )

    @property
    def photons_per_frame(self) -> float:
        return self.flux_ph_per_s * self.exposure_s

    @property
    def overlap(self) -> float:
        return overlap_ratio(self.step_m, self.beam_fwhm_m)


def diffraction(exit_waves: np.ndarray, photons: float, rng: np.random.Generator | None) -> np.ndarray:
    """Far-field intensity |FFT|^2 (centred) scaled to ``photons`` expected counts per unit-norm
    probe; Poisson-sampled when ``rng`` is given, else the noise-free expectation (float32)."""
    far = np.fft.fftshift(np.fft.fft2(exit_waves, norm="ortho"), axes=(-2, -1))
    expected = (np.abs(far) ** 2) * photons
    if rng is None:
        return expected.astype(np.float32)
    return rng.poisson(expected).astype(np.uint32)


def frames_at(
    obj: np.ndarray, origin_m, pixel_m: float, probe: np.ndarray, positions_m: np.ndarray,
    photons: float, rng: np.random.Generator | None,
) -> np.ndarray:
    """Diffraction frames of the complex object ``obj`` (map at ``origin_m``) lit by ``probe`` at
    each beam position: the one forward model, shared by simulate_scan and the ophyd detector."""
    n = probe.shape[-1]
    o_re = crop_at(obj.real, positions_m, origin_m, pixel_m, n)
    o_im = crop_at(obj.imag, positions_m, origin_m, pixel_m, n)
    return diffraction(probe[None] * (o_re + 1j * o_im), photons, rng)


def simulate_scan(cfg: ExperimentConfig | None = None, noise: bool = True, **overrides) -> ScanData:
    """Simulate one spiral scan: frames, positions, metadata and the ground truth.

    Keyword overrides replace fields of ``cfg`` (``simulate_scan(n_positions=50)``).
    """
    cfg = cfg or ExperimentConfig()
    if overrides:
        cfg = ExperimentConfig(**{**cfg.__dict__, **overrides})
    rng = np.random.default_rng(cfg.seed)
    n = cfg.frame_size
    dx = cfg.object_pixel_m
    probe = make_probe(n, dx, cfg.energy_ev, cfg.beam_fwhm_m)

    positions = spiral_positions(cfg.n_positions, cfg.step_m)
    positions = positions + rng.normal(0, cfg.position_jitter_m, positions.shape)
    shape, origin = map_geometry(positions, dx, n, margin_px=8)
    phase = make_sample(shape, dx, cfg.sample_kind, cfg.phase_max, cfg.feature_m, seed=cfg.seed + 1)
    obj = np.exp(1j * phase.astype(np.float64))

    frames = np.empty((cfg.n_positions, n, n), np.uint32 if noise else np.float32)
    truth_crops = np.empty((cfg.n_positions, n, n), np.float32)
    chunk = 64
    for s in range(0, cfg.n_positions, chunk):
        pos = positions[s : s + chunk]
        frames[s : s + chunk] = frames_at(obj, origin, dx, probe, pos, cfg.photons_per_frame,
                                          rng if noise else None)
        truth_crops[s : s + chunk] = crop_at(phase, pos, origin, dx, n)

    scan_id = cfg.scan_id or f"sim-{cfg.sample_kind}-{cfg.seed}"
    log.info(
        "simulated scan %s: %d frames %dx%d, step %.0f nm (overlap %.2f), %.3g photons/frame",
        scan_id, cfg.n_positions, n, n, cfg.step_m * 1e9, cfg.overlap, cfg.photons_per_frame,
    )
    return ScanData(
        frames=frames,
        positions_m=positions,
        energy_ev=cfg.energy_ev,
        detector_distance_m=cfg.detector_distance_m,
        detector_pixel_size_m=cfg.detector_pixel_m,
        object_pixel_size_m=dx,
        step_m=cfg.step_m,
        exposure_s=cfg.exposure_s,
        scan_id=scan_id,
        beam_fwhm_m=cfg.beam_fwhm_m,
        probe=probe,
        truth_phase=phase,
        truth_origin_m=origin,
        truth_crops=truth_crops,
    )
