"""Physics sanity of the simulated experiment (issue 2)."""

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ptychostream.geometry import crop_at
from ptychostream.simulation import (
    ExperimentConfig,
    diffraction,
    make_probe,
    make_sample,
    overlap_ratio,
    simulate_scan,
    spiral_positions,
    step_for_overlap,
)


@pytest.mark.parametrize(
    "step_nm, expected", [(50, 0.9), (180, 0.6), (460, 0.0)]  # REFERENCE.md's worked values
)
def test_overlap_formula_matches_reference(step_nm, expected):
    assert overlap_ratio(step_nm * 1e-9, 800e-9) == pytest.approx(expected, abs=0.015)
    assert step_for_overlap(overlap_ratio(step_nm * 1e-9, 800e-9), 800e-9) == pytest.approx(
        step_nm * 1e-9
    )


@pytest.mark.parametrize("n, step", [(100, 50e-9), (963, 50e-9), (400, 460e-9)])
def test_spiral_has_requested_step(n, step):
    pos = spiral_positions(n, step)
    assert pos.shape == (n, 2)
    d, _ = cKDTree(pos).query(pos, k=2)
    assert np.median(d[:, 1]) == pytest.approx(step, rel=0.08)
    assert np.allclose(pos.mean(axis=0), 0, atol=3 * step)  # centred on the scan centre


@pytest.mark.parametrize("fwhm", [400e-9, 800e-9])
def test_probe_is_a_donut_of_requested_size(fwhm):
    dx = ExperimentConfig().object_pixel_m
    probe = make_probe(128, dx, 10_000, fwhm)
    inten = np.abs(probe) ** 2
    assert inten.sum() == pytest.approx(1.0, rel=1e-4)
    r = np.hypot(*(np.indices(inten.shape) - 64)) * dx
    rbin = np.round(r / dx).astype(int)
    profile = np.bincount(rbin.ravel(), inten.ravel()) / np.bincount(rbin.ravel())
    centre = inten[r < fwhm / 6].mean()
    # a donut: the zone plate's central stop, defocused, leaves the centre dim (but for the
    # small on-axis Poisson spot), the ring carries the light
    ring = profile[3:64].max()  # outside the on-axis spot
    assert centre < 0.5 * ring
    above = np.nonzero(profile[:64] >= ring / 2)[0]
    assert 2 * above[-1] * dx == pytest.approx(fwhm, rel=0.1)


def test_photon_totals_and_poisson_statistics():
    rng = np.random.default_rng(1)
    probe = make_probe(128, 12.9e-9, 10_000, 800e-9)
    wave = np.repeat(probe[None], 200, axis=0)
    photons = 5e4
    expected = diffraction(wave, photons, None)
    assert expected[0].sum() == pytest.approx(photons, rel=1e-4)  # unitary FFT keeps photons
    noisy = diffraction(wave, photons, rng)
    assert noisy.dtype == np.uint32
    totals = noisy.sum(axis=(1, 2))
    assert totals.mean() == pytest.approx(photons, rel=0.01)
    assert totals.var() == pytest.approx(photons, rel=0.35)  # Poisson: variance == mean
    bright = expected[0] > 20
    assert noisy[:, bright].var(axis=0).mean() == pytest.approx(
        expected[0][bright].mean(), rel=0.15
    )


def test_low_dose_frames_are_really_low_dose():
    hi = simulate_scan(n_positions=8, exposure_s=0.4, seed=2)
    lo = simulate_scan(n_positions=8, exposure_s=0.0005, seed=2)
    ratio = hi.frames.sum() / lo.frames.sum()
    assert ratio == pytest.approx(800, rel=0.1)
    assert (lo.frames == 0).mean() > 0.9  # mostly empty pixels at 0.5 ms


def test_scan_carries_ground_truth(small_scan):
    s = small_scan
    assert s.frames.shape == (40, 128, 128)
    assert s.truth_crops.shape == (40, 128, 128)
    again = crop_at(s.truth_phase, s.positions_m, s.truth_origin_m, s.object_pixel_size_m, 128)
    np.testing.assert_allclose(again, s.truth_crops, atol=1e-6)
    assert 0.0 <= s.truth_phase.min() and s.truth_phase.max() <= 1.0 + 1e-6
    # every frame's window lies inside the truth map
    assert np.isfinite(s.truth_crops).all()


def test_frames_depend_on_the_sample():
    """Same probe, different sample -> different diffraction (the phase is encoded)."""
    a = simulate_scan(n_positions=4, seed=5, sample_kind="train")
    b = simulate_scan(n_positions=4, seed=5, sample_kind="test")
    assert not np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize("kind", ["train", "test", "mixed"])
def test_sample_kinds(kind):
    ph = make_sample((200, 300), 12.9e-9, kind, phase_max=0.8, seed=0)
    assert ph.shape == (200, 300)
    covered = (ph > 0.4).mean()
    assert 0.02 < covered < 0.8
    assert ph.max() <= 0.8 + 1e-6


def test_bad_sample_kind():
    with pytest.raises(ValueError, match="sample kind"):
        make_sample((10, 10), 1e-8, "nope")


def test_config_geometry():
    cfg = ExperimentConfig()
    assert cfg.photons_per_frame == pytest.approx(1e5)
    assert cfg.overlap == pytest.approx(1 - math.sqrt(3) * 50 / 800)
    assert 5e-9 < cfg.object_pixel_m < 20e-9
