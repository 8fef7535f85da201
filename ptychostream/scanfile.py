"""One HDF5 scan format, read and written by everything (detector, plans, HPC, demo).

Layout follows the areaDetector HDF5 plugin: frames at ``/entry/data/data``,
per-frame attributes under ``/entry/instrument/NDAttributes`` (PosX, PosY in m,
NDArrayUniqueId), plus the metadata iterative reconstruction needs. Simulated
scans also carry their ground truth under ``/entry/simulation``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

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
        return ScanData(
            frames=frame_data,
            positions_m=np.stack([get("/entry/instrument/NDAttributes/PosX"),
                                  get("/entry/instrument/NDAttributes/PosY")], axis=1),
            energy_ev=float(get("/entry/instrument/source/energy")),
            detector_distance_m=float(get("/entry/instrument/detector/distance")),
            detector_pixel_size_m=float(get("/entry/instrument/detector/x_pixel_size")),
            object_pixel_size_m=float(get("/entry/ptychography/object_pixel_size")),
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
