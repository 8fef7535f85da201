"""HDF5 scan files: round trip and clear errors (issue 2)."""

import h5py
import numpy as np
import pytest

from ptychostream.scanfile import ScanFileError, read_scan, write_scan


def test_round_trip(tmp_path, small_scan):
    path = write_scan(tmp_path / "scan.h5", small_scan)
    back = read_scan(path)
    np.testing.assert_array_equal(back.frames, small_scan.frames)
    np.testing.assert_array_equal(back.positions_m, small_scan.positions_m)
    np.testing.assert_array_equal(back.unique_ids, small_scan.unique_ids)
    np.testing.assert_array_equal(back.truth_crops, small_scan.truth_crops)
    np.testing.assert_allclose(back.probe, small_scan.probe)
    for name in ("energy_ev", "detector_distance_m", "detector_pixel_size_m",
                 "object_pixel_size_m", "step_m", "exposure_s", "scan_id", "beam_fwhm_m"):
        assert getattr(back, name) == getattr(small_scan, name), name
    assert back.truth_origin_m == pytest.approx(small_scan.truth_origin_m)


def test_areadetector_layout(tmp_path, small_scan):
    path = write_scan(tmp_path / "scan.h5", small_scan)
    with h5py.File(path) as f:
        assert f["/entry/data/data"].shape == small_scan.frames.shape
        assert f["/entry/instrument/NDAttributes/PosX"].attrs["units"] == "m"


def test_missing_fields_are_named(tmp_path, small_scan):
    path = write_scan(tmp_path / "scan.h5", small_scan)
    with h5py.File(path, "a") as f:
        del f["/entry/instrument/source/energy"]
        del f["/entry/instrument/NDAttributes/PosY"]
    with pytest.raises(ScanFileError) as err:
        read_scan(path)
    msg = str(err.value)
    assert "/entry/instrument/source/energy (energy_ev, eV)" in msg
    assert "PosY" in msg


def test_not_hdf5_and_absent(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(ScanFileError, match="not a readable HDF5"):
        read_scan(bad)
    with pytest.raises(ScanFileError, match="does not exist"):
        read_scan(tmp_path / "nope.h5")


def test_metadata_only_read(tmp_path, small_scan):
    back = read_scan(write_scan(tmp_path / "s.h5", small_scan), frames=False)
    assert back.n_frames == small_scan.n_frames
    assert back.frames.size == 0


def test_subset(small_scan):
    sub = small_scan.subset(slice(0, 10))
    assert sub.n_frames == 10
    np.testing.assert_array_equal(sub.truth_crops, small_scan.truth_crops[:10])
