"""Simulated ptychography experiment: probe, sample, spiral scan, far-field frames.

The experiment is the published one (REFERENCE.md, "The sample"): a 1.5 um tungsten film,
etched into random patterns (training areas) and letters (test areas), measured at 10.4 keV
with a ~800 nm defocused zone-plate beam on 128 x 128 pixels of a 2 kHz Eiger. So tests, the
demo, the simulated detector and the benchmarks all see the sample the paper's network saw.

Parameters and where they come from:

- energy 10.4 keV: the federated-workflow paper's W test sample was measured at 10.4 keV.
- film: W, 19.3 g/cm3 (bulk density), 1.5 um thick (the paper's sample); delta and beta from
  ``xraydb`` (delta 2.56e-5, beta 4.0e-6 at 10.4 keV: film phase 2.03 rad, amplitude 0.73).
- beam 800 nm FWHM (REFERENCE.md, the probe); detector 128 px of 75 um (Eiger2 crop).
- detector distance 1.0 m: object pixel lambda z / (N p) = 12.4 nm, a 1.59 um window twice
  the beam, so the diffraction intensity is sampled at the oversampling ratio 2 that a single
  frame needs (0.9 m, the paper's Eiger distance, gives 11.2 nm and a ratio of only 1.8; the
  6.82 nm grid of the 512 px Medipix set-up would need 0.55 m and alias the intensity here).
- flux 1.1e8 photons/s in the beam: the paper's doses (Fig. 3, 20,000 / 1,600 / 250 ph/nm2 at
  50 / 180 / 460 nm steps) all give ~4.4e7 photons per 0.4 s frame (REFERENCE.md), and its
  0.5 ms live demonstration (6 ph/nm2 at ~100 nm step) ~5e4; 1.1e8 ph/s gives 4.4e7 and 5.5e4.
- random patterns: lines, rectangles and dots of 50-500 nm on flat etched ground, film pads
  with etched holes (flat film), and feature-free patches (flat ground), as in the paper's
  training-area figures; letters of film ~0.5 um tall (strokes ~120 nm) on etched ground.
- phase convention: etched ground 0 rad (the background, the least phase-shifting material,
  which is where :func:`ptychostream.hpc.labels.align_phase` puts its 2nd percentile), film
  +2.03 rad; the transmission is exp((i - beta/delta) * phase).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ptychostream.geometry import crop_at, frame_corner_px, map_geometry, object_pixel_size
from ptychostream.scanfile import ScanData

log = logging.getLogger(__name__)

GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
# Nearest-neighbour spacing of a Fermat spiral r = c sqrt(n) is about 1.69 c (measured numerically
# over 100..10000 points); used to turn a step size into the spiral constant.
_SPIRAL_SPACING_PER_C = 1.69

#: photon energy of the published W sample measurement (federated-workflow paper)
DEFAULT_ENERGY_EV = 10_400.0
#: the film: material, density (g/cm3, bulk W), thickness (m), as in the paper's sample
FILM_MATERIAL = "W"
FILM_DENSITY_G_CM3 = 19.3
FILM_THICKNESS_M = 1.5e-6
#: photons/s in the beam that give the paper's ~4.4e7 photons per 0.4 s frame (REFERENCE.md)
DEFAULT_FLUX_PH_PER_S = 1.1e8
#: training maps use sample seeds from here on, so no benchmark or test area (seeds below) repeats
TRAINING_SEED_BASE = 1_000_000


# --------------------------------------------------------------------------- the film
@functools.lru_cache(maxsize=64)
def film_delta_beta(
    energy_ev: float = DEFAULT_ENERGY_EV,
    material: str = FILM_MATERIAL,
    density_g_cm3: float = FILM_DENSITY_G_CM3,
) -> tuple[float, float]:
    """(delta, beta) of the film's refractive index n = 1 - delta + i beta, from xraydb
    (tabulated, so it is right across absorption edges: W's L3 edge is at 10.21 keV)."""
    import xraydb

    delta, beta, _ = xraydb.xray_delta_beta(material, density_g_cm3, float(energy_ev))
    return float(delta), float(beta)


def film_phase(
    energy_ev: float = DEFAULT_ENERGY_EV,
    thickness_m: float = FILM_THICKNESS_M,
    material: str = FILM_MATERIAL,
    density_g_cm3: float = FILM_DENSITY_G_CM3,
) -> float:
    """Phase shift (rad) of the film relative to the etched ground: k delta t."""
    delta, _ = film_delta_beta(energy_ev, material, density_g_cm3)
    return 2 * math.pi / wavelength_m(energy_ev) * delta * thickness_m


def film_amplitude(
    energy_ev: float = DEFAULT_ENERGY_EV,
    thickness_m: float = FILM_THICKNESS_M,
    material: str = FILM_MATERIAL,
    density_g_cm3: float = FILM_DENSITY_G_CM3,
) -> float:
    """Amplitude transmission of the film: exp(-k beta t)."""
    _, beta = film_delta_beta(energy_ev, material, density_g_cm3)
    return math.exp(-2 * math.pi / wavelength_m(energy_ev) * beta * thickness_m)


def transmission(
    phase: np.ndarray, energy_ev: float = DEFAULT_ENERGY_EV, material: str = FILM_MATERIAL,
    density_g_cm3: float = FILM_DENSITY_G_CM3,
) -> np.ndarray:
    """Complex transmission of a film whose thickness makes ``phase`` (rad):
    exp((i - beta/delta) phase); phase and absorption both grow with thickness."""
    delta, beta = film_delta_beta(energy_ev, material, density_g_cm3)
    ph = np.asarray(phase, np.float64)
    return np.exp((1j - beta / delta) * ph).astype(np.complex64)


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


@functools.lru_cache(maxsize=16)
def _probe_cached(frame_size: int, pixel_m: float, energy_ev: float, fwhm_m: float,
                  pupil_fill: float, central_stop: float) -> np.ndarray:
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
    probe = probe.astype(np.complex64)
    probe.setflags(write=False)
    return probe


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
    Returns a complex64 (frame_size, frame_size) array normalised to unit total intensity
    (cached: every scan of one geometry shares the 40-step focus search).
    """
    return _probe_cached(int(frame_size), float(pixel_m), float(energy_ev), float(fwhm_m),
                         float(pupil_fill), float(central_stop)).copy()


def beam_mask(probe: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Pixels of a frame the beam lights (intensity >= ``threshold`` of the peak, the donut's dim
    centre included): where a network's output and a label mean something."""
    inten = np.sum(np.abs(np.asarray(probe).reshape(-1, *np.shape(probe)[-2:])) ** 2, axis=0)
    return ndimage.binary_fill_holes(inten >= threshold * inten.max())


def wavelength_m(energy_ev: float) -> float:
    """X-ray wavelength (m) for a photon energy in eV."""
    return 1.239841984e-6 / energy_ev


# --------------------------------------------------------------------------- sample
def _letters_mask(shape: tuple[int, int], text: str, rng: np.random.Generator,
                  letter_px: float) -> np.ndarray:
    """Rows of ``text`` (DejaVu Sans Bold, shipped with matplotlib), ``letter_px`` font size,
    tiled across ``shape`` about its centre; each row shifted at random (by ``rng``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    h, w = shape
    font = FontProperties(family="DejaVu Sans", weight="bold")
    words = text.split() or ["A"]
    unit = TextPath((0, 0), " ".join(words) + "  ", size=letter_px, prop=font)
    unit_w = unit.get_extents().width + 0.6 * letter_px
    pitch = 1.6 * letter_px
    n_rows = int(math.ceil(h / pitch / 2)) + 1
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    for i in range(-n_rows, n_rows + 1):
        y = h / 2 + i * pitch + 0.35 * letter_px  # baseline: the row's letters centred on y
        x0 = w / 2 - unit_w * (0.5 + rng.uniform(0, 1)) - unit_w * math.ceil(w / 2 / unit_w)
        n_rep = int(math.ceil(w / unit_w)) + 3
        for j in range(n_rep):
            verts = unit.vertices * [1, -1] + [x0 + j * unit_w, y]
            ax.add_patch(PathPatch(Path(verts, unit.codes), fc="k", ec="none", lw=0,
                                   antialiased=False))
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., 0]
    if img.shape != (h, w):  # figure sizes round to whole pixels; pad or cut to the shape
        out = np.full((h, w), 255, np.uint8)
        out[: min(h, img.shape[0]), : min(w, img.shape[1])] = img[:h, :w]
        img = out
    return img < 128


def _draw(film: np.ndarray, cy: float, cx: float, half_h: float, half_w: float, inside,
          value: float) -> None:
    """Set ``film`` to ``value`` where ``inside(dy, dx)`` in the window around (cy, cx)."""
    h, w = film.shape
    r0, r1 = max(0, int(cy - half_h) - 1), min(h, int(cy + half_h) + 2)
    c0, c1 = max(0, int(cx - half_w) - 1), min(w, int(cx + half_w) + 2)
    if r1 <= r0 or c1 <= c0:
        return
    dy = np.arange(r0, r1)[:, None] - cy
    dx = np.arange(c0, c1)[None, :] - cx
    film[r0:r1, c0:c1][inside(dy, dx)] = value


def _box(film: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float,
         value: float) -> None:
    """Filled rectangle of half-sides (a, b) rotated by ``angle``."""
    ca, sa = math.cos(angle), math.sin(angle)
    half_w = abs(a * ca) + abs(b * sa)
    half_h = abs(a * sa) + abs(b * ca)
    _draw(film, cy, cx, half_h, half_w,
          lambda dy, dx: (np.abs(dx * ca + dy * sa) <= a) & (np.abs(-dx * sa + dy * ca) <= b),
          value)


def _dot(film: np.ndarray, cy: float, cx: float, r: float, value: float) -> None:
    """Filled disc of radius ``r``."""
    _draw(film, cy, cx, r, r, lambda dy, dx: dy * dy + dx * dx <= r * r, value)


def _random_pattern(shape: tuple[int, int], rng: np.random.Generator, pixel_m: float,
                    feature_m: float, fill: float) -> np.ndarray:
    """Film map (1 film, 0 etched ground) of a lithography-like training area.

    Sizes scale with ``feature_m`` (200 nm: lines 50-150 nm wide and 0.3-1.5 um long,
    rectangles and dots of 50-500 nm, film pads of 0.6-1.2 um with etched holes). A smooth
    random density leaves about a fifth of the area without features (flat etched ground), and
    the pads give flat film, so the network learns both flat levels."""
    h, w = shape
    film = np.zeros(shape, np.float32)
    s = feature_m / 200e-9 / pixel_m * 1e-9  # pixels per nm of the 200 nm design, scaled
    # smooth density in [0, 1] on a ~1 um grid, zero on about a fifth of the area
    cell = max(2.0, 1000.0 * s)
    coarse = rng.uniform(0, 1, (int(h / cell) + 2, int(w / cell) + 2))
    dens = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=1)[:h, :w]
    dens = np.clip((dens - 0.25) / 0.55, 0.0, 1.0)
    mean_area_px = 0.065e6 * s * s  # mean film area of one feature below (nm2 -> px2)
    n_try = int(fill * h * w / mean_area_px / max(float(dens.mean()), 0.05)) + 1
    for _ in range(n_try):
        cy, cx = rng.uniform(-20 * s, h + 20 * s), rng.uniform(-20 * s, w + 20 * s)
        if rng.uniform() > dens[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))]:
            continue
        kind = rng.choice(4, p=[0.32, 0.3, 0.3, 0.08])
        straight = rng.uniform() < 0.6
        angle = rng.choice([0.0, math.pi / 2]) if straight else rng.uniform(0, math.pi)
        if kind == 0:  # line
            _box(film, cy, cx, rng.uniform(150, 750) * s, rng.uniform(25, 75) * s, angle, 1)
        elif kind == 1:  # rectangle
            a, b = rng.uniform(50, 250, 2) * s
            _box(film, cy, cx, a, b, angle if rng.uniform() < 0.3 else 0.0, 1)
        elif kind == 2:  # dot
            _dot(film, cy, cx, rng.uniform(25, 150) * s, 1)
        else:  # film pad with etched holes
            a, b = rng.uniform(300, 600, 2) * s
            _box(film, cy, cx, a, b, 0.0, 1)
            for _ in range(rng.integers(0, 5)):
                hy, hx = cy + rng.uniform(-b, b) * 0.7, cx + rng.uniform(-a, a) * 0.7
                if rng.uniform() < 0.5:
                    _dot(film, hy, hx, rng.uniform(25, 120) * s, 0)
                else:
                    _box(film, hy, hx, rng.uniform(25, 200) * s, rng.uniform(25, 75) * s,
                         rng.choice([0.0, math.pi / 2]), 0)
    return film


def make_sample(
    shape: tuple[int, int],
    pixel_m: float,
    kind: str = "train",
    phase_max: float | None = None,
    feature_m: float = 200e-9,
    seed: int = 0,
    text: str = "APS EPICS PTYCHO AI EDGE",
    energy_ev: float = DEFAULT_ENERGY_EV,
    fill: float = 0.3,
    letter_m: float | None = None,
) -> np.ndarray:
    """Phase map (rad) of the etched W film: etched ground 0, film ``phase_max``.

    ``phase_max`` None: the 1.5 um W film's phase at ``energy_ev`` (2.03 rad at 10.4 keV).
    ``kind="train"``: random lines, rectangles, dots and pads (the paper's training areas),
    ``fill`` the film fraction aimed at; ``kind="test"``: rows of film letters of font size
    ``letter_m`` (default 3.5 ``feature_m``), features the network never saw in training;
    ``kind="mixed"``: both halves side by side. Edges are smoothed by one pixel, as a real
    etch is. Use :func:`transmission` (or :func:`make_object`) for the complex object.
    """
    rng = np.random.default_rng(seed)
    if phase_max is None:
        phase_max = film_phase(energy_ev)
    letter_px = (letter_m or 3.5 * feature_m) / pixel_m
    if kind == "train":
        film = _random_pattern(shape, rng, pixel_m, feature_m, fill)
    elif kind == "test":
        film = _letters_mask(shape, text, rng, letter_px).astype(np.float32)
    elif kind == "mixed":
        film = _random_pattern(shape, rng, pixel_m, feature_m, fill)
        half = shape[1] // 2
        film[:, half:] = _letters_mask((shape[0], shape[1] - half), text, rng, letter_px)
    else:
        raise ValueError(f"sample kind must be 'train', 'test' or 'mixed', not {kind!r}")
    film = ndimage.gaussian_filter(film, 1.0)
    return (phase_max * film).astype(np.float32)


def make_object(
    shape: tuple[int, int],
    pixel_m: float,
    kind: str = "train",
    phase_max: float | None = None,
    feature_m: float = 200e-9,
    seed: int = 0,
    energy_ev: float = DEFAULT_ENERGY_EV,
    **kwargs,
) -> np.ndarray:
    """Complex transmission (complex64) of the sample :func:`make_sample` describes."""
    phase = make_sample(shape, pixel_m, kind, phase_max, feature_m, seed=seed,
                        energy_ev=energy_ev, **kwargs)
    return transmission(phase, energy_ev)


# --------------------------------------------------------------------------- experiment
@dataclass
class ExperimentConfig:
    """Everything that defines a simulated scan; defaults follow REFERENCE.md (module doc)."""

    n_positions: int = 963
    step_m: float = 50e-9
    beam_fwhm_m: float = 800e-9
    energy_ev: float = DEFAULT_ENERGY_EV
    detector_distance_m: float = 1.0
    detector_pixel_m: float = 75e-6  # Eiger2
    frame_size: int = 128
    exposure_s: float = 0.4
    flux_ph_per_s: float = DEFAULT_FLUX_PH_PER_S  # 0.4 s -> 4.4e7 photons, 0.5 ms -> 5.5e4
    sample_kind: str = "train"
    phase_max: float | None = None  # None: the W film's phase at energy_ev
    feature_m: float = 200e-9
    fill: float = 0.3  # film fraction the random training pattern aims at
    position_jitter_m: float = 2e-9  # real positions are off-grid
    position_error_m: float = 0.0  # rms per axis of recorded (encoder) minus true positions
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

    @property
    def film_phase_rad(self) -> float:
        """Phase of the film: ``phase_max`` if set, else the W film's at ``energy_ev``."""
        return float(self.phase_max) if self.phase_max is not None else film_phase(self.energy_ev)


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
    each beam position: the numpy forward model (the ophyd detector's, one frame at a time);
    :func:`forward_torch` is the same model, batched, for whole scans and training pairs."""
    n = probe.shape[-1]
    o_re = crop_at(obj.real, positions_m, origin_m, pixel_m, n)
    o_im = crop_at(obj.imag, positions_m, origin_m, pixel_m, n)
    return diffraction(probe[None] * (o_re + 1j * o_im), photons, rng)


# --------------------------------------------------------------------------- batched (torch)
def _default_device(device: str | None) -> str:
    import torch

    if device is not None:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


class _TorchSample:
    """A sample map (real, imag, phase) resident on a torch device, cropped in batches."""

    def __init__(self, obj: np.ndarray, phase: np.ndarray, origin_m, pixel_m: float,
                 device: str) -> None:
        import torch

        self.torch = torch
        stack = np.stack([obj.real, obj.imag, phase]).astype(np.float32)
        self.maps = torch.from_numpy(stack).to(device)
        self.origin_m, self.pixel_m, self.device = origin_m, float(pixel_m), device

    def crops(self, positions_m: np.ndarray, n: int):
        """(3, B, n, n) bilinear crops at the beam positions: exactly
        :func:`ptychostream.geometry.crop_at` (order 1, edges clamped), batched."""
        torch = self.torch
        corners = np.array([frame_corner_px(p, self.origin_m, self.pixel_m, n) for p in positions_m])
        base = np.floor(corners)
        frac = torch.from_numpy((corners - base).astype(np.float32)).to(self.device)
        h, w = self.maps.shape[-2:]
        k = torch.arange(n + 1, device=self.device)
        b = torch.from_numpy(base.astype(np.int64)).to(self.device)
        rows = (b[:, 0:1] + k).clamp(0, h - 1)  # (B, n + 1)
        cols = (b[:, 1:2] + k).clamp(0, w - 1)
        win = self.maps[:, rows[:, :, None], cols[:, None, :]]  # (3, B, n + 1, n + 1)
        fy = frac[:, 0].view(1, -1, 1, 1)
        fx = frac[:, 1].view(1, -1, 1, 1)
        x = torch.lerp(win[..., :-1], win[..., 1:], fx)
        return torch.lerp(x[..., :-1, :], x[..., 1:, :], fy)


def forward_torch(crops, probe, photons, intensity_scale=None, generator=None, noise=True):
    """Frames from (3, B, n, n) object crops (real, imag, phase): |FFT(P O)|^2 scaled to
    ``photons`` (scalar or (B,) tensor) per unit-norm probe, Poisson-sampled at
    photons / ``intensity_scale`` and multiplied back (a low-dose frame scaled up, as the IOC's
    IntensityScale does). Same physics as :func:`diffraction`; returns float32 (B, n, n)."""
    import torch

    n = probe.shape[-1]
    if n % 2 == 0:  # fftshift of the far field == a (-1)^(row+col) checkerboard on the wave
        k = torch.arange(n, device=probe.device)
        probe = probe * (1 - 2 * ((k[:, None] + k[None, :]) % 2)).to(probe.dtype)
        far = torch.fft.fft2(probe * torch.complex(crops[0], crops[1]), norm="ortho")
    else:
        wave = probe * torch.complex(crops[0], crops[1])
        far = torch.fft.fftshift(torch.fft.fft2(wave, norm="ortho"), dim=(-2, -1))
    ph = torch.as_tensor(photons, dtype=torch.float32, device=crops.device).reshape(-1, 1, 1)
    expected = far.real.square() + far.imag.square()
    if not noise:
        return expected * ph
    sc = (torch.ones_like(ph) if intensity_scale is None else
          torch.as_tensor(intensity_scale, dtype=torch.float32, device=crops.device).reshape(-1, 1, 1))
    return torch.poisson(expected * (ph / sc), generator=generator) * sc


def simulate_scan(cfg: ExperimentConfig | None = None, noise: bool = True, device: str | None = "cpu",
                  positions_m: np.ndarray | None = None, **overrides) -> ScanData:
    """Simulate one spiral scan: frames, positions, metadata and the ground truth.

    Keyword overrides replace fields of ``cfg`` (``simulate_scan(n_positions=50)``). The frames
    are computed at the true positions; ``positions_m`` of the result are the recorded ones
    (true plus ``position_error_m`` rms encoder error), the truth crops are at the true ones.
    ``positions_m`` given: the beam follows this route (N, 2) instead of the spiral (no jitter).
    ``device``: where torch computes the frames ("cpu" default, "cuda", None for a GPU if any).
    """
    import torch

    cfg = cfg or ExperimentConfig()
    if positions_m is not None:
        overrides["n_positions"] = len(positions_m)
    if overrides:
        cfg = ExperimentConfig(**{**cfg.__dict__, **overrides})
    rng = np.random.default_rng(cfg.seed)
    n = cfg.frame_size
    dx = cfg.object_pixel_m
    probe = make_probe(n, dx, cfg.energy_ev, cfg.beam_fwhm_m)

    if positions_m is not None:
        true_pos = np.array(positions_m, np.float64).reshape(-1, 2)
    else:
        true_pos = spiral_positions(cfg.n_positions, cfg.step_m)
        true_pos = true_pos + rng.normal(0, cfg.position_jitter_m, true_pos.shape)
    recorded = true_pos + (rng.normal(0, cfg.position_error_m, true_pos.shape)
                           if cfg.position_error_m > 0 else 0.0)
    shape, origin = map_geometry(true_pos, dx, n, margin_px=8)
    phase = make_sample(shape, dx, cfg.sample_kind, cfg.film_phase_rad, cfg.feature_m,
                        seed=cfg.seed + 1, energy_ev=cfg.energy_ev, fill=cfg.fill)
    obj = transmission(phase, cfg.energy_ev)

    device = _default_device(device)
    sample = _TorchSample(obj, phase, origin, dx, device)
    probe_t = torch.from_numpy(probe).to(device)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    frames = np.empty((cfg.n_positions, n, n), np.uint32 if noise else np.float32)
    truth_crops = np.empty((cfg.n_positions, n, n), np.float32)
    chunk = 256
    with torch.no_grad():
        for s in range(0, cfg.n_positions, chunk):
            crops = sample.crops(true_pos[s : s + chunk], n)
            f = forward_torch(crops, probe_t, cfg.photons_per_frame, generator=gen, noise=noise)
            frames[s : s + chunk] = f.cpu().numpy()
            truth_crops[s : s + chunk] = crops[2].cpu().numpy()

    scan_id = cfg.scan_id or f"sim-{cfg.sample_kind}-{cfg.seed}"
    log.info(
        "simulated scan %s: %d frames %dx%d, step %.0f nm (overlap %.2f), %.3g photons/frame",
        scan_id, cfg.n_positions, n, n, cfg.step_m * 1e9, cfg.overlap, cfg.photons_per_frame,
    )
    return ScanData(
        frames=frames,
        positions_m=recorded,
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
        metadata={"sample_kind": cfg.sample_kind, "photons_per_frame": cfg.photons_per_frame,
                  "film_phase_rad": cfg.film_phase_rad, "position_error_m": cfg.position_error_m,
                  "simulation_seed": cfg.seed},
    )


# --------------------------------------------------------------------------- training pairs
def iter_pairs(
    n_pairs: int,
    cfg: ExperimentConfig | None = None,
    *,
    photons: float | tuple[float, float] | None = None,
    scaled_fraction: float = 0.0,
    scale: float = 10.0,
    map_px: int = 2048,
    pairs_per_map: int = 4096,
    seed: int = 0,
    device: str | None = None,
    batch: int | None = None,
    noise: bool = True,
):
    """Training pairs in chunks, one chunk per sample map: yields dicts of frames (uint32 when
    noisy), labels (the true phase crops, float32), positions_m, photons, intensity_scale, map.

    Each map is a fresh training area (``cfg.sample_kind``, sample seeds from
    ``TRAINING_SEED_BASE``, never a benchmark's) of ``map_px`` square; beam positions are uniform
    over it. ``photons``: per-frame photons as the network sees them (after scaling): a number,
    or (lo, hi) drawn log-uniform per pair; None: ``cfg.photons_per_frame``. A
    ``scaled_fraction`` of the pairs is measured at photons / ``scale`` and multiplied by
    ``scale`` (0.5 ms frames x10). Runs on torch: a GPU when there is one, else the CPU.
    """
    import torch

    cfg = cfg or ExperimentConfig()
    device = _default_device(device)
    batch = batch or (4096 if device.startswith("cuda") else 128)
    n = cfg.frame_size
    dx = cfg.object_pixel_m
    probe = make_probe(n, dx, cfg.energy_ev, cfg.beam_fwhm_m)
    probe_t = torch.from_numpy(probe).to(device)
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator(device=device).manual_seed(int(seed))
    photons = cfg.photons_per_frame if photons is None else photons
    margin = n // 2 + 2
    done, m = 0, 0
    while done < n_pairs:
        k = min(pairs_per_map, n_pairs - done)
        sample_seed = TRAINING_SEED_BASE + 1000 * int(seed) + m
        phase = make_sample((map_px, map_px), dx, cfg.sample_kind, cfg.film_phase_rad,
                            cfg.feature_m, seed=sample_seed, energy_ev=cfg.energy_ev, fill=cfg.fill)
        sample = _TorchSample(transmission(phase, cfg.energy_ev), phase, (0.0, 0.0), dx, device)
        pos = rng.uniform(margin * dx, (map_px - margin) * dx, (k, 2))
        if np.isscalar(photons):
            ph = np.full(k, float(photons))
        else:
            lo, hi = photons
            ph = np.exp(rng.uniform(math.log(lo), math.log(hi), k))
        sc = np.where(rng.uniform(size=k) < scaled_fraction, float(scale), 1.0)
        frames = np.empty((k, n, n), np.uint32 if noise else np.float32)
        labels = np.empty((k, n, n), np.float32)
        with torch.no_grad():
            for s in range(0, k, batch):
                sl = slice(s, s + batch)
                crops = sample.crops(pos[sl], n)
                f = forward_torch(crops, probe_t, torch.from_numpy(ph[sl]).float().to(device),
                                  torch.from_numpy(sc[sl]).float().to(device), gen, noise)
                frames[sl] = f.cpu().numpy()
                labels[sl] = crops[2].cpu().numpy()
        yield {"frames": frames, "labels": labels, "positions_m": pos, "photons": ph,
               "intensity_scale": sc, "map": m, "sample_seed": sample_seed}
        done += k
        m += 1


def simulate_pairs(n_pairs: int, cfg: ExperimentConfig | None = None, **kwargs) -> dict:
    """All of :func:`iter_pairs` in memory, plus the probe, its beam mask (the label weight)
    and the pixel size."""
    cfg = cfg or ExperimentConfig()
    chunks = list(iter_pairs(n_pairs, cfg, **kwargs))
    out = {key: np.concatenate([c[key] for c in chunks])
           for key in ("frames", "labels", "positions_m", "photons", "intensity_scale")}
    out["map"] = np.concatenate([np.full(len(c["frames"]), c["map"]) for c in chunks])
    probe = make_probe(cfg.frame_size, cfg.object_pixel_m, cfg.energy_ev, cfg.beam_fwhm_m)
    out.update(probe=probe, weight=beam_mask(probe).astype(np.uint8), pixel_m=cfg.object_pixel_m)
    return out
