"""The accuracy benchmark and the base-model recipe run end to end (quick modes, CPU), and
training on truth-crop labels learns what a flat map cannot show (issue 8)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ptychostream.model import PtychoNN2, load_state_dict, state_dict_bytes

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "untrained.pt"
    path.write_bytes(state_dict_bytes(PtychoNN2()))
    return path


FIGURES = {"ssim", "corr", "mae", "coverage"}


def _finite(row: dict) -> bool:
    return FIGURES <= set(row) and all(math.isfinite(row[k]) for k in FIGURES)


def test_accuracy_benchmark_quick_writes_every_figure(untrained_model, tmp_path):
    bench = _load("bench_accuracy")
    out_json, out_dir = tmp_path / "acc.json", tmp_path / "figures"
    bench.main(["--quick", "--model", str(untrained_model), "--json", str(out_json),
                "--out", str(out_dir), "--threads", "1"])
    res = json.loads(out_json.read_text())
    cases = res["cases"]
    assert [k[0] for k in cases] == ["a", "b", "c", "d", "e", "e", "e"]
    for name, case in cases.items():
        rows = case["rows"]
        for method in ("flat", "ceiling", "ai", "refine", "ai+refine", "iterative"):
            assert _finite(rows[method]), (name, method)
        # the yardsticks mean what they say: a flat map correlates 0, the truth crops stitched
        # back (a perfect network) show the sample
        assert rows["flat"]["corr"] == 0.0 and rows["flat"]["mae"] > 0.2
        assert rows["ceiling"]["corr"] > 0.9 and rows["ceiling"]["mae"] < 0.5 * rows["flat"]["mae"]
        assert set(case["frame_mae"]) == {"mae", "mae_offset_removed"}
        assert case["frame_mae"]["mae_offset_removed"] <= case["frame_mae"]["mae"]
        assert list(case["stitch"]) == list(bench.STITCH_VARIANTS)  # each option, with and without
        for variant in bench.STITCH_VARIANTS:
            assert _finite(case["stitch"][variant]["ai"]) and _finite(case["stitch"][variant]["ceiling"])
        assert (out_dir / f"{name}.png").stat().st_size > 10_000
        assert case["scan"]["position_error_nm"] == pytest.approx(15.0)
    assert [s["overlap"] for s in res["sweep"]] == [0.9, 0.78, 0.6, 0.3, 0.0]
    assert cases["d_letters_0.5ms_x10"]["scan"]["intensity_scale"] == 10.0
    assert cases["d_letters_0.5ms_x10"]["scan"]["mean_counts"] < 1e5  # really 0.5 ms frames
    assert res["calibration"]["positions"] == 40  # the iterative side got a reconstructed probe
    assert (out_dir / "sweep.png").exists() and (out_dir / "accuracy.txt").exists()


def test_recipe_quick_writes_a_model_that_loads(tmp_path, monkeypatch):
    recipe = _load("train_base_model")
    out = tmp_path / "run"
    record = recipe.main(["--quick", "--out", str(out), "--threads", "1"])
    model = load_state_dict(str(out / "ptychonn2_base.pt"))
    assert isinstance(model, PtychoNN2)
    assert (out / "ptychonn2_base.onnx").stat().st_size > 1_000_000
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["recipe"]["pairs"] == 64 and saved["generation"]["n_pairs"] == 64
    assert saved["training"]["pairs_per_s"] > 0 and saved["seconds"]["wall"] > 0
    assert set(saved["accuracy"]["cases"]) == {"b_letters_ov0.9", "c_letters_step460nm"}
    assert "torch" in saved["versions"] and record["device"] == "cpu"
    assert not (out / "corpus").exists()  # the corpus is not kept by default
    for png in ("loss.png", "b_letters_ov0.9.png", "c_letters_step460nm.png"):
        assert (out / "figures" / png).exists()
    # shipping: into a package data folder (here a temporary one), then served as "builtin"
    import ptychostream.basemodel as basemodel

    data = tmp_path / "data"
    monkeypatch.setattr(recipe, "install_dir", lambda: data)
    monkeypatch.setattr(basemodel, "data_dir", lambda: data)
    with pytest.raises(Exception, match="no built-in base model"):
        basemodel.builtin_model_path()
    recipe.main(["--install-from", str(out)])
    assert basemodel.resolve_model("builtin") == data / basemodel.STATE_DICT_NAME
    load_state_dict(basemodel.builtin_model_bytes())
    assert basemodel.builtin_recipe()["recipe"]["quick"] is True


def _flat_or_film_pairs(n: int, seed: int, cfg):
    """Pairs whose beam sees only etched ground or only film, half each: the one thing a single
    frame of a flat area tells (the film absorbs: 0.53 of the intensity), which a constant map
    cannot show."""
    from ptychostream.simulation import simulate_pairs

    p = simulate_pairs(8 * n, cfg, photons=4.2e7, map_px=300, pairs_per_map=24, seed=seed,
                       device="cpu")
    beam = p["weight"].astype(bool)
    film = (p["labels"][:, beam] > 1.0).mean(axis=1)
    pick = np.concatenate([np.nonzero(film > 0.97)[0][: n // 2],
                           np.nonzero(film < 0.03)[0][: n // 2]])
    assert len(pick) == n, "not enough flat frames of each kind"
    pick = np.random.default_rng(seed).permutation(pick)
    return {"frames": p["frames"][pick], "labels": p["labels"][pick], "weight": p["weight"],
            "positions_m": p["positions_m"][pick], "photons": p["photons"][pick],
            "intensity_scale": p["intensity_scale"][pick], "sample_seed": 0}


def test_short_training_beats_the_flat_map(tmp_path):
    """hpc.train on truth-crop labels weighted to the beam (the recipe's pairs and start), a few
    seconds of CPU: masked MAE on held-out pairs below the best constant map's.

    Frames are 64 px (a quarter of the compute of 128) so that ~1,500 pair-passes fit in the
    test; the features are a few microns, so each frame is flat film or flat ground."""
    from ptychostream.hpc import Corpus, train
    from ptychostream.metrics import frame_mae
    from ptychostream.simulation import ExperimentConfig

    gen, recipe = _load("gen_pairs"), _load("train_base_model")
    cfg = ExperimentConfig(frame_size=64, feature_m=3e-6, fill=0.5)
    tr, te = _flat_or_film_pairs(128, 1, cfg), _flat_or_film_pairs(48, 2, cfg)
    corpus = tmp_path / "corpus"
    gen.write_labels(corpus / "pairs" / "flat.h5", tr, tr["weight"].astype(np.float32),
                     cfg.object_pixel_m, "flat")
    Corpus.rebuild(corpus)
    init = recipe.kaiming_init(tmp_path / "init.pt", recipe.corpus_norm(corpus))
    res = train(str(corpus), str(tmp_path / "out"), warm_start=str(init), epochs=12,
                batch_size=16, seed=0, masked_loss=True, lr_min=1e-3, lr_max=1e-3,
                progress=False, threads=2)
    model = load_state_dict(res["state_dict"])
    with torch.no_grad():
        pred = model(torch.from_numpy(te["frames"].astype(np.float32))[:, None])[:, 0].numpy()
    beam = te["weight"].astype(bool)
    net = frame_mae(pred, te["labels"], beam)["mae"]
    flat = min(frame_mae(np.full_like(pred, c), te["labels"], beam)["mae"]
               for c in np.linspace(0.0, 2.1, 43))
    assert flat > 0.9  # half film, half ground: no constant is right
    assert net < 0.75 * flat, (net, flat)


def test_refinement_benchmark_scores_further_passes_with_a_given_probe(tmp_path):
    """bench_refine --scan/--probe/--passes: the map after further passes with the probe
    handed in (here the true one, as a .npy) is scored against the scan's truth, per pass."""
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    scan = simulate_scan(n_positions=30, step_m=50e-9, seed=7, sample_kind="test")
    scan_file = write_scan(tmp_path / "scan.h5", scan, compression=None)
    np.save(tmp_path / "probe.npy", scan.probe)
    out = _load("bench_refine").main([
        "--scan", str(scan_file), "--probe", str(tmp_path / "probe.npy"), "--batches",
        "--passes", "1", "3", "--probe-steps", "0", "--json", str(tmp_path / "refine.json")])
    one, three = out["passes"]
    assert (one["passes"], three["passes"]) == (1, 3)
    assert all(math.isfinite(r[k]) for r in (one, three) for k in ("ssim", "corr", "mae"))
    assert three["corr"] > one["corr"] and three["mae"] < one["mae"]
    assert all(r["ramp_rad_per_px"] >= 0 and math.isfinite(r["deramped_mae"]) for r in (one, three))
    assert "probe.npy" in out["probe"] and out["probe_overlap"] == pytest.approx(1.0, abs=1e-6)
    assert json.loads((tmp_path / "refine.json").read_text())["passes"] == out["passes"]


def test_refinement_benchmark_compares_the_ramp_move_and_the_network_seed(tmp_path,
                                                                         untrained_model):
    """--move-ramp on off and --seed-model give a row for each combination, each scored."""
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    scan = simulate_scan(n_positions=20, step_m=60e-9, seed=8, sample_kind="test")
    scan_file = write_scan(tmp_path / "scan.h5", scan, compression=None)
    out = _load("bench_refine").main([
        "--scan", str(scan_file), "--batches", "--passes", "2", "--probe-steps", "0.5",
        "--move-ramp", "on", "off", "--seed-model", str(untrained_model)])
    combos = {(r["seed"], r["move_ramp"]) for r in out["passes"]}
    assert combos == {("none", True), ("none", False), ("blend", True), ("blend", False)}
    assert all(math.isfinite(r["corr"]) and math.isfinite(r["mae"]) for r in out["passes"])


def test_refinement_benchmark_seeds_with_the_truth_and_starts_the_probe_late(tmp_path):
    """--seed-model truth seeds the live pass with the true phase crops (a perfect network),
    which must beat no seed after one pass; --probe-starts past the scan's length keeps the
    probe as handed in, and --handover hands the frames over in batches that size."""
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    scan = simulate_scan(n_positions=24, step_m=60e-9, seed=9, sample_kind="test")
    scan_file = write_scan(tmp_path / "scan.h5", scan, compression=None)
    out = _load("bench_refine").main([
        "--scan", str(scan_file), "--batches", "--passes", "1", "--probe-steps", "0.5",
        "--seed-model", "truth", "--probe-starts", "8", "1000", "--handover", "8"])
    rows = {(r["seed"], r["probe_start"]): r for r in out["passes"]}
    assert set(rows) == {("none", 8), ("none", 1000), ("blend", 8), ("blend", 1000)}
    assert all(r["handover"] == 8 for r in rows.values())
    assert rows["blend", 1000]["mae"] < 0.7 * rows["none", 1000]["mae"]
    # the probe learning from the 8th frame on changes the map; from the 1000th, never
    assert rows["none", 8]["mae"] != rows["none", 1000]["mae"]
