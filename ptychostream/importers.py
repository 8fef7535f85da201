"""Real data in: CXI, ptychodus, PtychoShelves (fold_slice) and Tike files to our scan format.

    ptychostream import auto scan.cxi scan.h5
    ptychostream import ptychodus product.h5 scan.h5 --diffraction data.h5
    ptychostream import tike siemens-star.npz scan.h5 --energy-ev 8800 --distance-m 2 \\
        --detector-pixel-m 75e-6

Each reader turns its layout into frames, beam positions (x, y) in metres and the geometry;
then one common step (:func:`to_scan`) finds where each frame's zero frequency is *from the
data* (the bright undiffracted beam) and centres it, checks every length for unit mistakes,
and fills what the format lacks (object pixel = wavelength * distance / (N * detector pixel)).
What each format stores, and how it is converted:

* CXI (cxidb.org, spec 1.6): frames ``/entry_1/data_1/data`` (or ``instrument_1/detector_1/
  data``), ``/entry_1/sample_1/geometry_1/translation`` (N, 3) m (or ``data_1/translation``),
  ``instrument_1/source_1/energy`` in **joules**, ``detector_1/distance`` and
  ``x_pixel_size`` in m, optional probe ``source_1/illumination``. The spec's translation is the
  sample's, so the beam on the sample is at minus it; files written by ptychodus store the
  probe position there, and are read as such (``/entry_1/process_1/program``).
* ptychodus product file (HDF5): attributes ``probe_energy_eV``, ``detector_object_distance_m``,
  ``exposure_time_s``; datasets ``probe_position_x_m``/``_y_m``/``_indexes`` (beam positions),
  ``probe`` (attributes ``pixel_width_m``); the frames come from the diffraction file it was
  made from (``--diffraction``; ``/entry/data/data``, ``/dp`` or ``/exchange/data``).
* PtychoShelves / fold_slice: ``data_roi*_dp.hdf5`` ``/dp`` (written by MATLAB: last two axes
  transposed on reading) and ``data_roi*_para.hdf5`` ``/ppX``, ``/ppY`` (m; fold_slice's
  ``hdf5_pos.m`` places the probe at ``(-ppY, -ppX)`` (row, col), so the beam is at
  ``(-ppX, -ppY)``); energy, distance and pixel size are options.
* Tike (npz, as its tests' ``siemens-star-small.npz``): ``data`` (zero frequency in the corner,
  as Tike's FFT wants), ``scan`` (row, col) of each probe window's first pixel in object
  pixels, ``probe``; an optional leading axis of views is dropped. The geometry is options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptychostream.scanfile import (
    CENTER,
    CORNER,
    ScanData,
    ScanFileError,
    check_geometry,
    check_positions,
    median_step,
    open_hdf5,
    write_scan,
    zero_frequency_of,
)

log = logging.getLogger(__name__)

FORMATS = ("cxi", "ptychodus", "ptychoshelves", "tike", "ptychostream")
ELECTRON_VOLT_J = 1.602176634e-19
HC_EV_M = 1.239841984e-6  # h c in eV m: wavelength = HC_EV_M / energy


class ScanImportError(ScanFileError):
    """An input file is not the format named, or lacks what a scan needs: says what."""


@dataclass
class Geometry:
    """What a format may lack; ``None`` fields must come from the file."""

    energy_ev: float | None = None
    distance_m: float | None = None
    detector_pixel_m: float | None = None
    object_pixel_m: float | None = None
    beam_fwhm_m: float | None = None
    exposure_s: float | None = None
    scan_id: str | None = None
    extra: dict = field(default_factory=dict)

    def merged(self, **from_file) -> Geometry:
        """The file's values where the caller gave none (the caller's win: a correction)."""
        out = Geometry(**{k: v for k, v in self.__dict__.items()})
        for key, value in from_file.items():
            if getattr(out, key) is None and value is not None:
                setattr(out, key, value)
        return out


# --------------------------------------------------------------------------- the common step
def to_scan(frames: np.ndarray, positions_m: np.ndarray, geo: Geometry, source: str,
            probe: np.ndarray | None = None) -> ScanData:
    """Frames + beam positions + geometry -> a checked, centred :class:`ScanData`."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[-1] != frames.shape[-2]:
        raise ScanImportError(f"{source}: frames must be (N, H, W) square, got {frames.shape}")
    n = frames.shape[-1]
    where = zero_frequency_of(frames)
    if where == CORNER:
        log.info("%s: frames have their zero frequency in the corner: centring them", source)
        frames = np.fft.fftshift(frames, axes=(-2, -1))  # the probe is real-space: kept
    elif where != CENTER:
        log.warning("%s: no bright central peak in the frames (beam stop?): taking them as "
                    "centred", source)
    missing = [name for name in ("energy_ev", "distance_m")
               if getattr(geo, name) is None]
    if geo.detector_pixel_m is None and geo.object_pixel_m is None:
        missing.append("detector_pixel_m (or object_pixel_m)")
    if missing:
        raise ScanImportError(f"{source}: the file does not say {', '.join(missing)}: give them "
                           "(--energy-ev, --distance-m, --detector-pixel-m)")
    wavelength = HC_EV_M / geo.energy_ev
    det_pixel = geo.detector_pixel_m
    if det_pixel is None:
        det_pixel = wavelength * geo.distance_m / (n * geo.object_pixel_m)
    far_field = wavelength * geo.distance_m / (n * det_pixel)
    obj_pixel = geo.object_pixel_m or far_field
    check_geometry(geo.energy_ev, geo.distance_m, det_pixel, obj_pixel)
    if abs(obj_pixel - far_field) > 0.02 * far_field:
        log.warning("%s: object pixel %.4g m differs from the far-field %.4g m of the geometry",
                    source, obj_pixel, far_field)
    beam = geo.beam_fwhm_m or 800e-9
    positions = check_positions(positions_m, obj_pixel, beam, what=f"positions in {source}")
    if len(positions) != len(frames):
        raise ScanImportError(f"{source}: {len(frames)} frames but {len(positions)} positions")
    if probe is not None:
        probe = np.asarray(probe)
        while probe.ndim > 2:  # modes, views: the first (strongest) mode
            probe = probe[0]
        if probe.shape != frames.shape[1:]:
            log.warning("%s: probe %s does not match the frames %s: not kept", source,
                        probe.shape, frames.shape[1:])
            probe = None
    return ScanData(
        frames=frames, positions_m=positions, energy_ev=float(geo.energy_ev),
        detector_distance_m=float(geo.distance_m), detector_pixel_size_m=float(det_pixel),
        object_pixel_size_m=float(obj_pixel), step_m=median_step(positions),
        exposure_s=float(geo.exposure_s or 0.0), scan_id=geo.scan_id or Path(source).stem,
        beam_fwhm_m=beam, probe=None if probe is None else probe.astype(np.complex64),
        metadata={"imported_from": str(source), **geo.extra},
    )


