"""Reconstruction, labels and corpus on a small simulated scan (real pty-chi rPIE on CPU)."""

import h5py
import numpy as np
import pytest
from test_hpc_fixtures import build_hpc_scans

from ptychostream.hpc import (
    Corpus,
    CorpusError,
    ReconstructionError,
    align_phase,
    corpus_append,
    make_labels,
    read_labels,
    read_reconstruction,
    reconstruct,
)
from ptychostream.scanfile import read_scan


@pytest.fixture(scope="module")
def hpc_scans(tmp_path_factory):
    return build_hpc_scans(tmp_path_factory)


def test_reconstruction_matches_truth(hpc_scans):
    scan = read_scan(hpc_scans["scans"][0])
    rec = read_reconstruction(hpc_scans["recons"][0])
    assert rec.engine == "ptychi" and rec.iterations == hpc_scans["iterations"]
    assert rec.object.dtype == np.complex64 and rec.phase.shape == rec.object.shape
    assert rec.scan_id == scan.scan_id and rec.recon_id.startswith(scan.scan_id)
    assert rec.pixel_size_m == pytest.approx(scan.object_pixel_size_m)
    np.testing.assert_allclose(rec.positions_m, scan.positions_m)
    # the truth resampled on the reconstruction grid (same pixel size, origins differ)
    from scipy import ndimage

    d = (np.asarray(rec.origin_m) - np.asarray(scan.truth_origin_m)) / rec.pixel_size_m
    rr, cc = np.indices(rec.phase.shape, dtype=float)
    truth = ndimage.map_coordinates(scan.truth_phase, [rr + d[1], cc + d[0]], order=1)
    m = rec.mask
    assert 0.2 < m.mean() < 0.95
    assert np.corrcoef(rec.phase[m], truth[m])[0, 1] > 0.85
    # 15 % of the film's phase (the W film is 2.03 rad since the simulated sample became the paper's)
    assert np.mean(np.abs(rec.phase[m] - truth[m])) < 0.15 * scan.truth_phase.max()
    core = rec.illumination >= 0.3 * rec.illumination.max()  # best-determined part
    assert np.corrcoef(rec.phase[core], truth[core])[0, 1] > 0.9
    # background (truth 0) aligned to ~0 rad: the offset rule of labels.align_phase
    assert abs(np.median(rec.phase[m & (truth < 0.05)])) < 0.15 * scan.truth_phase.max()


def test_a_reconstruction_leaves_the_default_device_as_it_found_it(hpc_scans, tmp_path):
    """pty-chi sets a process-wide default device; putting back torch.get_default_device()
    ("cpu" when none was set) left a function mode behind that cost every later torch call of
    the process a Python round trip (the refinement took 1.5x its time after a reconstruction)."""
    import torch
    from torch.overrides import _get_current_function_mode_stack

    reconstruct(hpc_scans["scans"][0], str(tmp_path / "r.h5"), iterations=1, device="cpu", threads=1)
    assert _get_current_function_mode_stack() == []
    torch.set_default_device("cpu")  # a caller's own default stays
    try:
        reconstruct(hpc_scans["scans"][0], str(tmp_path / "r2.h5"), iterations=1, device="cpu",
                    threads=1)
        assert len(_get_current_function_mode_stack()) == 1
        assert torch.get_default_device() == torch.device("cpu")
    finally:
        torch.set_default_device(None)


def test_the_ramp_moves_into_the_probe_and_the_frames_do_not_see_it(hpc_scans):
    """move_ramp_to_probe: every frame's far field is the same with the ramp moved (the
    ambiguity), and a written reconstruction's object has no ramp left for the labels to take."""
    from ptychostream.geometry import move_ramp_to_probe

    rng = np.random.default_rng(3)
    n = 32
    obj = np.exp(1j * rng.normal(0, 0.5, (80, 90)) - 0.1 * rng.random((80, 90)))
    yy, xx = np.indices((n, n)) - n / 2
    probe = (np.exp(-(yy ** 2 + xx ** 2) / 60.0) * np.exp(1j * 0.01 * yy ** 2))[None]
    obj2, probe2 = move_ramp_to_probe(obj, probe, (2e-3, -3e-3))
    assert not np.allclose(probe2, probe, atol=1e-3)  # the probe did change
    for r, c in [(0, 0), (17, 40), (48, 58)]:
        far = np.abs(np.fft.fft2(probe[0] * obj[r:r + n, c:c + n])) ** 2
        far2 = np.abs(np.fft.fft2(probe2[0] * obj2[r:r + n, c:c + n])) ** 2
        np.testing.assert_allclose(far2, far, rtol=1e-4, atol=1e-4 * far.max())
    rec = read_reconstruction(hpc_scans["recons"][0])
    left = align_phase(rec.object, rec.mask)[1]["ramp"]
    assert max(abs(v) for v in left) < 1e-5, left


