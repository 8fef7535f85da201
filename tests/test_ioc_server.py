"""The edge IOC on loopback: real p4p servers and clients, real onnxruntime, a real CA mirror."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ptychostream.model import ModelError, PtychoNN2, export_onnx, state_dict_bytes
from ptychostream.pvnames import PVS
from ptychostream.stitch import DEFAULT_REGISTER_OFFSETS, stitch

PIXEL = 12.9e-9


@functools.cache
def onnx_model(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    return export_onnx(PtychoNN2())


@functools.cache
def wrong_shape_onnx() -> bytes:
    """A valid ONNX model, but for 64x64 frames."""
    import io

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 1, 64, 64),), buf, input_names=["x"],
                      output_names=["y"], dynamo=False)
    return buf.getvalue()


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value is not None and value is not False and (not hasattr(value, "__len__")
                                                         or isinstance(value, np.ndarray)
                                                         or len(value)):
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class PhaseCollector:
    """Monitors $(P)NN:Phase; keeps (uniqueId, timestamp, attributes, image) per update."""

    def __init__(self, prefix: str) -> None:
        from p4p.client.thread import Context

        self.frames: dict[int, tuple] = {}
        self.order: list[int] = []
        self._ctx = Context("pva")
        self._connected = threading.Event()
        self._sub = self._ctx.monitor(prefix + "NN:Phase", self._cb, notify_disconnect=True,
                                      request="record[queueSize=1000]")
        assert self._connected.wait(10), "NN:Phase did not connect"

    def _cb(self, v) -> None:
        if isinstance(v, Exception):
            return
        self._connected.set()
        uid = int(v.raw["uniqueId"])
        if v.size == 0:  # the empty value a PV holds before the first frame
            return
        ts = v.raw["dataTimeStamp.secondsPastEpoch"] + v.raw["dataTimeStamp.nanoseconds"] * 1e-9
        self.frames[uid] = (uid, ts, dict(v.attrib), np.array(v))
        self.order.append(uid)

    def close(self) -> None:
        self._sub.close()
        self._ctx.close()


@pytest.fixture
def sim_scan():
    from ptychostream.simulation import simulate_scan

    return simulate_scan(n_positions=24, step_m=120e-9, seed=7)


@pytest.fixture
def ioc_factory(epics_env, tmp_path):
    """Start EdgeIOCs (and FramePublishers) on this test's ports; all are stopped afterwards."""
    from ptychostream.ioc.server import EdgeIOC
    from ptychostream.ioc.sim_detector import FramePublisher

    started = []

    def make(**kw):
        kw.setdefault("input_pv", epics_env["prefix"] + "det:Image")
        ioc = EdgeIOC(epics_env["prefix"], **kw).start()
        started.append(ioc)
        ioc.wait_model()
        return ioc

    def publisher():
        pub = FramePublisher(epics_env["prefix"] + "det:Image")
        started.append(pub)
        return pub

    make.publisher = publisher
    make.prefix = epics_env["prefix"]
    make.store = tmp_path / "models"
    yield make
    for obj in reversed(started):
        obj.stop() if hasattr(obj, "stop") else obj.close()


def publish_scan(pub, scan, start_uid=1, period=0.0, attrs=True):
    for i in range(scan.n_frames):
        a = ({"PosX": scan.positions_m[i, 0], "PosY": scan.positions_m[i, 1],
              "PixelSize": scan.object_pixel_size_m} if attrs else {})
        pub.publish(scan.frames[i], start_uid + i, a, timestamp=1.7e9 + i)
        if period:
            time.sleep(period)


def stream_through(ioc_factory, ioc, scan, period: float) -> PhaseCollector:
    """Publish every frame of ``scan`` to the IOC's input and wait for all their phases."""
    phases = PhaseCollector(ioc_factory.prefix)
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    publish_scan(pub, scan, period=period)
    wait_for(lambda: len(phases.frames) == scan.n_frames, what="all phases")
    phases.close()
    return phases


