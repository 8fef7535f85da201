"""Inference plugin and its driver (queue, batching, flush, drops, bad frames), host-free,
on real onnxruntime with a small PtychoNN 2.0."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
import torch

from ptychostream.batch import FrameBatch, batch_from_frames
from ptychostream.engines import load_engine
from ptychostream.model import ModelError, PtychoNN2, export_onnx, state_dict_bytes
from ptychostream.ntndarray import Frame
from ptychostream.plugins.driver import PluginDriver
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


def batch(n: int, start: int = 1, seed: int = 0) -> FrameBatch:
    return batch_from_frames(frames(n, start, seed))


def test_process_keeps_identity_and_matches_bare_engine():
    plugin = InferencePlugin()
    plugin.load_model(onnx_bytes(), "m0")
    src = batch(5)
    out = plugin.process(src)
    np.testing.assert_array_equal(out.unique_ids, np.arange(1, 6))
    np.testing.assert_array_equal(out.timestamps, 1000.0 + np.arange(5))
    a = out.attributes(3)
    assert a["ModelVersion"] == 1 and a["ModelName"] == "m0"
    assert (a["PosX"], a["PosY"]) == pytest.approx((3e-7, -3e-7))
    bare = load_engine("onnxruntime", onnx_bytes()).infer(np.stack([f.data for f in frames(5)]))
    np.testing.assert_allclose(out.phase, bare, rtol=1e-5, atol=1e-5)


def test_intensity_scale_is_applied():
    plugin = InferencePlugin(intensity_scale=10.0)
    plugin.load_model(onnx_bytes())
    plain = InferencePlugin()
    plain.load_model(onnx_bytes())
    scaled = batch(2)
    scaled.data = scaled.data * 10
    np.testing.assert_allclose(plugin.process(batch(2)).phase[0], plain.process(scaled).phase[0],
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
    assert len(plugin.process(batch(1))) == 1


def test_check_drops_only_the_bad_frames_on_the_values_the_engine_sees():
    """1e300 is finite as float64 but inf as float32; 2**62 is no detector's count: each drops
    alone, the good frames of the same batch are inferred (issue 11, item 3)."""
    plugin = InferencePlugin()
    plugin.load_model(onnx_bytes())
    good = frames(4)
    src = [good[0], Frame(np.full((128, 128), 1e300), 50), good[1],
           Frame(np.full((128, 128), 2 ** 62, np.int64), 51),
           Frame(np.full((128, 128), np.nan, np.float32), 52), good[2]]
    out = plugin.process(batch_from_frames(src))
    np.testing.assert_array_equal(out.unique_ids, [1, 2, 3])
    assert sum(n for _, n, bad in out.problems if bad) == 3
    assert out.phase.shape == (3, 128, 128) and np.isfinite(out.phase).all()
    wrong = plugin.process(batch_from_frames([Frame(np.zeros((64, 64)), 9)]))
    assert len(wrong) == 0 and "shape" in wrong.problems[0][0]


def test_no_model_passes_frames_on_unprocessed():
    plugin = InferencePlugin()
    out = plugin.process(batch(3))
    assert len(out) == 3 and out.phase is None and out.skipped == [("no model loaded", 3)]


def _collecting_driver(plugin, **kw):
    out: list[FrameBatch] = []
    done = threading.Event()

    def sink(b):
        out.append(b)
        done.set()

    return PluginDriver(plugin, sinks=[sink], decode=batch_from_frames, **kw), out, done


def uids(batches) -> list[int]:
    return [int(u) for b in batches for u in b.unique_ids]


def test_driver_batches_and_flushes_partial_batch():
    plugin = InferencePlugin()
    plugin.load_model(onnx_bytes())
    sizes = []
    orig = plugin.process
    plugin.process = lambda b: (sizes.append(len(b)), orig(b))[1]
    drv, out, _ = _collecting_driver(plugin, batch_size=4, flush_s=0.05)
    for f in frames(10):  # queued before the worker starts: full batches, then a partial one
        assert drv.push(f, unique_id=f.unique_id)
    drv.start()
    try:
        assert drv.wait_idle(30)
    finally:
        drv.stop()
    assert sizes == [4, 4, 2]
    assert uids(out) == list(range(1, 11))
    s = drv.stats()
    assert s["ArrayCounter_RBV"] == 10 and s["DroppedArrays_RBV"] == 0 and s["UniqueId_RBV"] == 10


def test_workers_run_batches_at_once_and_hand_them_on_in_order():
    """Several workers on one queue: batches overlap in time, yet reach the sinks in the order
    they were taken, each once, also when a later batch finishes first or one fails."""
    plugin = InferencePlugin()
    plugin.load_model(onnx_bytes())
    lock, active, most = threading.Lock(), [0], [0]
    orig = plugin.process

    def process(b):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            first = int(b.unique_ids[0])
            if first == 9:
                raise RuntimeError("engine failed on this batch")
            time.sleep(0.15 if (first // 4) % 2 == 0 else 0.0)  # even batches are slow
            return orig(b)
        finally:
            with lock:
                active[0] -= 1

    plugin.process = process
    drv, out, _ = _collecting_driver(plugin, batch_size=4, flush_s=0.05, workers=3)
    for f in frames(24):
        assert drv.push(f, unique_id=f.unique_id)
    drv.start()
    try:
        assert drv.wait_idle(30)
        assert most[0] >= 2  # batches did run concurrently
        assert uids(out) == [u for u in range(1, 25) if not 9 <= u <= 12]  # the failed batch
        s = drv.stats()
        assert s["ArrayCounter_RBV"] == 20 and s["DroppedArrays_RBV"] == 4
        assert s["UniqueId_RBV"] == 24
        out.clear()
        for f in frames(12, start=25):  # arriving while workers wait to fill their batches
            drv.push(f, unique_id=f.unique_id)
            time.sleep(0.01)
        assert drv.wait_idle(30)
    finally:
        drv.stop()
    assert uids(out) == list(range(25, 37))
    for b in out:  # one worker gathers a batch at a time: a batch is consecutive frames
        assert list(b.unique_ids) == list(range(b.unique_ids[0], b.unique_ids[0] + len(b)))
    ref = load_engine("onnxruntime", onnx_bytes())
    src = frames(12, start=25)
    for b in out:  # each phase is its own frame's, whichever worker computed it
        np.testing.assert_allclose(b.phase, ref.infer(np.stack(
            [src[int(u) - 25].data for u in b.unique_ids])), rtol=1e-4, atol=1e-4)


def test_driver_counts_drops_when_full_bad_frames_gaps_and_no_model():
    plugin = InferencePlugin()
    drv, out, _ = _collecting_driver(plugin, queue_size=3, batch_size=1)
    accepted = [drv.push(f, unique_id=f.unique_id) for f in frames(8)]  # no worker: queue fills
    assert accepted == [True] * 3 + [False] * 5
    assert drv.stats()["DroppedArrays_RBV"] == 5 and drv.stats()["QueueFree_RBV"] == 0
    drv.set_condition("model", 1, "No model loaded")
    drv.start()
    try:
        assert drv.wait_idle(30)
        s = drv.stats()
        # no model: the frames go on to the map unprocessed (passed, not lost)
        assert s["DroppedArrays_RBV"] == 5 and s["ArrayCounter_RBV"] == 0 and uids(out) == [1, 2, 3]
        assert drv.passed == 3
        assert s["Status_RBV"][:2] == ("No model loaded", 1)
        plugin.load_model(onnx_bytes())
        drv.clear_condition("model")
        drv.push(Frame(np.zeros((5, 5), np.uint32), 77), unique_id=77)
        drv.push(frames(1, start=78)[0], unique_id=78)
        assert drv.wait_idle(30)
        s = drv.stats()
        assert s["BadArrays_RBV"] == 1 and s["DroppedArrays_RBV"] == 6
        assert s["ArrayCounter_RBV"] == 1 and uids(out)[-1] == 78
        assert drv.missed == 77 - 8 - 1  # uniqueIds 9..76 never arrived
        assert drv.received == drv.array_counter + drv.dropped + drv.passed
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
    assert uids(out) == list(range(1, 25))
    names = [b.model_name for b in out for _ in range(len(b))]
    assert names[-1] == "b" and names == sorted(names)  # a...a b...b, never back
    ref = {n: load_engine("onnxruntime", onnx_bytes(i)) for i, n in enumerate("ab")}
    for b in out:  # each output was computed by the model it names
        for u, phase in zip(b.unique_ids, b.phase, strict=True):
            src = frames(12, start=1 if u <= 12 else 13)[(u - 1) % 12]
            np.testing.assert_allclose(phase, ref[b.model_name].infer(src.data[None])[0],
                                       rtol=1e-4, atol=1e-4)


def test_driver_thread_carries_its_stage_name_in_the_os():
    """``top -H`` and /proc show which stage uses the CPU (bench_pipeline reads them)."""
    import os

    drv, _, _ = _collecting_driver(InferencePlugin())
    drv.start()
    try:
        tid = drv._threads[0].native_id
        deadline = time.monotonic() + 10
        comm = ""
        while time.monotonic() < deadline and comm != f"plugin-{drv.name}"[:15]:
            comm = open(f"/proc/{os.getpid()}/task/{tid}/comm").read().strip()
            time.sleep(0.01)
    finally:
        drv.stop()
    assert comm == f"plugin-{drv.name}"[:15]
