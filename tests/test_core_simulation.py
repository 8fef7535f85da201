"""Physics sanity of the simulated experiment (issues 2 and 8): the W film, the two sample kinds,
photon counts, and the one forward model behind scans, the ophyd detector and training pairs."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from ptychostream.geometry import crop_at
from ptychostream.simulation import (
    TRAINING_SEED_BASE,
    ExperimentConfig,
    beam_mask,
    diffraction,
    film_amplitude,
    film_delta_beta,
    film_phase,
    frames_at,
    make_object,
    make_probe,
    make_sample,
    overlap_ratio,
    simulate_pairs,
    simulate_scan,
    spiral_positions,
    step_for_overlap,
    transmission,
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
    assert (lo.frames == 0).mean() > 0.8  # mostly empty pixels at 0.5 ms


def test_photon_counts_match_a_2khz_eiger_measurement():
    """REFERENCE.md: ~4.4e7 photons per 0.4 s frame, ~5e4 per 0.5 ms frame; the film absorbs
    some (|T|^2 = 0.53 on film), so a frame holds between 0.53 and 1 times that."""
    cfg = ExperimentConfig()
    assert cfg.photons_per_frame == pytest.approx(4.4e7, rel=0.05)
    assert ExperimentConfig(exposure_s=0.5e-3).photons_per_frame == pytest.approx(5.5e4, rel=0.05)
    for exposure, photons in [(0.4, 4.4e7), (0.5e-3, 5.5e4)]:
        s = simulate_scan(n_positions=12, exposure_s=exposure, seed=8)
        totals = s.frames.sum(axis=(1, 2)).astype(float)
        assert (totals > 0.5 * photons).all() and (totals < 1.02 * photons).all()
    # low-dose but usable: a 0.5 ms frame still follows its noise-free pattern closely
    lo = simulate_scan(n_positions=6, exposure_s=0.5e-3, seed=8)
    ex = simulate_scan(n_positions=6, exposure_s=0.5e-3, seed=8, noise=False)
    corr = [np.corrcoef(a.ravel().astype(float), b.ravel())[0, 1]
            for a, b in zip(lo.frames, ex.frames, strict=True)]
    assert min(corr) > 0.95
    assert (lo.frames == 0).mean() > 0.8  # and yet mostly empty pixels


def test_tungsten_film_from_xraydb():
    """REFERENCE.md: W at 10.4 keV, delta 2.56e-5, beta 4.0e-6; 1.5 um: ~2.0 rad, ~73 %."""
    delta, beta = film_delta_beta(10_400)
    assert delta == pytest.approx(2.56e-5, rel=0.02)
    assert beta == pytest.approx(4.0e-6, rel=0.03)
    assert film_phase(10_400) == pytest.approx(2.0, abs=0.05)
    assert film_amplitude(10_400) == pytest.approx(0.73, abs=0.01)
    cfg = ExperimentConfig()
    assert cfg.energy_ev == 10_400 and cfg.film_phase_rad == pytest.approx(film_phase(10_400))
    assert film_amplitude(10_000) > 0.85  # below W's L3 edge (10.21 keV) it absorbs far less
    t = transmission(np.array([0.0, film_phase(10_400)]))
    assert abs(t[0]) == pytest.approx(1.0) and np.angle(t[0]) == pytest.approx(0.0)
    assert abs(t[1]) == pytest.approx(0.73, abs=0.01)
    assert np.angle(t[1]) == pytest.approx(film_phase(10_400), abs=1e-5)


@pytest.mark.parametrize("kind, ground_nm, film_nm", [("train", 300, 150), ("test", 150, 40)])
def test_both_kinds_are_two_levels_with_flat_regions(kind, ground_nm, film_nm):
    """Film and etched ground, nothing in between but the one-pixel etch edge; a flat stretch
    of each (the largest inscribed disc) bigger than the features' edges."""
    dx = ExperimentConfig().object_pixel_m
    phase = film_phase()
    for seed in (0, 1):
        ph = make_sample((400, 400), dx, kind, seed=seed)
        assert ph.min() >= -1e-6 and ph.max() <= phase + 1e-5
        ground, film = ph < 0.1 * phase, ph > 0.9 * phase
        assert (ground | film).mean() > 0.85
        assert 0.15 < film.mean() < 0.6
        assert ndimage.distance_transform_edt(ground).max() * dx > ground_nm * 1e-9
        assert ndimage.distance_transform_edt(film).max() * dx > film_nm * 1e-9
    obj = make_object((64, 64), dx, kind, seed=0)
    assert obj.dtype == np.complex64
    np.testing.assert_allclose(obj, transmission(make_sample((64, 64), dx, kind, seed=0)))


