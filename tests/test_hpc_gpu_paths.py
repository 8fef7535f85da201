"""The GPU code paths of train() and reconstruct(), exercised on the CPU.

bf16 / fp16 autocast, channels_last, the resident-tensor loop, the lr scaling with warm-up, the
collapse guard, the pty-chi GPU preset (uniform minibatches, batch-wise frame fetch, deferred
loss), several scans at once, and Tike's call as tike 0.26 checks it (a stand-in module)."""

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hpc_fixtures import build_hpc_scans

from ptychostream.hpc import (
    TrainingError,
    corpus_append,
    read_reconstruction,
    reconstruct,
    reconstruct_many,
    train,
)
from ptychostream.hpc.train import DEFAULTS, init_weights, scaled_lr
from ptychostream.model import PtychoNN2
from ptychostream.scanfile import read_scan

FAST = {"progress": False, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def hpc_scans(tmp_path_factory):
    return build_hpc_scans(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(hpc_scans, tmp_path_factory):
    corpus_dir = tmp_path_factory.mktemp("gpu-paths-corpus")
    for labels in hpc_scans["labels"]:
        corpus_append(str(corpus_dir), labels)
    return str(corpus_dir)


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_lr_scales_with_the_global_batch_and_is_capped():
    cfg = dict(DEFAULTS)
    for batch, rule, want in [(8, "sqrt", 1.0), (64, "sqrt", 1.0), (256, "sqrt", 2.0),
                              (1024, "sqrt", 2.0), (128, "linear", 2.0), (4096, None, 1.0)]:
        lo, hi, factor = scaled_lr({**cfg, "batch_size": batch, "lr_scale": rule})
        assert factor == pytest.approx(want), (batch, rule)
        assert hi <= max(cfg["lr_cap"], cfg["lr_max"]) + 1e-15 and lo <= hi
    with pytest.raises(ValueError, match="lr_scale"):
        scaled_lr({**cfg, "batch_size": 8, "lr_scale": "cubic"})


def test_he_init_makes_the_new_network_see_its_input(hpc_scans):
    """torch's default initialisation gives an input-independent output (~1e-8 rad spread)."""
    from ptychostream.engines import preprocess

    x = preprocess(read_scan(hpc_scans["scans"][0]).frames[:8])
    x = torch.from_numpy(x / x.reshape(8, -1).max(1).mean())
    spread = {}
    for how in ("default", "kaiming"):
        torch.manual_seed(0)
        model = PtychoNN2()
        init_weights(model, how)
        with torch.no_grad():
            spread[how] = float(model(x).std(dim=0).mean())
    assert spread["default"] < 1e-5 < 1e-3 < spread["kaiming"], spread
    with pytest.raises(ValueError, match="init"):
        init_weights(PtychoNN2(), "xavier")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_large_batch_path_on_cpu(corpus, tmp_path, amp):
    """The loop a GPU runs (autocast, channels_last, lr scaled above lr_ref_batch with a
    one-epoch warm-up; fp16 with its GradScaler) trains on the CPU and saves a float32 model."""
    pairs = 48 if amp == "bf16" else 8  # float16 convolutions are slow on a CPU
    r = train(corpus, str(tmp_path / amp), epochs=2, batch_size=128, max_pairs=pairs, seed=0,
              amp=amp, channels_last=True, masked_loss=True, **FAST)
    rt = r["runtime"]
    assert (rt["amp"], rt["channels_last"], rt["resident"]) == (amp, True, "host")
    assert rt["lr_factor"] == pytest.approx(math.sqrt(2)) and rt["warmup_steps"] == rt["steps_per_epoch"] == 1
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in r["history"])
    assert r["history"][0]["lr"] < r["history"][1]["lr"] <= rt["lr_max"] + 1e-12
    state = torch.load(r["state_dict"], weights_only=True)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())


def test_collapse_guard_catches_a_dead_network(corpus, tmp_path, caplog):
    """lr 0.1 kills the ReLUs: the output stops depending on the input; the guard goes back to
    the best weights with half the lr and, when nothing survives, says so."""
    with pytest.raises(TrainingError, match="collapsed|usable"):
        train(corpus, str(tmp_path / "dead"), epochs=3, batch_size=16, max_pairs=48,
              lr_min=0.05, lr_max=0.1, **FAST)
    assert "collapsed to a constant" in caplog.text
    with pytest.raises(ValueError, match="amp"):
        train(corpus, str(tmp_path / "x"), epochs=1, amp="int8", **FAST)
    with pytest.raises(ValueError, match="resident"):
        train(corpus, str(tmp_path / "x"), epochs=1, resident="disk", **FAST)


