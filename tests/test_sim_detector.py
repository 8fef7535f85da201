"""Simulated detectors on loopback: ours (p4p) and pvapy-ad-sim-server, as the IOC's input."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ptychostream.model import PtychoNN2, export_onnx

BIN = Path(sys.executable).parent


@functools.cache
def onnx_model() -> bytes:
    torch.manual_seed(0)
    return export_onnx(PtychoNN2())


@pytest.fixture(scope="module")
def scan():
    from ptychostream.simulation import simulate_scan

    return simulate_scan(n_positions=16, step_m=150e-9, seed=11)


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _plain(d):
    """A Value's todict() with its arrays as lists, so two of them compare with ==."""
    return {k: _plain(v) if isinstance(v, dict) else
            (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def test_frames_encode_as_p4p_wraps_them_and_decode_back():
    """The detector's and NN:Phase's encoder builds the Value itself (faster than p4p's
    NTNDArray.wrap); it must be the very Value wrap builds, and decode back to the frame."""
    from ptychostream.ntndarray import Frame, _wrapped, from_value, to_value

    rng = np.random.default_rng(3)
    cases = [(rng.random((16, 24)).astype(np.float32),
              {"PosX": np.float64(1e-6), "PosY": 2e-6, "ModelName": "m", "ModelVersion": 3}),
             (rng.integers(0, 60000, (8, 8)).astype(np.uint16), {}),
             (np.zeros((0, 0), np.uint32), {"ColorMode": 0}),
             (rng.random((3, 4, 5)), {"Tag": "colour"})]
    for data, attrs in cases:
        frame = Frame(data, 2**33 + 5, 1764672000.123456, attrs)
        value = to_value(frame)
        assert _plain(value.todict()) == _plain(_wrapped(frame, data).todict()), data.shape
        back = from_value(value)
        np.testing.assert_array_equal(back.data, data)
        assert back.unique_id == (2**33 + 5) & 0x7FFFFFFF
        assert abs(back.timestamp - frame.timestamp) < 1e-6
        assert {k: back.attributes[k] for k in attrs} == {k: attrs[k] for k in attrs}


def test_sim_detector_publishes_scan_with_attributes(epics_env, scan):
    from p4p.client.thread import Context

    from ptychostream.ioc.sim_detector import SimDetector

    pv = epics_env["prefix"] + "cam1:Image"
    got: list = []
    connected = threading.Event()

    def cb(v):
        connected.set()
        if v.raw["uniqueId"]:
            got.append((int(v.raw["uniqueId"]), dict(v.attrib), np.array(v)))

    det = SimDetector(pv, scan, rate=200.0, repeat=2, first_unique_id=10)
    with Context("pva") as ctx:
        sub = ctx.monitor(pv, cb, request="record[queueSize=100]")
        assert connected.wait(10), "the detector PV is served before the first frame"
        assert det.run() == 2 * scan.n_frames
        wait_for(lambda: len(got) == 2 * scan.n_frames, what="all frames")
        sub.close()
    det.close()
    assert [g[0] for g in got] == list(range(10, 10 + 2 * scan.n_frames))
    uid, attrs, data = got[scan.n_frames + 3]  # second pass, fourth frame
    assert attrs["PosX"] == pytest.approx(scan.positions_m[3, 0])
    assert attrs["PosY"] == pytest.approx(scan.positions_m[3, 1])
    assert attrs["PixelSize"] == pytest.approx(scan.object_pixel_size_m)
    assert data.dtype == np.uint32 and np.array_equal(data, scan.frames[3])


def test_sim_detector_cli(epics_env, scan, tmp_path):
    from p4p.client.thread import Context

    from ptychostream.scanfile import write_scan

    path = write_scan(tmp_path / "scan.h5", scan)
    pv = epics_env["prefix"] + "cli:Image"
    help_out = subprocess.run([sys.executable, "-m", "ptychostream.ioc.sim_detector", "--help"],
                              capture_output=True, text=True, timeout=60)
    assert help_out.returncode == 0 and "--scan-file" in help_out.stdout
    got: list = []
    with Context("pva") as ctx:
        sub = ctx.monitor(pv, lambda v: None if isinstance(v, Exception) or not v.raw["uniqueId"]
                          else got.append(int(v.raw["uniqueId"])),
                          request="record[queueSize=100]", notify_disconnect=True)
        proc = subprocess.run(
            [sys.executable, "-m", "ptychostream.ioc.sim_detector", "--pv", pv, "--scan-file",
             str(path), "--rate", "100", "--start-delay", "3", "--log-level", "WARNING"],
            env=dict(os.environ), timeout=120, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        sub.close()
    assert got == list(range(1, scan.n_frames + 1))


def test_pvapy_ad_sim_server_feeds_the_ioc(epics_env, scan, tmp_path):
    """pvapy's areaDetector simulator streams a scan file; the IOC infers every frame."""
    from ptychostream.ioc import client
    from ptychostream.ioc.server import EdgeIOC
    from ptychostream.scanfile import write_scan

    path = write_scan(tmp_path / "scan.h5", scan, compression=None)
    p = epics_env["prefix"]
    n = scan.n_frames
    with EdgeIOC(p, input_pv=p + "pvapy:Image", batch_size=4) as ioc:
        client.deploy_model(p, onnx_model())
        # -nf > -cs: queue mode, the server publishes exactly n frames (uniqueId 1..n), then ends
        srv = subprocess.Popen(
            [str(BIN / "pvapy-ad-sim-server"), "-if", str(path), "-hds", "/entry/data/data",
             "-cn", p + "pvapy:Image", "-nf", str(n), "-cs", str(n // 2), "-fps", "50",
             "-std", "4", "-shd", "1", "-rt", "60", "-dc", "-rp", "0"],
            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for(ioc.input_connected.is_set, what="the IOC's monitor on the pvapy server")
            wait_for(lambda: ioc.nn.stats()["ArrayCounter_RBV"] >= n, 60, "n frames inferred")
        finally:
            srv.terminate()
            srv.wait(30)
        s = ioc.nn.stats()
        assert s["ArrayCounter_RBV"] == n and s["DroppedArrays_RBV"] == 0
        assert s["UniqueId_RBV"] == n
        # the phase of the last frame is that of the file's last frame; NN:Phase is posted from
        # a thread of its own, after the counters (seen in CI: read before the last post)
        wait_for(lambda: getattr(ioc.table.get("NN:Phase"), "unique_id", 0) == n, 10,
                 "NN:Phase to carry the last frame")
        last = ioc.table.get("NN:Phase")
        expected = ioc.inference.serving.engine.infer(scan.frames[n - 1][None])[0]
        np.testing.assert_allclose(last.data, expected, rtol=1e-5, atol=1e-5)


def test_sim_detector_cli_streams_a_given_route(epics_env, tmp_path):
    """--positions-file route.csv (um here): frames at exactly those positions, in order; a
    route in the wrong units is refused with one clear line."""
    from p4p.client.thread import Context

    route = np.array([[0.0, 0.0], [0.2, 0.0], [0.2, 0.2], [0.0, 0.2], [-0.2, 0.1]])  # um
    csv = tmp_path / "route.csv"
    np.savetxt(csv, route, delimiter=",", header="x_um,y_um", comments="")
    pv = epics_env["prefix"] + "route:Image"
    got: list = []
    with Context("pva") as ctx:
        sub = ctx.monitor(pv, lambda v: None if isinstance(v, Exception) or not v.raw["uniqueId"]
                          else got.append((int(v.raw["uniqueId"]), v.attrib["PosX"],
                                           v.attrib["PosY"])),
                          request="record[queueSize=100]", notify_disconnect=True)
        proc = subprocess.run(
            [sys.executable, "-m", "ptychostream.ioc.sim_detector", "--pv", pv,
             "--positions-file", str(csv), "--positions-units", "um", "--rate", "50",
             "--start-delay", "3", "--log-level", "WARNING"],
            env=dict(os.environ), timeout=120, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        wait_for(lambda: len(got) == len(route), 10, "the route's frames")
        sub.close()
    assert [g[0] for g in got] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([g[1:] for g in got], route * 1e-6, atol=1e-15)
    bad = subprocess.run(
        [sys.executable, "-m", "ptychostream.ioc.sim_detector", "--pv", pv, "--positions-file",
         str(csv), "--positions-units", "m", "--start-delay", "0"],
        env=dict(os.environ), timeout=120, capture_output=True, text=True)
    assert bad.returncode == 2 and "look like um" in bad.stderr
    assert "Traceback" not in bad.stderr