def test_random_features_span_50_to_500_nm():
    """Feature widths (twice the largest inscribed radius of each film blob) run from ~50 nm
    to ~500 nm, as in the paper's training areas."""
    dx = ExperimentConfig().object_pixel_m
    film = make_sample((800, 800), dx, "train", seed=3) > film_phase() / 2
    labels, n = ndimage.label(film)
    dist = ndimage.distance_transform_edt(film)
    widths = np.array(ndimage.maximum(dist, labels, range(1, n + 1))) * 2 * dx
    assert n > 20
    assert np.percentile(widths, 10) < 120e-9
    assert widths.max() > 400e-9


def test_scan_carries_ground_truth(small_scan):
    s = small_scan
    assert s.frames.shape == (40, 128, 128)
    assert s.truth_crops.shape == (40, 128, 128)
    again = crop_at(s.truth_phase, s.positions_m, s.truth_origin_m, s.object_pixel_size_m, 128)
    np.testing.assert_allclose(again, s.truth_crops, atol=1e-6)
    assert 0.0 <= s.truth_phase.min() and s.truth_phase.max() <= film_phase() + 1e-5
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
    assert cfg.overlap == pytest.approx(1 - math.sqrt(3) * 50 / 800)
    assert cfg.object_pixel_m == pytest.approx(12.42e-9, rel=0.01)  # 0.1192 nm * 1 m / (128 * 75 um)
    # the frame window is twice the beam: intensity sampled at oversampling 2
    assert cfg.frame_size * cfg.object_pixel_m == pytest.approx(2 * cfg.beam_fwhm_m, rel=0.02)
    # the beam lights the central ~70 px of the 128
    assert 0.2 < beam_mask(make_probe(128, cfg.object_pixel_m, cfg.energy_ev)).mean() < 0.35


def test_torch_forward_model_is_the_numpy_one():
    """simulate_scan (torch, batched) and frames_at (numpy, the ophyd detector's) agree."""
    s = simulate_scan(n_positions=16, step_m=80e-9, seed=4, noise=False)
    obj = transmission(s.truth_phase)
    ref = frames_at(obj, s.truth_origin_m, s.object_pixel_size_m, s.probe, s.positions_m,
                    s.metadata["photons_per_frame"], None)
    np.testing.assert_allclose(s.frames, ref, rtol=1e-4, atol=1e-3 * ref.max())


def test_recorded_positions_carry_encoder_errors():
    exact = simulate_scan(n_positions=30, seed=6)
    err = simulate_scan(n_positions=30, seed=6, position_error_m=15e-9)
    np.testing.assert_array_equal(exact.frames, err.frames)  # the beam went where it went
    np.testing.assert_array_equal(exact.truth_crops, err.truth_crops)
    d = err.positions_m - exact.positions_m
    assert np.sqrt((d**2).mean()) == pytest.approx(15e-9, rel=0.3)


def test_training_pairs_are_scan_physics_with_truth_labels():
    cfg = ExperimentConfig()
    p = simulate_pairs(40, cfg, map_px=400, pairs_per_map=20, seed=2, noise=False, device="cpu")
    assert p["frames"].shape == p["labels"].shape == (40, 128, 128)
    assert set(p["map"]) == {0, 1}
    dx = cfg.object_pixel_m
    phase = make_sample((400, 400), dx, "train", seed=TRAINING_SEED_BASE + 2000 + 1)
    sel = p["map"] == 1
    pos = p["positions_m"][sel]
    np.testing.assert_allclose(p["labels"][sel], crop_at(phase, pos, (0.0, 0.0), dx, 128), atol=1e-5)
    ref = frames_at(transmission(phase), (0.0, 0.0), dx, p["probe"], pos, cfg.photons_per_frame, None)
    np.testing.assert_allclose(p["frames"][sel], ref, rtol=1e-4, atol=1e-3 * ref.max())
    assert p["weight"].dtype == np.uint8 and 0.2 < p["weight"].mean() < 0.35


def test_training_pairs_cover_a_range_of_doses():
    p = simulate_pairs(64, photons=(5e5, 5e7), scaled_fraction=0.5, scale=10, map_px=300,
                       pairs_per_map=64, seed=1, device="cpu")
    totals = p["frames"].sum(axis=(1, 2)).astype(float)
    assert p["photons"].min() >= 5e5 and p["photons"].max() <= 5e7
    assert np.ptp(np.log10(p["photons"])) > 1.0
    assert ((totals > 0.5 * p["photons"]) & (totals < 1.02 * p["photons"])).all()
    scaled = p["intensity_scale"] == 10
    assert 10 < scaled.sum() < 54
    assert (p["frames"][scaled] % 10 == 0).all()  # measured at 1/10 the dose, then x10


def test_scan_along_a_given_route():
    route = np.array([[0.0, 0.0], [100e-9, 0.0], [0.0, 250e-9]])
    s = simulate_scan(positions_m=route, seed=3, noise=False)
    np.testing.assert_array_equal(s.positions_m, route)
    ref = frames_at(transmission(s.truth_phase), s.truth_origin_m, s.object_pixel_size_m, s.probe,
                    route, s.metadata["photons_per_frame"], None)
    np.testing.assert_allclose(s.frames, ref, rtol=1e-4, atol=1e-3 * ref.max())