def test_ptychi_gpu_preset_and_settings(hpc_scans, tmp_path):
    from ptychostream.hpc.reconstruct import ptychi_settings

    scan = read_scan(hpc_scans["scans"][0])
    gpu = ptychi_settings(scan, "cuda", {})
    assert gpu["preset"] == "gpu" and gpu["batching"] == "uniform" and gpu["data_on_device"]
    assert gpu["batch_size"] == math.ceil(scan.n_frames / 2)
    assert gpu["object_step"] == pytest.approx(0.2 * gpu["auto_batch_size"] / gpu["batch_size"])
    cpu = ptychi_settings(scan, "cpu", {})
    assert (cpu["batch_size"], cpu["object_step"], cpu["data_on_device"]) == (cpu["auto_batch_size"], 0.2, False)
    assert ptychi_settings(scan, "cuda", {"batch_size": 7, "object_step": 0.3})["batch_size"] == 7
    with pytest.raises(ValueError, match="preset"):
        ptychi_settings(scan, "cpu", {"preset": "tpu"})
    with pytest.raises(ValueError, match="batching"):
        ptychi_settings(scan, "cpu", {"batching": "sorted"})
    # the GPU preset runs (here on the CPU) and records what it used
    out = reconstruct(hpc_scans["scans"][0], str(tmp_path / "g.h5"), iterations=3, device="cpu",
                      preset="gpu", threads=1)
    settings = json.loads(read_reconstruction(out).attrs["settings"])
    assert settings["batching"] == "uniform" and settings["batch_size"] == gpu["batch_size"]
    assert math.isfinite(settings["final_loss"])


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_sync_free_pty_chi_gives_its_own_result(hpc_scans, tmp_path, monkeypatch, preset):
    """Frames fetched per minibatch, the loss kept on the device and patches placed without the
    bounds checks' host synchronisations change nothing but speed."""
    import contextlib
    import importlib

    rm = importlib.import_module("ptychostream.hpc.reconstruct")

    kw = dict(iterations=2, device="cpu", threads=1, preset=preset)
    fast = read_reconstruction(reconstruct(hpc_scans["scans"][1], str(tmp_path / "fast.h5"), **kw))
    assert json.loads(fast.attrs["settings"])["sync_free_patches"]
    monkeypatch.setattr(rm, "_batch_fetching_loader", lambda reconstructor: None)
    monkeypatch.setattr(rm, "_defer_loss_sync", lambda reconstructor: None)
    monkeypatch.setattr(rm, "_sync_free_patches", contextlib.nullcontext)
    own = read_reconstruction(reconstruct(hpc_scans["scans"][1], str(tmp_path / "own.h5"), **kw))
    np.testing.assert_allclose(fast.object, own.object, rtol=1e-4, atol=1e-5)
    a, b = json.loads(fast.attrs["settings"]), json.loads(own.attrs["settings"])
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)


@pytest.mark.timeout(180)
def test_several_scans_at_once(hpc_scans, tmp_path):
    paths = reconstruct_many(hpc_scans["scans"], str(tmp_path / "many"), workers=2, iterations=2,
                             device="cpu", threads=1)
    assert [Path(p).name for p in paths] == [Path(s).stem + ".recon.h5" for s in hpc_scans["scans"]]
    assert [read_reconstruction(p).scan_id for p in paths] == [read_scan(s, frames=False).scan_id
                                                            for s in hpc_scans["scans"]]
    with pytest.raises(ValueError, match="workers"):
        reconstruct_many(hpc_scans["scans"], str(tmp_path), workers=0)


