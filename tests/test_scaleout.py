"""Scale-out as the README documents it: our simulated detector, two inference consumers under
``pvapy-hpc-consumer`` sharing its stream through the data distributor, and the IOC gathering
their outputs (``--stitch-input``) into one map, each frame once, in uniqueId order; stopping
the consumer stops its children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ptychostream.geometry import place_on_grid
from ptychostream.model import PtychoNN2, export_onnx
from ptychostream.stitch import stitch

BIN = Path(sys.executable).parent
PROCESSOR = "ptychostream.plugins.pvapy_adapter.InferenceProcessor"


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def consumer_command(prefix: str, model: Path, n: int = 2, *extra: str) -> list[str]:
    """The README's command (channel names under this test's prefix), plus ``extra``."""
    return [str(BIN / "pvapy-hpc-consumer"), "--input-channel", prefix + "det:Image",
            "--n-consumers", str(n), "--distributor-updates", "1",
            "--output-channel", prefix + "phase:*", "--processor-class", PROCESSOR,
            "--processor-args", json.dumps({"modelFile": str(model), "batchSize": 8,
                                            "engine": "onnxruntime"}), *extra]


def default_sigint() -> None:
    """A test run started in the background by a non-interactive shell (CI, ``nohup ... &``)
    has SIGINT ignored, and ignored signals are inherited: the consumer would then never see
    the Ctrl-C this test sends it. Give it the terminal's default, as an interactive user has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(c) for c in out.split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def kill_group(proc: subprocess.Popen) -> None:
    """Clean-up only (the tests signal the parent alone): whatever is left in the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def status(ctx, prefix: str, i: int) -> dict | None:
    v = ctx.get(f"{prefix}status:{i}", timeout=2, throw=False)
    return None if isinstance(v, Exception) else v.todict()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    torch.manual_seed(0)
    export_onnx(PtychoNN2(), path)
    return path


@pytest.mark.timeout(300)
def test_documented_scale_out_with_our_detector(epics_env, tmp_path, model):
    from p4p.client.thread import Context

    from ptychostream.ioc import client
    from ptychostream.ioc.server import EdgeIOC
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    p = epics_env["prefix"]
    n = 24
    scan = simulate_scan(n_positions=n, step_m=100e-9, seed=5)
    scan_file = write_scan(tmp_path / "scan.h5", scan, compression=None)
    env = dict(os.environ)
    log = open(tmp_path / "consumers.log", "w")
    # -sc/-rp: status channels, refreshed every second, to see the consumers connect; -dc: no
    # curses in a log file
    consumers = subprocess.Popen(
        consumer_command(p, model, 2, "--status-channel", p + "status:*", "--report-period", "1",
                         "--disable-curses", "--log-level", "warning", "--runtime", "280"),
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=default_sigint)
    det = None
    outputs: dict[int, dict[int, tuple]] = {1: {}, 2: {}}
    released: list[np.ndarray] = []
    try:
        with Context("pva", nt=False) as ctx:
            wait_for(lambda: all(status(ctx, p, i) for i in (1, 2)), 150, "both consumers")
            kids = children(consumers.pid)
            assert len(kids) == 2, kids

            def collect(v, i):
                if not isinstance(v, Exception) and v["uniqueId"]:
                    dims = [d["size"] for d in v["dimension"]]
                    attrs = {a["name"]: a["value"] for a in v["attribute"]}
                    outputs[i][int(v["uniqueId"])] = (
                        np.asarray(v["value"]).reshape(dims[1], dims[0]).copy(), attrs)

            subs = [ctx.monitor(f"{p}phase:{i}", lambda v, i=i: collect(v, i),
                                request="record[queueSize=64]") for i in (1, 2)]
            with EdgeIOC(p, stitch_inputs=[p + "phase:1", p + "phase:2"]) as ioc:
                sink = ioc.gather.sink  # what the gather hands the map stage, in that order
                ioc.gather.sink = lambda b: (released.append(b.unique_ids.copy()), sink(b))
                client.put(p, "Stitch:UpdatePeriod", 0.2)
                client.put(p, "Stitch:RegisterOffsets", 0)  # exact: independent of batching
                t0 = time.monotonic()
                det = subprocess.Popen(
                    [str(BIN / "ptychostream-sim-detector"), "--pv", p + "det:Image",
                     "--scan-file", str(scan_file), "--rate", "20", "--start-delay", "8",
                     "--loopback", "--log-level", "WARNING"],
                    env=env, stdout=log, stderr=subprocess.STDOUT)
                # each consumer holds the detector's first value (the empty array) before any
                # frame is sent: the distributor then shares every frame between them
                wait_for(lambda: all((status(ctx, p, i) or {}).get("receiverStats", {})
                                     .get("nReceived", 0) >= 1 for i in (1, 2)), 60,
                         "both consumers connected to the detector")
                assert time.monotonic() - t0 < 8, "connected after the first frame was sent"
                wait_for(lambda: ioc.stitching.n_frames >= n, 120, "all frames stitched")
                assert det.wait(30) == 0
                time.sleep(0.5)  # anything more (a duplicate) would arrive now
                wait_for(lambda: client.get(p, "Stitch:NumFrames_RBV") == n, 10, "NumFrames")
                wait_for(lambda: client.get_stitched(p).attrib.get("NumFrames") == n, 10,
                         "the map")
                live = client.get_stitched(p)
                gathered = ioc.gather.stats()
                stitch_stats = ioc.stitch.stats()
            for s in subs:
                s.close()

        # stopping the consumer (SIGINT to the parent, as Ctrl-C) stops its children
        consumers.send_signal(signal.SIGINT)
        wait_for(lambda: not any(alive(k) for k in kids), 60, "the consumers' children to end")
        assert consumers.wait(30) == 0
    finally:
        for proc in (det, consumers):
            if proc is not None:
                kill_group(proc)
        log.close()

    both = {**outputs[1], **outputs[2]}
    assert sorted(both) == list(range(1, n + 1)), "every frame inferred, none lost"
    assert outputs[1] and outputs[2], "each consumer took part of the stream"
    # pvapy's distributor shares the frames between the consumers; once in four runs here it
    # handed some to both (one consumer got 22 of 24): the gather must then stitch each frame
    # once and count the copies, which is ours to get right
    twice = set(outputs[1]) & set(outputs[2])
    for uid, (_, attrs) in both.items():  # the outputs keep the detector's attributes
        assert attrs["PosX"] == pytest.approx(scan.positions_m[uid - 1, 0])
        assert attrs["PosY"] == pytest.approx(scan.positions_m[uid - 1, 1])
        assert attrs["PixelSize"] == pytest.approx(scan.object_pixel_size_m)
        assert attrs["ModelVersion"] == 1
    # the map stage got each frame once, in uniqueId order
    assert np.concatenate(released).tolist() == list(range(1, n + 1))
    assert gathered["duplicates"] == len(twice), (gathered, sorted(twice))
    assert gathered["gaps"] == gathered["late"] == 0, gathered
    assert stitch_stats["DroppedArrays_RBV"] == 0 and stitch_stats["ArrayCounter_RBV"] == n
    # placed by the PosX/PosY the outputs carry (no Stitch:Positions table was written)
    phases = np.stack([both[u][0] for u in range(1, n + 1)])
    offline, origin = stitch(phases, scan.positions_m, scan.object_pixel_size_m,
                             weighting="probe")
    # the live map grew as the frames came (no plan), the offline one was sized for the scan:
    # the same map on the same lattice, whatever its bounds
    live_origin, live_pixel = client.stitched_geometry(live)
    assert live_pixel == pytest.approx(scan.object_pixel_size_m)
    on_grid = place_on_grid(np.asarray(live), live_origin, live_pixel, offline.shape, origin)
    np.testing.assert_allclose(on_grid, offline, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_consumers_children_end_with_their_parent(epics_env, model, tmp_path, sig):
    """SIGTERM (or SIGKILL) ends pvapy-hpc-consumer without its stop command: the children,
    told by the kernel, finish what they hold and exit instead of serving on as orphans."""
    from p4p.client.thread import Context

    p = epics_env["prefix"]
    with open(tmp_path / "consumers.log", "w") as log:
        consumers = subprocess.Popen(
            consumer_command(p, model, 2, "--status-channel", p + "status:*",
                             "--disable-curses", "--log-level", "warning", "--runtime", "180"),
            env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            with Context("pva", nt=False) as ctx:
                wait_for(lambda: all(status(ctx, p, i) for i in (1, 2)), 150, "both consumers")
            kids = children(consumers.pid)
            assert len(kids) == 2, kids
            os.kill(consumers.pid, sig)  # the parent alone
            assert consumers.wait(30) == -sig
            wait_for(lambda: not any(alive(k) for k in kids), 30, "the orphaned children to end")
        finally:
            kill_group(consumers)
    assert "parent) has gone" in (tmp_path / "consumers.log").read_text()


@pytest.mark.timeout(120)
def test_the_ioc_gathers_out_of_order_phases_by_unique_id(epics_env):
    """Two workers' outputs arrive interleaved, out of order, one twice: the map stage gets
    each image once in uniqueId order, so planned positions matched by order place them right
    and the map equals an offline stitch."""
    from ptychostream.ioc import client
    from ptychostream.ioc.server import EdgeIOC
    from ptychostream.ioc.sim_detector import FramePublisher
    from ptychostream.simulation import simulate_scan

    p = epics_env["prefix"]
    scan = simulate_scan(n_positions=16, step_m=150e-9, seed=2)
    n = scan.n_frames
    rng = np.random.default_rng(0)
    phases = rng.uniform(-1, 1, (n, 128, 128)).astype(np.float32)
    pix = scan.object_pixel_size_m
    w1, w2 = FramePublisher(p + "w:1"), FramePublisher(p + "w:2")
    released: list[np.ndarray] = []
    try:
        with EdgeIOC(p, stitch_inputs=[p + "w:1", p + "w:2"], stitch_pixel_m=pix) as ioc:
            sink = ioc.gather.sink
            ioc.gather.sink = lambda b: (released.append(b.unique_ids.copy()), sink(b))
            client.put(p, "Stitch:RegisterOffsets", 0)
            client.put(p, "Stitch:UpdatePeriod", 0.2)
            client.put_positions(p, scan.positions_m)  # no uniqueIds: matched by arrival order
            assert w1.wait_for_subscriber(20) and w2.wait_for_subscriber(20)
            time.sleep(0.5)
            # worker 2 is ahead: 2, 4 arrive before 1; 5 comes twice; no PosX/PosY attributes
            order = [(w2, 2), (w2, 4), (w1, 1), (w1, 3), (w1, 5), (w1, 5), (w2, 6)]
            order += [(w1 if u % 2 else w2, u) for u in range(7, n + 1)]
            for pub, uid in order:  # a duplicate is the same image: same uniqueId and time
                pub.publish(phases[uid - 1], uid, {"ModelVersion": 1, "ModelName": "m"},
                            timestamp=1.7e9 + uid)
                time.sleep(0.005)
            wait_for(lambda: ioc.stitching.n_frames >= n, 60, "all phases stitched")
            wait_for(lambda: client.get_stitched(p).attrib.get("NumFrames") == n, 10, "map")
            live = client.get_stitched(p)
            g, s = ioc.gather.stats(), ioc.stitch.stats()
    finally:
        w1.close()
        w2.close()
    assert np.concatenate(released).tolist() == list(range(1, n + 1))
    assert (g["duplicates"], g["gaps"], g["late"]) == (1, 0, 0)
    assert s["ArrayCounter_RBV"] == n and s["DroppedArrays_RBV"] == 1  # the duplicate
    offline, _ = stitch(phases, scan.positions_m, pix, weighting="probe")
    np.testing.assert_allclose(np.asarray(live), offline, rtol=1e-6, atol=1e-6, equal_nan=True)
