"""One HDF5 scan format, read and written by everything (detector, plans, HPC, demo).

Layout follows the areaDetector HDF5 plugin: frames at ``/entry/data/data``,
per-frame attributes under ``/entry/instrument/NDAttributes`` (PosX, PosY in m,
NDArrayUniqueId), plus the metadata iterative reconstruction needs. Simulated
scans also carry their ground truth under ``/entry/simulation``.

Conventions, recorded in the file as attributes of ``/entry/ptychography`` and checked on
reading: ``zero_frequency`` = "center" (frames fftshifted: the undiffracted beam in the middle,
as a detector sees it) and ``position_convention`` = "beam_xy" (PosX/PosY are where the beam
sits on the sample, x along map columns, y along map rows, metres; see
:mod:`ptychostream.geometry`). A file whose frames say otherwise than its attribute is refused;
one recorded as "corner" is shifted on reading. Positions and pixel sizes get unit sanity checks
(:func:`check_positions`, :func:`check_geometry`) so a route in the wrong units fails with a
message naming the likely mistake instead of a map of petabytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: zero_frequency and position_convention recorded

CENTER, CORNER = "center", "corner"  # where the zero frequency of a frame is
BEAM_XY = "beam_xy"  # positions: beam on the sample (x, y), metres
#: a scan's positions may span at most this many object pixels (1e5 px = a 40 GB map)
MAX_SPAN_PX = 1e5
_UNIT_GUESSES = (("nm", 1e-9), ("um", 1e-6), ("mm", 1e-3))

# (HDF5 path, ScanData field, units); every one of these must be present in a scan file.
REQUIRED = [
    ("/entry/data/data", "frames", "counts"),
    ("/entry/instrument/NDAttributes/PosX", "positions_m", "m"),
    ("/entry/instrument/NDAttributes/PosY", "positions_m", "m"),
    ("/entry/instrument/source/energy", "energy_ev", "eV"),
    ("/entry/instrument/detector/distance", "detector_distance_m", "m"),
    ("/entry/instrument/detector/x_pixel_size", "detector_pixel_size_m", "m"),
    ("/entry/instrument/detector/count_time", "exposure_s", "s"),
    ("/entry/ptychography/object_pixel_size", "object_pixel_size_m", "m"),
    ("/entry/ptychography/step", "step_m", "m"),
    ("/entry/ptychography/scan_id", "scan_id", ""),
]
OPTIONAL = [
    ("/entry/instrument/NDAttributes/NDArrayUniqueId", "unique_ids", ""),
    ("/entry/ptychography/beam_fwhm", "beam_fwhm_m", "m"),
    ("/entry/ptychography/probe", "probe", ""),
    ("/entry/simulation/truth_phase", "truth_phase", "rad"),
    ("/entry/simulation/truth_origin", "truth_origin_m", "m"),
    ("/entry/simulation/truth_crops", "truth_crops", "rad"),
]


class ScanFileError(ValueError):
    """A scan file is unreadable or lacks something reconstruction needs."""


class ScanUnitsError(ScanFileError):
    """Positions or pixel sizes that cannot be metres (a unit mistake): says which, and why."""


# --------------------------------------------------------------------------- checks
def median_step(positions_m: np.ndarray) -> float:
    """Median nearest-neighbour distance: the scan's step size as measured, not as planned."""
    pos = np.asarray(positions_m, float)
    if len(pos) < 2:
        return 0.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(pos).query(pos, k=2)
    return float(np.median(dist[:, 1]))


def _unit_hint(value_m: float, lo: float, hi: float) -> str:
    """'they look like um' when value * 1e-6 (etc.) falls in [lo, hi]."""
    for unit, factor in _UNIT_GUESSES:
        if lo <= value_m * factor <= hi:
            return f"; the numbers look like {unit} (times {factor:g} gives metres)"
    return ""