# --------------------------------------------------------------------------- readers
def _scalar(f, path: str):
    if path not in f:
        return None
    v = f[path][()]
    if isinstance(v, bytes):
        return v.decode()
    return v.item() if isinstance(v, np.ndarray) and v.size == 1 else v


def read_cxi(path: str | Path, geo: Geometry | None = None) -> ScanData:
    """A CXI file (see the module docstring for the fields and the translation's sign)."""
    geo = geo or Geometry()
    with open_hdf5(path, "CXI file", ScanImportError) as f:
        data_path = next((p for p in ("/entry_1/data_1/data",
                                      "/entry_1/instrument_1/detector_1/data") if p in f), None)
        pos_path = next((p for p in ("/entry_1/sample_1/geometry_1/translation",
                                     "/entry_1/data_1/translation") if p in f), None)
        if data_path is None or pos_path is None:
            raise ScanImportError(f"{path}: not a CXI ptychography file (needs /entry_1/data_1/data "
                               "and /entry_1/sample_1/geometry_1/translation)")
        frames = f[data_path][()]
        translation = np.asarray(f[pos_path][()], np.float64)
        program = str(_scalar(f, "/entry_1/process_1/program") or "")
        energy = _scalar(f, "/entry_1/instrument_1/source_1/energy")
        if energy is not None:
            energy = float(energy)
            energy = energy / ELECTRON_VOLT_J if energy < 1e-10 else energy  # spec: joules
        illumination = (f["/entry_1/instrument_1/source_1/illumination"][()]
                        if "/entry_1/instrument_1/source_1/illumination" in f else None)
        geo = geo.merged(
            energy_ev=energy,
            distance_m=_scalar(f, "/entry_1/instrument_1/detector_1/distance"),
            detector_pixel_m=_scalar(f, "/entry_1/instrument_1/detector_1/x_pixel_size"),
            exposure_s=_scalar(f, "/entry_1/ptychodus/exposure_time_s"),
            scan_id=_scalar(f, "/entry_1/title") or None,
        )
    if translation.ndim != 2 or translation.shape[1] < 2:
        raise ScanImportError(f"{path}: translation must be (N, 3), got {translation.shape}")
    sign = 1.0 if program.lower().startswith("ptychodus") else -1.0  # spec: sample translation
    return to_scan(frames, sign * translation[:, :2], geo, str(path), probe=illumination)


