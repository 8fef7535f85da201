"""Labels robust to real data: the phase's sign and background level as real reconstructions
give them (REFERENCE.md; real Siemens-star data: background +0.6 rad, spokes 0)."""

import h5py
import numpy as np
import pytest
from test_hpc_fixtures import build_hpc_scans

from ptychostream.hpc import align_phase, make_labels, read_labels
from ptychostream.scanfile import read_scan


@pytest.fixture(scope="module")
def hpc_scans(tmp_path_factory):
    return build_hpc_scans(tmp_path_factory)


def _star(shape=(160, 160), spokes=16):
    """Siemens star: 1 on the spokes (material), 0 on the background; about a third spokes."""
    rr, cc = np.indices(shape, dtype=float)
    y, x = rr - shape[0] / 2, cc - shape[1] / 2
    on = (np.sin(spokes * np.arctan2(y, x)) > 0.35) & (np.hypot(y, x) < 0.45 * shape[0])
    return on.astype(float)


def _noisy(phase, amplitude, rng, noise=0.04):
    rr, cc = np.indices(phase.shape)
    ramp = 0.004 * rr - 0.003 * cc
    return amplitude * np.exp(1j * (phase + ramp + rng.normal(0, noise, phase.shape)))


@pytest.mark.parametrize("flipped", [False, True])
def test_siemens_star_background_at_plus_0p6(rng, flipped):
    """Background +0.6 rad, spokes 0 (as real data come out), and its conjugate; the spokes
    absorb (80 % transmission): the labels put the background at 0 and the spokes at +0.6."""
    star = _star()
    raw = np.where(star > 0, 0.0, 0.6)
    if flipped:
        raw = -raw
    amp = np.where(star > 0, 0.8, 1.0)
    mask = np.ones(star.shape, bool)
    phase, info = align_phase(_noisy(raw, amp, rng), mask)
    bg, spokes = np.median(phase[star == 0]), np.median(phase[star > 0])
    assert abs(bg) < 0.02 and spokes == pytest.approx(0.6, abs=0.03), (bg, spokes, info)
    assert info["sign"] == (1 if flipped else -1) and info["background"] == "lowest"
    if not flipped:  # the old rule (2nd percentile, sign kept) leaves the background at +0.6
        old, _ = align_phase(_noisy(raw, amp, rng), mask, background="percentile", sign=1)
        assert np.median(old[star == 0]) > 0.5


def test_pure_phase_star_needs_a_sign_and_takes_one(rng):
    """Without absorption nothing in the object tells the sign: it is kept, and a reference
    (e.g. the serving model's stitched prediction) or an explicit sign sets it."""
    star = _star()
    obj = _noisy(np.where(star > 0, 0.0, 0.6), np.ones_like(star), rng)
    mask = np.ones(star.shape, bool)
    assert align_phase(obj, mask)[1]["sign"] == 1
    for sign in (-1, 0.6 * star):
        phase, info = align_phase(obj, mask, sign=sign)
        assert info["sign"] == -1
        assert abs(np.median(phase[star == 0])) < 0.02
        assert np.median(phase[star > 0]) == pytest.approx(0.6, abs=0.03)
    # "mode" puts the most common level (here the background) at 0 whatever the sign
    phase, _ = align_phase(obj, mask, background="mode")
    assert abs(np.median(phase[star == 0])) < 0.02


def test_film_covering_most_of_the_scan_keeps_the_ground_at_zero(rng):
    """A 2 rad, 73 % film over most of the area with etched holes: the holes (least
    phase-shifting, brightest) are 0 rad and the film +2.03, although the film is the mode."""
    film = 1.0 - _star()  # film wherever the star has background: ~3/4 film
    assert film.mean() > 0.5
    truth = 2.03 * film
    obj = _noisy(truth + 1.1, np.where(film > 0, 0.73, 1.0), rng)
    for o in (obj, np.conj(obj)):
        phase, info = align_phase(o, np.ones(film.shape, bool))
        assert np.median(phase[film == 0]) == pytest.approx(0.0, abs=0.03), info
        assert np.median(phase[film > 0]) == pytest.approx(2.03, abs=0.03), info
    # the old simulation's three levels (ground the least common): the lowest level still is 0
    levels = np.where(film > 0, 1.0, 0.0) + 0.5 * (np.indices(film.shape)[1] > 80) * (film > 0)
    phase, info = align_phase(_noisy(levels, np.ones_like(levels), rng), np.ones(film.shape, bool))
    assert np.median(phase[film == 0]) == pytest.approx(0.0, abs=0.03), info


