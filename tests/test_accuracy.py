"""The accuracy benchmark and the base-model recipe run end to end (quick modes, CPU), and
training on truth-crop labels learns what a flat map cannot show (issue 8)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

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
        for method in ("flat", "ceiling", "ai", "iterative"):
            assert _finite(rows[method]), (name, method)
        # the yardsticks mean what they say: a flat map correlates 0, the truth crops stitched
        # back (a perfect network) show the sample
        assert rows["flat"]["corr"] == 0.0 and rows["flat"]["mae"] > 0.2
        assert rows["ceiling"]["corr"] > 0.9 and rows["ceiling"]["mae"] < 0.5 * rows["flat"]["mae"]
        assert set(case["frame_mae"]) == {"mae", "mae_offset_removed"}
        assert case["frame_mae"]["mae_offset_removed"] <= case["frame_mae"]["mae"]
        for variant in ("default", "whole", "crop"):
            assert _finite(case["stitch"][variant]["ai"]) and _finite(case["stitch"][variant]["ceiling"])
        assert (out_dir / f"{name}.png").stat().st_size > 10_000
        assert case["scan"]["position_error_nm"] == 15.0
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