def test_labels_line_up_with_truth_crops(hpc_scans):
    scan = read_scan(hpc_scans["scans"][0])
    lab = read_labels(hpc_scans["labels"][0])
    assert lab["labels"].shape == (scan.n_frames, 128, 128) and lab["labels"].dtype == np.float32
    assert lab["scan_id"] == scan.scan_id
    assert lab["recon_id"] == read_reconstruction(hpc_scans["recons"][0]).recon_id
    np.testing.assert_array_equal(lab["frames"], scan.frames)
    w = lab["label_weight"].astype(bool)
    a, b = lab["labels"][w], scan.truth_crops[w]
    assert np.corrcoef(a, b)[0, 1] > 0.85
    assert np.mean(np.abs(a - b)) < 0.15 * scan.truth_phase.max()  # 15 % of the film's phase
    # a label shifted by 3 px lines up worse: the geometry, not just the content, is right
    shifted = np.roll(lab["labels"], 3, axis=-1)[w]
    assert np.mean(np.abs(shifted - b)) > np.mean(np.abs(a - b)) + 0.02
    assert np.all(lab["labels"][~w] == 0)


def test_align_phase_removes_offset_and_ramp(rng):
    truth = np.zeros((96, 96))
    truth[30:60, 20:50] = 0.8
    rr, cc = np.indices(truth.shape)
    obj = np.exp(1j * (truth + 2.5 + 0.01 * rr - 0.02 * cc))
    mask = np.ones(truth.shape, bool)
    phase, info = align_phase(obj, mask)
    np.testing.assert_allclose(phase, truth, atol=1e-3)
    assert info["ramp"] == pytest.approx([0.01, -0.02], abs=1e-6)
    with pytest.raises(ValueError):
        align_phase(obj, np.zeros_like(mask))


def test_corpus_grows_reloads_and_rebuilds(hpc_scans, tmp_path):
    corpus_dir = tmp_path / "corpus"
    n0 = read_scan(hpc_scans["scans"][0], frames=False).n_frames
    n1 = read_scan(hpc_scans["scans"][1], frames=False).n_frames
    r = corpus_append(str(corpus_dir), hpc_scans["labels"][0])
    assert (r["n_pairs"], r["n_scans"], r["added"]) == (n0, 1, n0)
    r = corpus_append(str(corpus_dir), hpc_scans["labels"][1])
    assert (r["n_pairs"], r["n_scans"]) == (n0 + n1, 2)
    assert all(isinstance(v, int | str | list) for v in r.values())
    c = Corpus(corpus_dir)
    assert c.n_pairs == n0 + n1
    assert [e.recon_id for e in c.entries] == r["recon_ids"]
    data = c.load()
    assert data["frames"].shape == (n0 + n1, 128, 128)
    np.testing.assert_array_equal(data["labels"][:n0], read_labels(hpc_scans["labels"][0])["labels"])
    assert set(np.unique(data["entry"])) == {0, 1}
    sub = c.load(max_pairs=7, seed=1)
    assert len(sub["frames"]) == 7
    # the same scan labelled again replaces its pairs, keeping provenance of the new one
    relabel = tmp_path / "relabel.h5"
    with h5py.File(hpc_scans["labels"][0]) as f, h5py.File(relabel, "w") as g:
        for k in f:
            f.copy(k, g)
        g.attrs.update(dict(f.attrs))
        g.attrs["recon_id"] = "second-reconstruction"
    r = corpus_append(str(corpus_dir), str(relabel))
    assert (r["n_pairs"], r["n_scans"], r["replaced"]) == (n0 + n1, 2, [c.entries[0].recon_id])
    assert "second-reconstruction" in Corpus(corpus_dir).summary()["recon_ids"]
    # manifest lost: rebuilt from the files alone
    (corpus_dir / "manifest.json").write_text("{broken")
    with pytest.raises(CorpusError, match="rebuild"):
        Corpus(corpus_dir)
    rebuilt = Corpus.rebuild(corpus_dir)
    assert (rebuilt.n_pairs, rebuilt.n_scans) == (n0 + n1, 2)
    assert Corpus(corpus_dir).n_pairs == n0 + n1


def test_bad_inputs_give_clear_errors(hpc_scans, tmp_path):
    with pytest.raises(ValueError, match="engine"):
        reconstruct(hpc_scans["scans"][0], str(tmp_path / "x.h5"), engine="nope")
    with pytest.raises(TypeError, match="unknown ptychi option"):
        reconstruct(hpc_scans["scans"][0], str(tmp_path / "x.h5"), step_size=3)
    with pytest.raises(ValueError, match="iterations"):
        reconstruct(hpc_scans["scans"][0], str(tmp_path / "x.h5"), iterations=0)
    with pytest.raises(ReconstructionError, match="does not exist"):
        read_reconstruction(tmp_path / "missing.h5")
    with pytest.raises(ReconstructionError, match="not a ptychostream reconstruction"):
        read_reconstruction(hpc_scans["scans"][0])
    with pytest.raises(ReconstructionError, match="is of scan"):
        make_labels(hpc_scans["scans"][1], hpc_scans["recons"][0], str(tmp_path / "l.h5"))
    with pytest.raises(CorpusError, match="not a labels file"):
        corpus_append(str(tmp_path / "c"), hpc_scans["scans"][0])
    with pytest.raises(CorpusError, match="empty"):
        Corpus(tmp_path / "empty").load()