def _fake_tike(calls: dict) -> types.ModuleType:
    """A stand-in for tike 0.26 that checks its inputs as tike.ptycho does and returns them."""
    import dataclasses

    ptycho = types.ModuleType("tike.ptycho")

    @dataclasses.dataclass
    class RpieOptions:
        num_iter: int = 1
        num_batch: int = 5
        batch_method: str = "wobbly_center"
        alpha: float = 0.05
        costs: list = dataclasses.field(default_factory=lambda: [[0.5], [0.25]])

    class ProbeOptions:
        pass

    class ObjectOptions:
        pass

    @dataclasses.dataclass
    class PtychoParameters:  # the checks of tike 0.26's PtychoParameters.__post_init__
        probe: np.ndarray
        psi: np.ndarray
        scan: np.ndarray
        algorithm_options: RpieOptions = None
        probe_options: object = None
        object_options: object = None

        def __post_init__(self):
            assert self.scan.ndim == 2 and self.scan.shape[1] == 2
            assert self.probe.ndim == 5 and self.probe.shape[:2] == (1, 1)
            assert self.psi.ndim == 3 and np.all(np.asarray(self.psi.shape[-2:]) > self.probe.shape[-2:])
            lo, hi = np.min(self.scan // 1, 0), np.max(self.scan // 1, 0)
            assert np.all(lo >= 1) and np.all(hi <= np.asarray(self.psi.shape[-2:]) - self.probe.shape[-2:] - 1)

    def reconstruct(data, parameters, num_gpu=1, use_mpi=False):
        assert data.ndim == 3 and data.shape[0] == parameters.scan.shape[0]
        calls.update(data=data, parameters=parameters, num_gpu=num_gpu)
        return parameters

    ptycho.RpieOptions, ptycho.ProbeOptions, ptycho.ObjectOptions = RpieOptions, ProbeOptions, ObjectOptions
    ptycho.PtychoParameters, ptycho.reconstruct = PtychoParameters, reconstruct
    probe_mod = types.ModuleType("tike.ptycho.probe")

    def add_modes_cartesian_hermite(probe, nmodes):
        out = np.zeros((*probe.shape[:-3], nmodes, *probe.shape[-2:]), np.complex64)
        out[..., 0, :, :] = probe[..., 0, :, :]
        out[..., 1:, :, :] = 0.1 * probe[..., :1, :, :]
        return out

    probe_mod.add_modes_cartesian_hermite = add_modes_cartesian_hermite
    ptycho.probe = probe_mod
    tike = types.ModuleType("tike")
    tike.ptycho = ptycho
    return tike


def test_tike_engine_calls_tike_as_its_api_requires(hpc_scans, tmp_path, monkeypatch):
    calls: dict = {}
    tike = _fake_tike(calls)
    monkeypatch.setitem(sys.modules, "tike", tike)
    monkeypatch.setitem(sys.modules, "tike.ptycho", tike.ptycho)
    monkeypatch.setitem(sys.modules, "tike.ptycho.probe", tike.ptycho.probe)
    scan = read_scan(hpc_scans["scans"][0])
    out = reconstruct(hpc_scans["scans"][0], str(tmp_path / "t.h5"), engine="tike", iterations=7,
                      probe_modes=3, device="cuda:1", num_batch=4)
    rec = read_reconstruction(out)
    assert rec.engine == "tike" and rec.probe.shape == (3, 128, 128)
    p = calls["parameters"]
    assert calls["num_gpu"] == (1,) and p.algorithm_options.num_iter == 7 and p.algorithm_options.num_batch == 4
    assert p.psi.shape == (1, *rec.object.shape)
    # zero frequency in the corner: tike's data are ifftshift-ed frames
    np.testing.assert_array_equal(calls["data"][:, 0, 0], scan.frames[:, 64, 64].astype(np.float32))
    assert json.loads(rec.attrs["settings"])["final_loss"] == pytest.approx(0.25)
    with pytest.raises(TypeError, match="unknown tike option"):
        reconstruct(hpc_scans["scans"][0], str(tmp_path / "t2.h5"), engine="tike", batch_size=3)


def test_endpoint_environment_pins_numpy_1_and_leaves_out_the_ioc():
    here = Path(__file__).resolve().parents[1] / "hpc" / "endpoint"
    reqs = {}
    for line in (here / "requirements-tike.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = line.split("=")[0].split(">")[0].split("<")[0].strip().lower()
            reqs[name] = line
    assert reqs["numpy"].startswith("numpy==1."), reqs["numpy"]
    assert {"cupy-cuda12x", "torch", "globus-compute-endpoint", "scikit-image"} <= set(reqs)
    assert not {"ptychi", "p4p", "pvapy", "caproto", "bluesky", "ophyd"} & set(reqs)
    assert all("==" in v for k, v in reqs.items() if k not in ("globus-sdk", "protobuf")), reqs
    # the package goes in with --no-deps, so each of its own requirements must be pinned here
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(here.parents[1] / "setup.cfg")
    needs = {re.split(r"[<>=!\[ ;]", r.strip())[0].lower()
             for r in cfg["options"]["install_requires"].splitlines() if r.strip()}
    assert needs <= set(reqs), needs - set(reqs)
    script = (here / "build-env.sh").read_text()
    assert "--no-deps tike==0.26.0" in script and '--no-deps "$REPO"' in script
    import subprocess

    subprocess.run(["bash", "-n", str(here / "build-env.sh")], check=True)