def test_starts_without_model_then_frames_in_phase_out(ioc_factory, sim_scan):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    # three inference workers (batches at once, on a CPU's cores): phases still leave in order
    ioc = ioc_factory(batch_size=4, model_store=ioc_factory.store, engine_workers=3)
    status = client.get(p, "NN:ModelStatus_RBV")
    assert status == "No model loaded" and status.severity == 1
    assert client.get(p, "NN:ModelVersion_RBV") == 0
    assert client.deploy_model(p, onnx_model(), "first") == 1
    assert client.get(p, "NN:ModelName_RBV") == "first"

    assert client.get(p, "NN:Engine_RBV").endswith(", 3 workers")
    phases = stream_through(ioc_factory, ioc, sim_scan, period=0.001)
    assert phases.order == list(range(1, sim_scan.n_frames + 1))
    uid, ts, attrs, img = phases.frames[5]
    assert ts == pytest.approx(1.7e9 + 4)
    assert attrs["PosX"] == pytest.approx(sim_scan.positions_m[4, 0])
    assert attrs["ModelVersion"] == 1 and attrs["ModelName"] == "first"
    assert img.shape == (128, 128) and img.dtype == np.float32
    expected = ioc.inference.serving.engine.infer(sim_scan.frames[4][None])[0]
    np.testing.assert_allclose(img, expected, rtol=1e-5, atol=1e-5)
    wait_for(lambda: client.get(p, "NN:ArrayCounter_RBV") == sim_scan.n_frames, what="counter")
    assert client.get(p, "NN:UniqueId_RBV") == sim_scan.n_frames
    assert client.get(p, "NN:DroppedArrays_RBV") == 0


def test_model_writes_good_and_refused_while_streaming(ioc_factory, sim_scan):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=2, model_store=ioc_factory.store)
    assert client.deploy_model(p, onnx_model(0), "v1") == 1
    phases = PhaseCollector(p)
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    streamer = threading.Thread(target=publish_scan, args=(pub, sim_scan),
                                kwargs={"period": 0.04})
    streamer.start()
    refused = {
        "corrupt ONNX": onnx_model(0)[:5000],
        "corrupt state dict": state_dict_bytes(PtychoNN2())[:3000],
        "wrong shape": wrong_shape_onnx(),
        "not a model": b"#!/bin/sh\necho hello\n" * 10,
    }
    for label, data in refused.items():
        with pytest.raises(ModelError, match="Refused"):
            client.deploy_model(p, data, label)
        status = client.get(p, "NN:ModelStatus_RBV")
        assert status.startswith(f"Refused {label}") and status.severity == 2, status
        assert client.get(p, "NN:ModelVersion_RBV") == 1
        assert client.get(p, "NN:ModelName_RBV") == "v1"
    torch.manual_seed(3)
    assert client.deploy_model(p, state_dict_bytes(PtychoNN2()), "v2-state-dict") == 2
    status = client.get(p, "NN:ModelStatus_RBV")
    assert status.severity == 0 and "v2-state-dict" in status
    streamer.join()
    wait_for(lambda: len(phases.frames) == sim_scan.n_frames, 30, "all phases")
    phases.close()
    # nothing lost, and every frame served wholly by one accepted model, old before new
    assert sorted(phases.frames) == list(range(1, sim_scan.n_frames + 1))
    versions = [phases.frames[u][2]["ModelVersion"] for u in sorted(phases.frames)]
    assert set(versions) <= {1, 2} and versions == sorted(versions)
    assert ioc.nn.stats()["DroppedArrays_RBV"] == 0
    stored = ioc.store.current()
    assert stored.version == 2 and stored.name == "v2-state-dict"


def test_restart_serves_the_stored_model(ioc_factory):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(model_store=ioc_factory.store)
    client.deploy_model(p, onnx_model(0), "a")
    client.deploy_model(p, onnx_model(1), "b")
    with pytest.raises(ModelError):
        client.deploy_model(p, b"junk", "c")
    ioc.stop()
    # a different --model-file is ignored: the store holds the last good model
    other = ioc_factory.store.parent / "other.onnx"
    other.write_bytes(onnx_model(2))
    ioc2 = ioc_factory(model_store=ioc_factory.store, model_file=other)
    assert ioc2.wait_model() == 2
    assert client.get(p, "NN:ModelVersion_RBV") == 2
    assert client.get(p, "NN:ModelName_RBV") == "b"
    assert client.deploy_model(p, onnx_model(0), "d") == 3


def test_model_file_serves_when_store_is_empty(ioc_factory, tmp_path):
    from ptychostream.ioc import client

    f = tmp_path / "published.onnx"
    f.write_bytes(onnx_model(0))
    ioc_factory(model_file=f)
    assert client.get(ioc_factory.prefix, "NN:ModelName_RBV") == "published"
    assert client.get(ioc_factory.prefix, "NN:ModelStatus_RBV").severity == 0