def test_bad_options(rng):
    star = _star()
    obj = _noisy(np.where(star > 0, 0.0, 0.6), np.ones_like(star), rng)
    mask = np.ones(star.shape, bool)
    with pytest.raises(ValueError, match="sign"):
        align_phase(obj, mask, sign=2)
    with pytest.raises(ValueError, match="sign"):
        align_phase(obj, mask, sign="flip")
    with pytest.raises(ValueError, match="background"):
        align_phase(obj, mask, background="median")


def test_make_labels_from_a_conjugated_offset_reconstruction(hpc_scans, tmp_path):
    """A reconstruction file whose object is conjugated and offset by +0.6 rad (another
    pipeline's convention) gives the same labels as the original. The simulated sample is a pure
    phase object, so it is given the absorption real material has (amplitude falling with phase)."""
    src = hpc_scans["recons"][0]
    odd = tmp_path / "odd.recon.h5"
    with h5py.File(src) as f, h5py.File(odd, "w") as g:
        for k in f:
            f.copy(k, g)
        g.attrs.update(dict(f.attrs))
        obj = f["object"][()] * np.exp(-0.3 * np.clip(f["phase"][()], 0, None))  # absorbing
        obj = np.conj(obj * np.exp(-0.6j))
        del g["object"], g["phase"]
        g["object"] = obj.astype(np.complex64)
        g["phase"] = np.angle(obj).astype(np.float32)  # raw phase, as a foreign file would hold
    a = read_labels(make_labels(hpc_scans["scans"][0], src, str(tmp_path / "a.h5")))
    b = read_labels(make_labels(hpc_scans["scans"][0], str(odd), str(tmp_path / "b.h5")))
    raw = read_labels(make_labels(hpc_scans["scans"][0], str(odd), str(tmp_path / "c.h5"), align=False))
    w = a["label_weight"].astype(bool)
    assert b["phase_sign"] == -a["phase_sign"]
    assert np.mean(np.abs(a["labels"][w] - b["labels"][w])) < 0.01
    truth = read_scan(hpc_scans["scans"][0]).truth_crops
    assert np.corrcoef(b["labels"][w], truth[w])[0, 1] > 0.85
    assert np.corrcoef(raw["labels"][w], truth[w])[0, 1] < -0.5  # taken as it was: negated


def test_compare_two_reconstructions_of_one_scan(hpc_scans, tmp_path, capsys):
    """What `ptychostream-hpc compare` reports for Tike vs pty-chi, here on two pty-chi runs."""
    import json

    from ptychostream.hpc import ReconstructionError, compare_reconstructions, reconstruct
    from ptychostream.hpc.cli import main

    scan, recon = hpc_scans["scans"][0], hpc_scans["recons"][0]
    same = compare_reconstructions(scan, recon, recon)
    assert same["ssim"] == pytest.approx(1.0) and same["label_corr"] == pytest.approx(1.0)
    assert same["label_mae_rad"] == pytest.approx(0.0, abs=1e-6) and same["n_pixels"] > 1000
    short = reconstruct(scan, str(tmp_path / "short.h5"), iterations=2, device="cpu", threads=1)
    assert main(["compare", scan, recon, short]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.3 < out["label_corr"] < same["label_corr"] and out["ssim"] < 1.0
    assert out["a"]["iterations"] == hpc_scans["iterations"] and out["b"]["iterations"] == 2
    assert 0.5 < out["a"]["truth_corr"] <= 1 and 0.5 < out["b"]["truth_corr"] <= 1
    with pytest.raises(ReconstructionError, match="is of scan"):
        compare_reconstructions(scan, recon, hpc_scans["recons"][1])