#: where a ptychodus product's diffraction file may keep its frames
DIFFRACTION_PATHS = ("/entry/data/data", "/dp", "/exchange/data", "/entry_1/data_1/data")


def read_ptychodus(path: str | Path, diffraction: str | Path | None = None,
                   geo: Geometry | None = None, data_path: str | None = None) -> ScanData:
    """A ptychodus product file and the diffraction file its positions index."""
    geo = geo or Geometry()
    with open_hdf5(path, "ptychodus product file", ScanImportError) as f:
        needed = ("probe_position_x_m", "probe_position_y_m")
        if not all(k in f for k in needed):
            raise ScanImportError(f"{path}: not a ptychodus product file (needs "
                               f"{', '.join(needed)})")
        x = np.asarray(f["probe_position_x_m"][()], np.float64)
        y = np.asarray(f["probe_position_y_m"][()], np.float64)
        index = (np.asarray(f["probe_position_indexes"][()], np.int64)
                 if "probe_position_indexes" in f else np.arange(len(x)))
        probe = f["probe"][()] if "probe" in f else None
        pixel = float(f["probe"].attrs["pixel_width_m"]) if (
            probe is not None and "pixel_width_m" in f["probe"].attrs) else None
        attrs = f.attrs
        geo = geo.merged(
            energy_ev=float(attrs["probe_energy_eV"]) if "probe_energy_eV" in attrs else None,
            distance_m=(float(attrs["detector_object_distance_m"])
                        if "detector_object_distance_m" in attrs else None),
            exposure_s=float(attrs["exposure_time_s"]) if "exposure_time_s" in attrs else None,
            object_pixel_m=pixel,
            scan_id=str(attrs["name"]) if attrs.get("name") else None,
        )
    if diffraction is None:
        raise ScanImportError(f"{path}: a ptychodus product holds no frames: give the diffraction "
                           "file it was made from (--diffraction)")
    with open_hdf5(diffraction, "diffraction file", ScanImportError) as f:
        paths = (data_path,) if data_path else DIFFRACTION_PATHS
        found = next((p for p in paths if p in f), None)
        if found is None:
            raise ScanImportError(f"{diffraction}: no frames at {', '.join(paths)} (--data-path)")
        n_frames = f[found].shape[0]
        if index.size and (index.min() < 0 or index.max() >= n_frames):
            raise ScanImportError(f"{diffraction}: {n_frames} frames, but the product indexes "
                                  f"frames {index.min()}..{index.max()}")
        frames = f[found][()][index]
    return to_scan(frames, np.stack([x, y], axis=1), geo, str(path), probe=probe)