def test_live_stitched_map_equals_offline_stitch(ioc_factory, sim_scan):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=8)
    client.deploy_model(p, onnx_model(0))
    client.put(p, "Stitch:UpdatePeriod", 0.2)
    client.put(p, "Stitch:RegisterOffsets", 0)  # registration depends on batch boundaries
    client.put_positions(p, sim_scan.positions_m)
    phases = stream_through(ioc_factory, ioc, sim_scan, period=0.002)
    wait_for(lambda: client.get(p, "Stitch:NumFrames_RBV") == sim_scan.n_frames, what="stitch")
    live = wait_for(lambda: (lambda im: im if im.attrib.get("NumFrames") == sim_scan.n_frames
                             else None)(client.get_stitched(p)), what="final map")
    imgs = np.stack([phases.frames[u][3] for u in range(1, sim_scan.n_frames + 1)])
    offline, origin = stitch(imgs, sim_scan.positions_m, sim_scan.object_pixel_size_m,
                             weighting="probe")  # the IOC's default: no probe, the beam's disk
    got_origin, pixel = client.stitched_geometry(live)
    assert pixel == pytest.approx(sim_scan.object_pixel_size_m)
    assert got_origin == pytest.approx(origin)
    np.testing.assert_allclose(np.asarray(live), offline, rtol=1e-6, atol=1e-6, equal_nan=True)
    client.reset_stitch(p)
    wait_for(lambda: client.get(p, "Stitch:NumFrames_RBV") == 0, what="reset")
    assert client.get(p, "Stitch:Reset") == 0


def test_stitch_image_is_rate_bounded(ioc_factory, sim_scan):
    """Many frames, few Stitch:Image updates (UpdatePeriod 0.5 s), the last one complete."""
    from p4p.client.thread import Context

    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=8)
    client.deploy_model(p, onnx_model(0))
    updates = []
    with Context("pva") as ctx:
        sub = ctx.monitor(p + "Stitch:Image",
                          lambda v: updates.append((time.monotonic(), v.attrib.get("NumFrames"))))
        pub = ioc_factory.publisher()
        wait_for(ioc.input_connected.is_set, what="input monitor")
        t0 = time.monotonic()
        publish_scan(pub, sim_scan)
        wait_for(lambda: updates and updates[-1][1] == sim_scan.n_frames, what="final map")
        sub.close()
    during = [t for t, _ in updates if t >= t0]
    # at most one update per UpdatePeriod (0.5 s) however many frames arrive, plus the first
    assert len(during) <= (during[-1] - t0) / 0.5 + 2
    assert len(during) < sim_scan.n_frames


def test_drops_counted_not_blocking_when_input_outruns_engine(ioc_factory, sim_scan):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=1, queue_size=2)
    client.deploy_model(p, onnx_model(0))
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    for rep in range(4):  # 96 frames back to back: faster than the engine on any CPU
        publish_scan(pub, sim_scan, start_uid=1 + rep * sim_scan.n_frames)
    wait_for(lambda: ioc.nn.idle() and ioc.nn.received > 0, what="drain")
    time.sleep(0.3)
    s = ioc.nn.stats()
    assert s["DroppedArrays_RBV"] > 0
    assert s["ArrayCounter_RBV"] + s["DroppedArrays_RBV"] == ioc.nn.received
    wait_for(lambda: client.get(p, "NN:DroppedArrays_RBV") == s["DroppedArrays_RBV"],
             what="DroppedArrays_RBV")


def test_malformed_frames_counted_with_alarm_stream_goes_on(ioc_factory, sim_scan):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=4)
    client.deploy_model(p, onnx_model(0))
    phases = PhaseCollector(p)
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    pub.publish(sim_scan.frames[0], 1, {})
    pub.publish(np.zeros((64, 64), np.uint32), 2, {})           # wrong shape
    pub.publish(np.zeros((128, 128, 3), np.uint8), 3, {})       # RGB
    pub.publish(np.full((128, 128), np.inf, np.float32), 4, {})  # not finite
    pub.publish(sim_scan.frames[1], 5, {})                       # no positions: NN is fine
    wait_for(lambda: {1, 5} <= set(phases.frames), what="good frames")
    wait_for(lambda: client.get(p, "NN:BadArrays_RBV") == 3, what="BadArrays_RBV")
    status = client.get(p, "NN:Status_RBV")
    assert status.severity == 2 and "bad array" in status
    # the stitcher refuses the frames without positions, with its own status
    wait_for(lambda: client.get(p, "Stitch:BadArrays_RBV") == 2, what="Stitch:BadArrays_RBV")
    assert "PosX" in client.get(p, "Stitch:Status_RBV")
    phases.close()
    assert ioc.nn.stats()["ArrayCounter_RBV"] == 2


