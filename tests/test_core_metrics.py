"""SSIM and stitching (issue 2)."""

import numpy as np
import pytest

from ptychostream.metrics import phase_ssim
from ptychostream.stitch import Stitcher, stitch


def test_ssim_identical_is_one_unrelated_is_low(small_scan):
    truth = small_scan.truth_phase
    assert phase_ssim(truth, truth) == pytest.approx(1.0)
    noise = np.random.default_rng(0).uniform(0, 1, truth.shape).astype(np.float32)
    assert phase_ssim(noise, truth) < 0.1
    assert phase_ssim(truth + 0.7, truth) == pytest.approx(1.0)  # global phase is free
    assert phase_ssim(truth + 0.7, truth, align_offset=False) < 0.9


def test_ssim_on_common_region_only(small_scan):
    truth = small_scan.truth_phase
    partial = truth.copy()
    partial[:, : truth.shape[1] // 2] = np.nan
    assert phase_ssim(partial, truth) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no common"):
        phase_ssim(np.full_like(truth, np.nan), truth)


def test_stitched_truth_crops_reproduce_the_truth(small_scan):
    s = small_scan
    st = Stitcher(s.object_pixel_size_m)
    st.add_many(s.truth_crops, s.positions_m)  # growing map, no planned positions
    live = st.resample_to(s.truth_phase.shape, s.truth_origin_m)
    assert phase_ssim(live, s.truth_phase, data_range=1.0) > 0.95
    offline, origin = stitch(s.truth_crops, s.positions_m, s.object_pixel_size_m)
    assert st.n_frames == s.n_frames
    again = Stitcher(s.object_pixel_size_m, positions_m=s.positions_m)
    again.add_many(s.truth_crops, s.positions_m)
    np.testing.assert_allclose(again.image(), offline, equal_nan=True)
    live_on_offline_grid = st.resample_to(offline.shape, origin)  # same lattice: exact shift
    np.testing.assert_allclose(live_on_offline_grid, offline, atol=1e-5, equal_nan=True)
