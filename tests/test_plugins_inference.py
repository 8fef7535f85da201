"""Inference plugin and its driver (queue, batching, flush, drops, bad frames), host-free,
on real onnxruntime with a small PtychoNN 2.0."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch

from ptychostream.engines import load_engine
from ptychostream.model import ModelError, PtychoNN2, export_onnx, state_dict_bytes
from ptychostream.ntndarray import Frame
from ptychostream.plugins.driver import FrameError, PluginDriver
from ptychostream.plugins.inference import InferencePlugin


@functools.cache
def model(seed: int = 0) -> PtychoNN2:
    torch.manual_seed(seed)
    return PtychoNN2().eval()


@functools.cache
def onnx_bytes(seed: int = 0) -> bytes:
    return export_onnx(model(seed))


def frames(n: int, start: int = 1, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [Frame(rng.poisson(10, (128, 128)).astype(np.uint32), start + i, 1000.0 + i,
                  {"PosX": i * 1e-7, "PosY": -i * 1e-7}) for i in range(n)]


def test_process_keeps_identity_and_matches_bare_engine():
    plugin = InferencePlugin()
    plugin.load_model(onnx_bytes(), "m0")
    src = frames(5)
    out = plugin.process(src)
    assert [f.unique_id for f in out] == [f.unique_id for f in src]
    assert [f.timestamp for f in out] == [f.timestamp for f in src]
    assert all(f.attributes["ModelVersion"] == 1 and f.attributes["ModelName"] == "m0"
               for f in out)
    assert out[3].position == src[3].position
    bare = load_engine("onnxruntime", onnx_bytes()).infer(np.stack([f.data for f in src]))
    np.testing.assert_allclose(np.stack([f.data for f in out]), bare, rtol=1e-5, atol=1e-5)


def test_intensity_scale_is_applied():
    plugin = InferencePlugin(intensity_scale=10.0)
    plugin.load_model(onnx_bytes())
    src = frames(2)
    scaled = [Frame(f.data.astype(np.float32) * 10, f.unique_id) for f in src]
    plain = InferencePlugin()
    plain.load_model(onnx_bytes())
    np.testing.assert_allclose(plugin.process(src)[0].data, plain.process(scaled)[0].data,
                               rtol=1e-5, atol=1e-5)


def test_state_dict_model_and_refusals_keep_old_model():
    plugin = InferencePlugin()
    plugin.load_model(state_dict_bytes(model(1)), "sd")
    assert plugin.model_version == 1
    for bad, reason in [(b"", "empty"), (b"not a model at all", "neither ONNX"),
                        (onnx_bytes()[: len(onnx_bytes()) // 2], "neither ONNX"),
                        (state_dict_bytes(model(1))[:2000], "PyTorch")]:
        with pytest.raises(ModelError, match=reason):
            plugin.load_model(bad, "bad")
        assert plugin.model_version == 1 and plugin.model_name == "sd"
    assert len(plugin.process(frames(1))) == 1


def test_check_refuses_malformed_frames():
    plugin = InferencePlugin()
    for data in [np.zeros((64, 64)), np.zeros((2, 128, 128)), np.array(["a"] * 4),
                 np.full((128, 128), np.nan, np.float32)]:
        with pytest.raises(FrameError):
            plugin.check(Frame(data, 1))
    assert plugin.check(Frame(np.zeros((1, 128, 128), np.uint16), 1)).data.shape == (128, 128)


def _collecting_driver(plugin, **kw):
    out: list[Frame] = []
    done = threading.Event()

    def sink(frames):
        out.extend(frames)
        done.set()

    return PluginDriver(plugin, sink=sink, **kw), out, done


def test_driver_batches_and_flushes_partial_batch():
    plugin = InferencePlugin()
    plugin.load_model(onnx_bytes())
    sizes = []
    orig = plugin.process
    plugin.process = lambda fs: (sizes.append(len(fs)), orig(fs))[1]
    drv, out, _ = _collecting_driver(plugin, batch_size=4, flush_s=0.05)
    for f in frames(10):  # queued before the worker starts: full batches, then a partial one
        assert drv.push(f)
    drv.start()
    try:
        assert drv.wait_idle(30)
    finally:
        drv.stop()
    assert sizes == [4, 4, 2]
    assert [f.unique_id for f in out] == list(range(1, 11))
    s = drv.stats()
    assert s["ArrayCounter_RBV"] == 10 and s["DroppedArrays_RBV"] == 0 and s["UniqueId_RBV"] == 10


def test_driver_counts_drops_when_full_and_bad_frames_and_no_model():
    plugin = InferencePlugin()
    drv, out, _ = _collecting_driver(plugin, queue_size=3, batch_size=1)
    accepted = [drv.push(f) for f in frames(8)]  # worker not started: the queue fills
    assert accepted == [True] * 3 + [False] * 5
    assert drv.stats()["DroppedArrays_RBV"] == 5 and drv.stats()["QueueFree_RBV"] == 0
    drv.start()
    try:
        assert drv.wait_idle(30)
        s = drv.stats()
        assert s["DroppedArrays_RBV"] == 8 and s["ArrayCounter_RBV"] == 0  # no model: dropped
        assert s["Status_RBV"] == ("No model loaded", 1)
        plugin.load_model(onnx_bytes())
        drv.push(Frame(np.zeros((5, 5), np.uint32), 77))
        drv.push(frames(1, start=78)[0])
        assert drv.wait_idle(30)
        s = drv.stats()
        assert s["BadArrays_RBV"] == 1 and s["DroppedArrays_RBV"] == 9
        assert s["ArrayCounter_RBV"] == 1 and [f.unique_id for f in out] == [78]
        assert "77" in s["Status_RBV"][0] and s["Status_RBV"][1] == 2
    finally:
        drv.stop()


def test_swap_between_batches_serves_whole_batches():
    plugin = InferencePlugin()
    plugin.load_model(onnx_bytes(0), "a")
    drv, out, _ = _collecting_driver(plugin, batch_size=4, flush_s=0.01)
    drv.start()
    try:
        for f in frames(12):
            drv.push(f)
        plugin.load_model(onnx_bytes(1), "b")
        for f in frames(12, start=13):
            drv.push(f)
        assert drv.wait_idle(60)
    finally:
        drv.stop()
    assert [f.unique_id for f in out] == list(range(1, 25))
    names = [f.attributes["ModelName"] for f in out]
    assert names[-1] == "b" and names == sorted(names)  # a...a b...b, never back
    ref = {n: load_engine("onnxruntime", onnx_bytes(i)) for i, n in enumerate("ab")}
    for f in out:  # each output was computed by the model it names
        src = frames(12, start=1 if f.unique_id <= 12 else 13)[(f.unique_id - 1) % 12]
        np.testing.assert_allclose(f.data, ref[f.attributes["ModelName"]].infer(src.data[None])[0],
                                   rtol=1e-4, atol=1e-4)