def read_ptychoshelves(path: str | Path, positions: str | Path | None = None,
                       geo: Geometry | None = None) -> ScanData:
    """PtychoShelves ``data_roi*_dp.hdf5`` (``/dp``) and its ``data_roi*_para.hdf5``."""
    geo = geo or Geometry()
    path = Path(path)
    para = Path(positions) if positions else path.with_name(
        path.name.replace("_dp.hdf5", "_para.hdf5"))
    with open_hdf5(path, "PtychoShelves dp file", ScanImportError) as f:
        if "dp" not in f:
            raise ScanImportError(f"{path}: not a PtychoShelves dp file (no /dp)")
        frames = np.swapaxes(f["dp"][()], -1, -2)  # MATLAB wrote it column-major
    with open_hdf5(para, "PtychoShelves para file", ScanImportError) as f:
        if "ppX" not in f or "ppY" not in f:
            raise ScanImportError(f"{para}: no /ppX and /ppY positions")
        x = -np.ravel(f["ppX"][()]).astype(np.float64)
        y = -np.ravel(f["ppY"][()]).astype(np.float64)
    return to_scan(frames, np.stack([x, y], axis=1), geo, str(path))


def read_tike(path: str | Path, geo: Geometry | None = None) -> ScanData:
    """A Tike npz (``data``, ``scan``, ``probe``): positions from window corners in pixels."""
    geo = geo or Geometry()
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ScanImportError(f"{path}: not a readable npz file: {exc}") from exc
    with archive:
        if "data" not in archive or "scan" not in archive:
            raise ScanImportError(f"{path}: not a Tike npz (needs 'data' and 'scan')")
        data = archive["data"]
        scan = np.asarray(archive["scan"], np.float64)
        probe = archive["probe"] if "probe" in archive else None
    if data.ndim == 4:  # (views, N, H, W): one view
        data, scan = data[0], scan[0]
    n = data.shape[-1]
    if geo.object_pixel_m is None and None in (geo.energy_ev, geo.distance_m,
                                               geo.detector_pixel_m):
        raise ScanImportError(f"{path}: a Tike npz has no geometry: give --energy-ev, "
                           "--distance-m and --detector-pixel-m (or --object-pixel-m)")
    dx = geo.object_pixel_m or (HC_EV_M / geo.energy_ev * geo.distance_m
                                / (n * geo.detector_pixel_m))
    centre = scan + (n - 1) / 2  # beam centre (row, col) in object pixels
    return to_scan(data, np.stack([centre[:, 1], centre[:, 0]], axis=1) * dx, geo, str(path),
                   probe=probe)


# --------------------------------------------------------------------------- dispatch
def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its contents (HDF5 groups, npz keys)."""
    path = Path(path)
    if path.suffix == ".npz":
        return "tike"
    with open_hdf5(path, "input file", ScanImportError) as f:
        if "/entry/instrument/NDAttributes/PosX" in f:
            return "ptychostream"
        if "/entry_1" in f:
            return "cxi"
        if "probe_position_x_m" in f:
            return "ptychodus"
        if "dp" in f:
            return "ptychoshelves"
    raise ScanImportError(f"{path}: not a format ptychostream imports ({', '.join(FORMATS)})")


def import_scan(path: str | Path, fmt: str = "auto", geo: Geometry | None = None,
                **options) -> ScanData:
    """Read ``path`` (format ``fmt`` or detected) into a checked, centred ScanData.

    ``options``: ``diffraction`` and ``data_path`` (ptychodus), ``positions`` (PtychoShelves)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    log.info("importing %s as %s", path, fmt)
    geo = geo or Geometry()
    if fmt == "cxi":
        return read_cxi(path, geo)
    if fmt == "ptychodus":
        return read_ptychodus(path, options.get("diffraction"), geo, options.get("data_path"))
    if fmt == "ptychoshelves":
        return read_ptychoshelves(path, options.get("positions"), geo)
    if fmt == "tike":
        return read_tike(path, geo)
    if fmt == "ptychostream":
        from ptychostream.scanfile import read_scan

        return read_scan(path)
    raise ScanImportError(f"unknown format {fmt!r}: one of auto, {', '.join(FORMATS)}")


def convert(path: str | Path, out: str | Path, fmt: str = "auto", geo: Geometry | None = None,
            **options) -> Path:
    """Import ``path`` and write it as a ptychostream scan file ``out``; returns ``out``."""
    return write_scan(out, import_scan(path, fmt, geo, **options))
