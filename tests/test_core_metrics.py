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


# --------------------------------------------------------------------------- figures (issue 8)
from ptychostream.metrics import (  # noqa: E402
    flat_baseline,
    frame_mae,
    illuminated_mask,
    map_figures,
)


def _scored(scan):
    mask = illuminated_mask(scan.positions_m, scan.truth_phase.shape, scan.truth_origin_m,
                            scan.object_pixel_size_m, scan.beam_fwhm_m)
    return scan.truth_phase, mask


def test_illuminated_mask_is_the_union_of_beam_discs():
    dx = 10e-9
    one = illuminated_mask(np.array([[0.0, 0.0]]), (200, 200), (-1e-6, -1e-6), dx, 800e-9)
    assert one.sum() * dx**2 == pytest.approx(np.pi * (400e-9) ** 2, rel=0.05)
    rows, cols = np.nonzero(one)
    assert rows.mean() == pytest.approx(100, abs=0.5) and cols.mean() == pytest.approx(100, abs=0.5)
    two = illuminated_mask(np.array([[0.0, 0.0], [0.5e-6, 0.0]]), (200, 200), (-1e-6, -1e-6), dx)
    assert one.sum() < two.sum() < 2 * one.sum()


def test_map_figures_of_truth_and_of_a_flat_map(small_scan):
    truth, mask = _scored(small_scan)
    perfect = map_figures(truth + 0.7, truth, mask)  # a constant offset is free
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["corr"] == pytest.approx(1.0)
    assert perfect["mae"] == pytest.approx(0.0, abs=1e-5) and perfect["coverage"] == 1.0
    flat = flat_baseline(truth, mask)
    assert flat["corr"] == 0.0
    assert flat["mae"] == pytest.approx(np.abs(truth[mask] - np.median(truth[mask])).mean(), rel=1e-5)
    assert flat["mae"] > 0.1  # the film is 2 rad: a flat map is far off
    unrelated = np.random.default_rng(0).permutation(truth.ravel()).reshape(truth.shape)
    assert map_figures(unrelated, truth, mask)["corr"] < 0.1


def test_noise_on_flat_ground_costs_ssim_not_correlation(small_scan):
    """REFERENCE.md: SSIM is harsh where the truth is flat; correlation and MAE are not."""
    truth, mask = _scored(small_scan)
    noisy = truth + np.random.default_rng(1).normal(0, 0.05, truth.shape).astype(np.float32)
    fig = map_figures(noisy, truth, mask)
    assert fig["corr"] > 0.99 and fig["mae"] < 0.05
    assert fig["ssim"] < 0.9


def test_map_figures_count_only_what_was_stitched(small_scan):
    truth, mask = _scored(small_scan)
    half = truth.copy()
    half[:, : truth.shape[1] // 2] = np.nan
    fig = map_figures(half, truth, mask)
    assert 0.3 < fig["coverage"] < 0.7 and fig["corr"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no finite"):
        map_figures(np.full_like(truth, np.nan), truth, mask)


def test_phase_ssim_mask_mean_scores_only_the_mask(small_scan):
    truth, mask = _scored(small_scan)
    wrong = truth.copy()
    wrong[mask] = 0.0  # wrong everywhere that counts
    inside = np.zeros_like(mask)
    inside[mask.shape[0] // 3 : 2 * mask.shape[0] // 3, mask.shape[1] // 3 : 2 * mask.shape[1] // 3] = True
    inside &= mask
    box = phase_ssim(wrong, truth, data_range=2.0, mask=inside, align_offset=False)
    only = phase_ssim(wrong, truth, data_range=2.0, mask=inside, align_offset=False, mask_mean=True)
    assert only <= box


def test_frame_mae_with_and_without_the_frames_offset(small_scan):
    crops = small_scan.truth_crops
    beam = np.zeros(crops.shape[1:], bool)
    beam[32:96, 32:96] = True
    shifted = crops + np.linspace(-0.5, 0.5, len(crops))[:, None, None].astype(np.float32)
    fm = frame_mae(shifted, crops, beam)
    assert fm["mae"] == pytest.approx(np.abs(np.linspace(-0.5, 0.5, len(crops))).mean(), rel=1e-3)
    assert fm["mae_offset_removed"] == pytest.approx(0.0, abs=1e-5)


def test_remove_ramp_finds_the_plane_the_data_cannot_tell():
    """A map off by a plane (0.1 rad + 2e-3 rad/px): the slope is found and, removed, the map
    is the truth again; a map off by noise alone has (nearly) no slope."""
    from ptychostream.metrics import remove_ramp

    rng = np.random.default_rng(1)
    truth = np.where(rng.random((80, 90)) > 0.7, 2.0, 0.0).astype(np.float32)
    yy, xx = np.indices(truth.shape)
    mask = np.ones(truth.shape, bool)
    mask[:10] = False
    est = truth + 0.1 + 2e-3 * yy - 1.5e-3 * xx
    est[:10] = np.nan  # outside the mask: ignored
    flat, slope = remove_ramp(est, truth, mask)
    assert slope == pytest.approx(2.5e-3, rel=1e-4)
    assert np.abs(flat - truth)[mask].max() < 1e-5
    _, small = remove_ramp(truth + rng.normal(0, 0.01, truth.shape), truth, mask)
    assert small < 2e-5