def check_positions(positions_m, pixel_m: float | None = None, beam_m: float | None = None,
                    what: str = "positions") -> np.ndarray:
    """Beam positions (N, 2) x, y in metres, checked: finite, and a span a map can hold.

    Refuses (ScanUnitsError) a span of more than :data:`MAX_SPAN_PX` object pixels (or of more
    than 1e4 beam widths), naming the likely unit mistake; returns the positions as float64."""
    pos = np.asarray(positions_m, np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
        raise ScanUnitsError(f"{what} must be an (N, 2) array of x, y in metres, got shape "
                             f"{pos.shape}")
    if not np.isfinite(pos).all():
        raise ScanUnitsError(f"{what} contain NaN or inf")
    span = float(np.ptp(pos, axis=0).max())
    limits = []
    if pixel_m:
        limits.append((MAX_SPAN_PX * pixel_m, f"{span / pixel_m:.3g} pixels of {pixel_m:.3g} m "
                                              f"(at most {MAX_SPAN_PX:g})"))
    if beam_m:
        limits.append((1e4 * beam_m, f"{span / beam_m:.3g} beam widths of {beam_m:.3g} m "
                                     "(at most 1e4)"))
    for limit, detail in limits:
        if span > limit:
            raise ScanUnitsError(f"{what} span {span:.3g} m = {detail}: positions must be in "
                                 f"metres{_unit_hint(span, limit / 1e4, limit)}")
    return pos


def check_geometry(energy_ev: float, distance_m: float, detector_pixel_m: float,
                   object_pixel_m: float | None = None) -> None:
    """Refuse (ScanUnitsError) an energy, distance or pixel size no ptychography set-up has."""
    checks = [
        ("energy", energy_ev, 100.0, 1e6, "eV", ""),
        ("detector distance", distance_m, 1e-3, 1e3, "m", _unit_hint(distance_m, 1e-3, 1e3)),
        ("detector pixel size", detector_pixel_m, 1e-7, 1e-2, "m",
         _unit_hint(detector_pixel_m, 1e-7, 1e-2)),
    ]
    if object_pixel_m is not None:
        checks.append(("object pixel size", object_pixel_m, 1e-11, 1e-5, "m",
                       _unit_hint(object_pixel_m, 1e-11, 1e-5)))
    for name, value, lo, hi, unit, hint in checks:
        if not (np.isfinite(value) and lo <= value <= hi):
            if name == "energy" and np.isfinite(value) and 1e-17 < value < 1e-13:
                hint = "; it looks like joules (CXI stores J: divide by 1.602e-19)"
            elif name == "energy" and np.isfinite(value) and 0.1 <= value < 100:
                hint = "; it looks like keV (times 1000 gives eV)"
            raise ScanUnitsError(f"{name} {float(value):g} {unit} is outside [{lo:g}, {hi:g}] "
                                 f"{unit}{hint}")


def zero_frequency_of(frames: np.ndarray, max_frames: int = 64) -> str:
    """Where the frames' bright central peak is: "center", "corner" or "unknown".

    Compares the mean intensity near the middle with that near the four corners (the same
    disc, fftshifted) over up to ``max_frames`` frames."""
    f = np.asarray(frames[: max_frames], np.float64)
    if f.ndim == 2:
        f = f[None]
    mean = f.mean(axis=0)
    h, w = mean.shape
    r = max(2, min(h, w) // 16)
    yy, xx = np.ogrid[:h, :w]
    disc = (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= r * r
    middle = float(mean[disc].mean())
    corners = float(mean[np.fft.ifftshift(disc)].mean())
    if middle > 4 * corners:
        return CENTER
    if corners > 4 * middle:
        return CORNER
    return "unknown"


def load_positions(path: str | Path, units: str = "m") -> np.ndarray:
    """A scan route: .npy (N, 2) or .csv/.txt (columns x, y, header line optional), beam
    positions in ``units`` (m, mm, um, nm); returns metres, unit-checked against a 1e5 m span."""
    path = Path(path)
    scale = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "nm": 1e-9}.get(units)
    if scale is None:
        raise ScanUnitsError(f"unknown position units {units!r}: m, mm, um or nm")
    if not path.exists():
        raise ScanFileError(f"positions file {path} does not exist")
    if path.suffix == ".npy":
        xy = np.load(path, allow_pickle=False)
    else:
        try:
            xy = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:  # a header line
            xy = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
    xy = np.asarray(xy, np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ScanFileError(f"{path}: expected two columns x, y, got shape {xy.shape}")
    return check_positions(xy[:, :2] * scale, what=f"positions in {path.name}")


@dataclass
class ScanData:
    """A ptychography scan in memory. Positions are (x, y) beam positions in metres."""

    frames: np.ndarray  # (N, H, W) counts
    positions_m: np.ndarray  # (N, 2) x, y
    energy_ev: float
    detector_distance_m: float
    detector_pixel_size_m: float
    object_pixel_size_m: float
    step_m: float
    exposure_s: float
    scan_id: str
    beam_fwhm_m: float = 800e-9
    unique_ids: np.ndarray | None = None
    probe: np.ndarray | None = None  # (H, W) complex, known or initial probe
    truth_phase: np.ndarray | None = None  # simulation only
    truth_origin_m: tuple[float, float] | None = None
    truth_crops: np.ndarray | None = None  # (N, H, W) true phase at each position
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions_m = np.asarray(self.positions_m, np.float64)
        if self.unique_ids is None:
            self.unique_ids = np.arange(1, len(self.frames) + 1, dtype=np.int64)
        if len(self.positions_m) != len(self.frames):
            raise ScanFileError(
                f"{len(self.frames)} frames but {len(self.positions_m)} positions"
            )

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def frame_size(self) -> int:
        return int(self.frames.shape[-1])

    def subset(self, index) -> ScanData:
        """A scan with only the frames ``index`` selects (slice, mask or indices)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return ScanData(
            frames=self.frames[index], positions_m=self.positions_m[index],
            energy_ev=self.energy_ev, detector_distance_m=self.detector_distance_m,
            detector_pixel_size_m=self.detector_pixel_size_m,
            object_pixel_size_m=self.object_pixel_size_m, step_m=self.step_m,
            exposure_s=self.exposure_s, scan_id=self.scan_id, beam_fwhm_m=self.beam_fwhm_m,
            unique_ids=pick(self.unique_ids), probe=self.probe, truth_phase=self.truth_phase,
            truth_origin_m=self.truth_origin_m, truth_crops=pick(self.truth_crops),
            metadata=dict(self.metadata),
        )


def write_scan(path: str | Path, scan: ScanData, compression: str | None = "gzip") -> Path:
    """Write ``scan`` to ``path`` (areaDetector-style HDF5). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        f.attrs["ptychostream_format"] = FORMAT_VERSION
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        frames = np.asarray(scan.frames)
        data.create_dataset(
            "data", data=frames, chunks=(1, *frames.shape[1:]), compression=compression
        )
        attrs = entry.create_group("instrument/NDAttributes")
        attrs.create_dataset("PosX", data=scan.positions_m[:, 0]).attrs["units"] = "m"
        attrs.create_dataset("PosY", data=scan.positions_m[:, 1]).attrs["units"] = "m"
        attrs.create_dataset("NDArrayUniqueId", data=np.asarray(scan.unique_ids, np.int64))

        def scalar(p: str, value, units: str = "") -> None:
            ds = f.create_dataset(p, data=value)
            if units:
                ds.attrs["units"] = units

        scalar("/entry/instrument/source/energy", scan.energy_ev, "eV")
        scalar("/entry/instrument/detector/distance", scan.detector_distance_m, "m")
        scalar("/entry/instrument/detector/x_pixel_size", scan.detector_pixel_size_m, "m")
        scalar("/entry/instrument/detector/y_pixel_size", scan.detector_pixel_size_m, "m")
        scalar("/entry/instrument/detector/count_time", scan.exposure_s, "s")
        scalar("/entry/ptychography/object_pixel_size", scan.object_pixel_size_m, "m")
        scalar("/entry/ptychography/step", scan.step_m, "m")
        scalar("/entry/ptychography/beam_fwhm", scan.beam_fwhm_m, "m")
        scalar("/entry/ptychography/scan_id", scan.scan_id)
        if scan.probe is not None:
            f.create_dataset("/entry/ptychography/probe", data=np.asarray(scan.probe, np.complex64))
        if scan.truth_phase is not None:
            f.create_dataset("/entry/simulation/truth_phase", data=scan.truth_phase,
                             compression=compression)
            f.create_dataset("/entry/simulation/truth_origin", data=np.asarray(scan.truth_origin_m))
        if scan.truth_crops is not None:
            f.create_dataset("/entry/simulation/truth_crops", data=scan.truth_crops,
                             chunks=(1, *scan.truth_crops.shape[1:]), compression=compression)
        ptycho = f["/entry/ptychography"]
        ptycho.attrs["zero_frequency"] = CENTER
        ptycho.attrs["position_convention"] = BEAM_XY
        meta = entry.create_group("ptychography/metadata")
        for k, v in scan.metadata.items():
            meta.attrs[k] = v
    log.info("wrote scan %s (%d frames) to %s", scan.scan_id, scan.n_frames, path)
    return path


def open_hdf5(path: str | Path, what: str, error: type[Exception] = ScanFileError) -> h5py.File:
    """Open an HDF5 file read-only, or raise ``error`` saying it is absent or not HDF5."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise error(f"{path} is not a readable HDF5 file: {exc}") from exc


def read_scan(path: str | Path, frames: bool = True) -> ScanData:
    """Read a scan file; raises ScanFileError naming every missing field.

    ``frames=False`` skips the frame data (positions and metadata only)."""
    with open_hdf5(path, "scan file", ScanFileError) as f:
        missing = [f"{p} ({name}{', ' + u if u else ''})" for p, name, u in REQUIRED if p not in f]
        if missing:
            raise ScanFileError(f"{path} lacks: " + "; ".join(missing))

        def get(p: str):
            v = f[p][()]
            return v.decode() if isinstance(v, bytes) else v

        def opt(p: str):
            return f[p][()] if p in f else None

        data = f["/entry/data/data"]
        frame_data = data[()] if frames else np.zeros((data.shape[0], 0, 0), data.dtype)
        origin = opt("/entry/simulation/truth_origin")
        meta = dict(f["/entry/ptychography/metadata"].attrs) if "/entry/ptychography/metadata" in f else {}
        conv = f["/entry/ptychography"].attrs
        zero = _attr_str(conv.get("zero_frequency", CENTER))  # version 1 files: centred
        if zero not in (CENTER, CORNER):
            raise ScanFileError(f"{path}: zero_frequency {zero!r} is neither 'center' nor 'corner'")
        convention = _attr_str(conv.get("position_convention", BEAM_XY))
        if convention != BEAM_XY:
            raise ScanFileError(f"{path}: position_convention {convention!r} is not {BEAM_XY!r}; "
                                "convert it with ptychostream import")
        if frames and frame_data.size:
            seen = zero_frequency_of(frame_data)
            if seen not in (zero, "unknown"):
                raise ScanFileError(
                    f"{path}: the file says the frames' zero frequency is at the {zero} but their "
                    f"bright peak is at the {seen}: reconstructing them would give garbage. "
                    f"Fix the file (np.fft.{'fftshift' if seen == CORNER else 'ifftshift'} over "
                    "the last two axes, or ptychostream import)")
            if zero == CORNER:
                log.info("%s: frames have their zero frequency in the corner: shifting them", path)
                frame_data = np.fft.fftshift(frame_data, axes=(-2, -1))
        positions = np.stack([get("/entry/instrument/NDAttributes/PosX"),
                              get("/entry/instrument/NDAttributes/PosY")], axis=1)
        energy = float(get("/entry/instrument/source/energy"))
        distance = float(get("/entry/instrument/detector/distance"))
        det_pixel = float(get("/entry/instrument/detector/x_pixel_size"))
        obj_pixel = float(get("/entry/ptychography/object_pixel_size"))
        try:
            check_geometry(energy, distance, det_pixel, obj_pixel)
            beam = float(opt("/entry/ptychography/beam_fwhm") or 800e-9)
            check_positions(positions, obj_pixel, beam, what=f"positions in {path}")
        except ScanUnitsError as exc:
            raise ScanUnitsError(f"{path}: {exc}") from None
        return ScanData(
            frames=frame_data,
            positions_m=positions,
            energy_ev=energy,
            detector_distance_m=distance,
            detector_pixel_size_m=det_pixel,
            object_pixel_size_m=obj_pixel,
            step_m=float(get("/entry/ptychography/step")),
            exposure_s=float(get("/entry/instrument/detector/count_time")),
            scan_id=str(get("/entry/ptychography/scan_id")),
            beam_fwhm_m=float(opt("/entry/ptychography/beam_fwhm") or 800e-9),
            unique_ids=opt("/entry/instrument/NDAttributes/NDArrayUniqueId"),
            probe=opt("/entry/ptychography/probe"),
            truth_phase=opt("/entry/simulation/truth_phase"),
            truth_origin_m=None if origin is None else (float(origin[0]), float(origin[1])),
            truth_crops=opt("/entry/simulation/truth_crops"),
            metadata=meta,
        )


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
