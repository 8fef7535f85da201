"""Real data in: tiny files in each format's layout (CXI, ptychodus, PtychoShelves, Tike), made
here from a simulated scan, import to the same scan; centring and units are checked from the data."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptychostream.importers import (
    ELECTRON_VOLT_J,
    Geometry,
    ScanImportError,
    detect_format,
    import_scan,
)
from ptychostream.scanfile import (
    CORNER,
    ScanFileError,
    ScanUnitsError,
    load_positions,
    read_scan,
    write_scan,
    zero_frequency_of,
)


def write_cxi(path, scan, program: str = ""):
    """CXI 1.6 layout; translation is the sample's (minus the beam position), energy in J."""
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 160
        f["/entry_1/instrument_1/detector_1/data"] = scan.frames
        f["/entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        xyz = np.zeros((scan.n_frames, 3))
        xyz[:, :2] = scan.positions_m if program else -scan.positions_m
        f["/entry_1/sample_1/geometry_1/translation"] = xyz
        f["/entry_1/instrument_1/source_1/energy"] = scan.energy_ev * ELECTRON_VOLT_J
        f["/entry_1/instrument_1/detector_1/distance"] = scan.detector_distance_m
        f["/entry_1/instrument_1/detector_1/x_pixel_size"] = scan.detector_pixel_size_m
        f["/entry_1/instrument_1/detector_1/y_pixel_size"] = scan.detector_pixel_size_m
        f["/entry_1/instrument_1/source_1/illumination"] = scan.probe
        if program:
            f["/entry_1/process_1/program"] = program
    return path


def same_scan(got, scan, atol_m: float = 1e-12):
    np.testing.assert_array_equal(got.frames, scan.frames)
    np.testing.assert_allclose(got.positions_m, scan.positions_m, atol=atol_m)
    assert got.energy_ev == pytest.approx(scan.energy_ev)
    assert got.detector_distance_m == pytest.approx(scan.detector_distance_m)
    assert got.object_pixel_size_m == pytest.approx(scan.object_pixel_size_m, rel=1e-9)


def test_cxi_and_ptychodus_written_cxi(tmp_path, small_scan):
    path = write_cxi(tmp_path / "scan.cxi", small_scan)
    assert detect_format(path) == "cxi"
    got = import_scan(path)
    same_scan(got, small_scan)
    np.testing.assert_allclose(got.probe, small_scan.probe, rtol=1e-5, atol=1e-7)
    # ptychodus writes the probe position (not the sample's translation) in the same field
    pty = write_cxi(tmp_path / "ptychodus.cxi", small_scan, program="Ptychodus")
    same_scan(import_scan(pty, "cxi"), small_scan)


def test_ptychodus_product_and_diffraction_files(tmp_path, small_scan):
    n = small_scan.n_frames
    diff = tmp_path / "diffraction.h5"
    with h5py.File(diff, "w") as f:  # an areaDetector-layout file, as ptychodus reads
        f["/entry/data/data"] = small_scan.frames
    order = np.random.default_rng(1).permutation(n)  # positions may come in any order
    product = tmp_path / "product.h5"
    with h5py.File(product, "w") as f:
        f.attrs["name"] = "star"
        f.attrs["probe_energy_eV"] = small_scan.energy_ev
        f.attrs["detector_object_distance_m"] = small_scan.detector_distance_m
        f.attrs["exposure_time_s"] = small_scan.exposure_s
        f["probe_position_indexes"] = order
        f["probe_position_x_m"] = small_scan.positions_m[order, 0]
        f["probe_position_y_m"] = small_scan.positions_m[order, 1]
        probe = f.create_dataset("probe", data=small_scan.probe[None, None])
        probe.attrs["pixel_width_m"] = small_scan.object_pixel_size_m
        probe.attrs["pixel_height_m"] = small_scan.object_pixel_size_m
    assert detect_format(product) == "ptychodus"
    with pytest.raises(ScanImportError, match="--diffraction"):
        import_scan(product)
    got = import_scan(product, diffraction=diff)
    np.testing.assert_array_equal(got.frames, small_scan.frames[order])
    np.testing.assert_allclose(got.positions_m, small_scan.positions_m[order], atol=1e-12)
    assert got.scan_id == "star" and got.exposure_s == pytest.approx(small_scan.exposure_s)
    assert got.detector_pixel_size_m == pytest.approx(small_scan.detector_pixel_size_m)


def test_ptychoshelves_dp_and_para(tmp_path, small_scan):
    dp = tmp_path / "data_roi0_dp.hdf5"
    with h5py.File(dp, "w") as f:  # MATLAB's column-major write: last two axes swapped
        f["dp"] = np.swapaxes(small_scan.frames, -1, -2)
    with h5py.File(tmp_path / "data_roi0_para.hdf5", "w") as f:
        f["ppX"] = -small_scan.positions_m[:, 0]
        f["ppY"] = -small_scan.positions_m[:, 1]
    assert detect_format(dp) == "ptychoshelves"
    with pytest.raises(ScanImportError, match="energy_ev"):
        import_scan(dp)
    geo = Geometry(energy_ev=small_scan.energy_ev, distance_m=small_scan.detector_distance_m,
                   detector_pixel_m=small_scan.detector_pixel_size_m)
    same_scan(import_scan(dp, geo=geo), small_scan)


def test_tike_npz_has_its_zero_frequency_in_the_corner(tmp_path, small_scan):
    n = small_scan.frame_size
    dx = small_scan.object_pixel_size_m
    corner = np.fft.ifftshift(small_scan.frames, axes=(-2, -1))  # what Tike's FFT wants
    assert zero_frequency_of(corner) == CORNER
    rows_cols = small_scan.positions_m[:, ::-1] / dx - (n - 1) / 2  # window corners (row, col)
    path = tmp_path / "star.npz"
    np.savez(path, data=corner[None], scan=rows_cols[None],
             probe=small_scan.probe[None, None, None, None])
    assert detect_format(path) == "tike"
    geo = Geometry(energy_ev=small_scan.energy_ev, distance_m=small_scan.detector_distance_m,
                   detector_pixel_m=small_scan.detector_pixel_size_m)
    got = import_scan(path, geo=geo)
    same_scan(got, small_scan, atol_m=1e-15)  # centred on import, from the data
    out = write_scan(tmp_path / "ours.h5", got)
    np.testing.assert_array_equal(read_scan(out).frames, small_scan.frames)


def test_reading_checks_the_recorded_centring_against_the_data(tmp_path, small_scan):
    path = write_scan(tmp_path / "s.h5", small_scan)
    with h5py.File(path, "a") as f:  # frames in the corner, but the file says centred
        f["/entry/data/data"][...] = np.fft.ifftshift(small_scan.frames, axes=(-2, -1))
    with pytest.raises(ScanFileError, match="bright peak is at the corner"):
        read_scan(path)
    with h5py.File(path, "a") as f:  # recorded as corner: shifted on reading
        f["/entry/ptychography"].attrs["zero_frequency"] = "corner"
    np.testing.assert_array_equal(read_scan(path).frames, small_scan.frames)
    with h5py.File(path, "a") as f:
        f["/entry/ptychography"].attrs["position_convention"] = "sample_translation"
    with pytest.raises(ScanFileError, match="position_convention"):
        read_scan(path)


def test_unit_mistakes_are_refused_with_the_likely_cause(tmp_path, small_scan):
    # positions written in um: a map of 1e8 pixels a side (the 535 PiB MemoryError of before)
    um = small_scan.subset(slice(None))
    um.positions_m = small_scan.positions_m * 1e6
    path = write_scan(tmp_path / "um.h5", um)
    with pytest.raises(ScanUnitsError, match=r"pixels .* look like um"):
        read_scan(path)
    # a CXI file whose energy is in keV instead of J or eV
    cxi = write_cxi(tmp_path / "kev.cxi", small_scan)
    with h5py.File(cxi, "a") as f:
        f["/entry_1/instrument_1/source_1/energy"][...] = 10.0
    with pytest.raises(ScanUnitsError, match="keV"):
        import_scan(cxi)
    # a route file in nm given as metres
    route = tmp_path / "route.csv"
    np.savetxt(route, small_scan.positions_m * 1e9, delimiter=",", header="x,y")
    with pytest.raises(ScanUnitsError, match="look like nm"):
        from ptychostream.scanfile import check_positions

        check_positions(load_positions(route), small_scan.object_pixel_size_m)
    np.testing.assert_allclose(load_positions(route, units="nm"), small_scan.positions_m,
                               rtol=1e-12, atol=1e-15)