def test_scalar_writes_validated_and_applied(ioc_factory):
    from p4p.client.thread import RemoteError

    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory()
    client.put(p, "NN:BatchSize", 3)
    client.put(p, "NN:IntensityScale", 10.0)
    client.put(p, "NN:QueueSize", 17)
    client.put(p, "NN:EnableCallbacks", 0)
    assert (ioc.nn.batch_size, ioc.inference.intensity_scale, ioc.nn.queue_size) == (3, 10.0, 17)
    assert ioc.nn.enabled is False
    assert client.get(p, "NN:EnableCallbacks") == 0
    assert client.get(p, "Stitch:RegisterOffsets") == int(DEFAULT_REGISTER_OFFSETS)
    assert ioc.stitching.register_offsets is DEFAULT_REGISTER_OFFSETS
    client.put(p, "Stitch:RegisterOffsets", 1)
    assert ioc.stitching.register_offsets is True
    for suffix, bad in [("NN:BatchSize", 0), ("NN:IntensityScale", -1.0), ("NN:QueueSize", 0)]:
        with pytest.raises(RemoteError):
            client.put(p, suffix, bad)
    assert client.get(p, "NN:BatchSize") == 3
    with pytest.raises(RemoteError):
        client.put(p, "NN:ArrayCounter_RBV", 5)


def test_scalars_over_channel_access(ioc_factory):
    from caproto.sync import client as ca

    # generous timeouts: the suite shares 2 cores with other servers; repeater=False: the sync
    # client would otherwise spawn a CA repeater that outlives the test (one per test port)
    def read(name):
        return ca.read(name, timeout=10, repeater=False)

    def write(name, value):
        return ca.write(name, value, notify=True, timeout=10, repeater=False)

    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(ca_mirror=True)
    scalars = [s for s, spec in PVS.items() if spec.ca]
    from caproto.threading.client import Context as CAContext

    ca_ctx = CAContext()  # every scalar of the table exists over CA (one search for all)
    try:
        for pv in ca_ctx.get_pvs(*(p + s for s in scalars), timeout=10):
            pv.wait_for_connection(timeout=10)
    finally:
        ca_ctx.disconnect()
    assert read(p + "NN:BatchSize").data[0] == 8
    status = read(p + "NN:ModelStatus_RBV").data.tobytes().rstrip(b"\0").decode()
    assert status == "No model loaded"
    assert read(p + "NN:ModelStatus_RBV").status.severity == 1
    write(p + "NN:BatchSize", 5)  # CA -> IOC -> pvAccess
    assert ioc.nn.batch_size == 5 and client.get(p, "NN:BatchSize") == 5
    client.put(p, "NN:IntensityScale", 4.0)    # pvAccess -> CA
    wait_for(lambda: read(p + "NN:IntensityScale").data[0] == 4.0, what="CA mirror")
    write(p + "NN:EnableCallbacks", "Disable")
    assert ioc.nn.enabled is False
    with pytest.raises(Exception):  # noqa: B017 (caproto raises its own ErrorResponseReceived)
        write(p + "NN:BatchSize", -4)
    assert ioc.nn.batch_size == 5
    client.deploy_model(p, onnx_model(0), "x" * 60)
    long = wait_for(lambda: (lambda s: s if "x" * 60 in s else None)(
        read(p + "NN:ModelStatus_RBV").data.tobytes().rstrip(b"\0").decode()), what="long status")
    assert len(long) > 40


def test_cli_help_and_config_file(tmp_path):
    import ptychostream.ioc.server as server_module
    from ptychostream.ioc.server import parse_args

    out = subprocess.run([sys.executable, "-m", "ptychostream.ioc.server", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--model-store" in out.stdout and "--config" in out.stdout
    cfg = tmp_path / "ioc.toml"
    cfg.write_text('[ioc]\nprefix = "BL1:"\nbatch_size = 16\nca = true\n'
                   'stitch_input = ["a:Phase", "b:Phase"]\n')
    a = parse_args(["--config", str(cfg), "--batch-size", "4"])
    assert (a.prefix, a.batch_size, a.ca, a.stitch_input) == ("BL1:", 4, True,
                                                              ["a:Phase", "b:Phase"])
    example = parse_args(["--config", str(Path(server_module.__file__).with_name(
        "ioc.example.toml"))])
    assert example.ca is True and example.batch_size == 8
    cfg.write_text("batchsize = 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])


def test_detector_going_away_is_reported_and_recovered(ioc_factory, sim_scan):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory()
    client.deploy_model(p, onnx_model(0))
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    pub.close()
    wait_for(lambda: not ioc.input_connected.is_set(), what="disconnect seen")
    status = wait_for(lambda: (lambda s: s if "Disconnected" in s else None)(
        client.get(p, "NN:Status_RBV")), what="status")
    assert status.severity == 1 and p + "det:Image" in status
    pub2 = ioc_factory.publisher()  # the detector comes back: the stream goes on
    wait_for(ioc.input_connected.is_set, what="reconnect")
    pub2.publish(sim_scan.frames[0], 1, {})
    wait_for(lambda: ioc.nn.stats()["ArrayCounter_RBV"] == 1, what="frame after reconnect")
