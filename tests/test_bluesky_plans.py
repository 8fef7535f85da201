"""Bluesky plans and ophyd devices: summarize_plan, check_limits, a real RunEngine, real p4p."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from bluesky.simulators import check_limits, summarize_plan
from ophyd.utils import LimitError

from ptychostream.bluesky_plans.devices import (
    EdgeIOC,
    EpicsSpiralStage,
    SimPtychoDetector,
    SimSpiralStage,
)
from ptychostream.bluesky_plans.plans import resolve_step, spiral_path, spiral_ptycho_scan
from ptychostream.pvnames import PVS
from ptychostream.scanfile import read_scan
from ptychostream.simulation import overlap_ratio


@pytest.fixture
def devices(epics_env, tmp_path):
    stage = SimSpiralStage(name="stage", limits=(-3e-6, 3e-6))
    det = SimPtychoDetector(name="det", stage=stage, pv_name=epics_env["prefix"] + "det:Image",
                            write_dir=tmp_path, field_of_view_m=1.5e-6)
    yield stage, det
    det.close()


def test_resolve_step_and_bad_requests():
    assert resolve_step(step=100e-9) == pytest.approx(100e-9)
    assert overlap_ratio(resolve_step(overlap=0.6), 800e-9) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="not both"):
        resolve_step(step=50e-9, overlap=0.9)
    with pytest.raises(ValueError, match="overlap"):
        resolve_step(overlap=1.0)
    with pytest.raises(ValueError, match="step"):
        resolve_step(step=-1e-9)
    with pytest.raises(ValueError, match="n_points"):
        spiral_path(0, 50e-9)
    stage = SimSpiralStage(name="stage")
    with pytest.raises(ValueError, match="field_of_view_m"):
        SimPtychoDetector(stage=stage, pv_name="X:det", field_of_view_m=0.0)
    with pytest.raises(TypeError, match="position_m"):
        SimPtychoDetector(stage=object(), pv_name="X:det")


def test_summarize_plan_shows_every_move_and_read(RE, devices, capsys):
    stage, det = devices
    summarize_plan(spiral_ptycho_scan(det, stage, n_points=7, overlap=0.5, exposure=0.01,
                                      scan_name="s1"))
    out = capsys.readouterr().out
    assert out.count("Read ['stage', 'det']") == 7
    assert out.count("stage_x -> ") == 7 and out.count("stage_y -> ") == 7
    assert "det_acquire_time -> 0.01" in out and "s1.h5" in out


def test_summarize_plan_with_ioc_resets_the_map_first(RE, devices, epics_env, capsys):
    stage, det = devices
    ioc = EdgeIOC(epics_env["prefix"], name="ioc")
    summarize_plan(spiral_ptycho_scan(det, stage, n_points=5, step=100e-9, ioc=ioc))
    out = capsys.readouterr().out
    assert out.index("ioc_stitch_positions -> <5 planned positions>") < out.index("Open Run")
    assert out.index("ioc_stitch_reset -> 1") < out.index("Open Run")
    assert out.count("Read ['ioc']") == 2  # baseline at start and end


def test_check_limits(RE, devices):
    stage, det = devices
    check_limits(spiral_ptycho_scan(det, stage, n_points=50, step=100e-9, exposure=0.01))
    # a 400-point spiral at 300 nm reaches ~3.5 um from the centre: beyond the +-3 um stage
    with pytest.raises(LimitError, match="outside the limits"):
        check_limits(spiral_ptycho_scan(det, stage, n_points=400, step=300e-9))
    with pytest.raises(LimitError):
        check_limits(spiral_ptycho_scan(det, stage, n_points=5, step=100e-9, center=(2.95e-6, 0.0)))
    with pytest.raises(ValueError, match="exposure"):
        check_limits(spiral_ptycho_scan(det, stage, n_points=5, exposure=0.0))


def test_ioc_device_names_come_from_the_pv_table(epics_env):
    prefix = epics_env["prefix"]
    ioc = EdgeIOC(prefix, name="ioc")
    assert ioc.nn.model_version.pvname == prefix + "NN:ModelVersion_RBV"
    assert ioc.nn.array_counter.setpoint_pvname == prefix + "NN:ArrayCounter"
    assert ioc.qa.ssim.pvname == prefix + "QA:SSIM"
    served = {prefix + s for s, spec in PVS.items() if spec.ca}
    used = set()
    for walk in ioc.walk_signals():
        sig = walk.item
        for attr in ("pvname", "setpoint_pvname"):
            if getattr(sig, attr, None):
                used.add(getattr(sig, attr))
    assert used == served  # every CA scalar of the table, and nothing else


def test_real_motors_swap_in_by_pv_name():
    stage = EpicsSpiralStage("XF:m1", "XF:m2", name="stage")
    assert stage.x.user_readback.pvname == "XF:m1.RBV"
    assert stage.y.user_setpoint.pvname == "XF:m2.VAL"
    assert stage.x.name == "stage_x"


def test_spiral_scan_under_runengine_publishes_frames_and_writes_the_file(RE, devices, epics_env):
    from p4p.client.thread import Context

    stage, det = devices
    n = 12
    docs: dict[str, list] = {}
    RE.subscribe(lambda name, doc: docs.setdefault(name, []).append(doc))
    received: list = []
    got_all = threading.Event()

    def on_frame(value):
        if isinstance(value, Exception) or not value.raw["uniqueId"]:
            return  # disconnect, or the empty array the PV opens with
        received.append((int(value.raw["uniqueId"]), dict(value.attrib)))
        if len(received) >= n:
            got_all.set()

    with Context("pva") as ctx:
        det.open()  # serve the PV before the scan, so the monitor connects first
        sub = ctx.monitor(det.pv_name.get(), on_frame, notify_disconnect=True)
        try:
            (uid,) = RE(spiral_ptycho_scan(det, stage, n_points=n, overlap=0.6, exposure=0.05,
                                           scan_name="t1"))
            assert got_all.wait(10), f"monitor saw {len(received)} of {n} frames"
        finally:
            sub.close()

    start = docs["start"][0]
    assert start["uid"] == uid and start["plan_name"] == "spiral_ptycho_scan"
    assert start["overlap"] == pytest.approx(0.6) and start["num_points"] == n
    events = docs["event"]
    assert len(events) == n and docs["stop"][0]["exit_status"] == "success"
    # the stage reads in um (as a piezo stage does), with units and precision in the descriptor
    desc = docs["descriptor"][0]["data_keys"]
    assert desc["stage_x"]["units"] == "um" and desc["stage_x"]["precision"] == 3
    xy = np.array([[e["data"]["stage_x"], e["data"]["stage_y"]] for e in events]) * 1e-6
    np.testing.assert_allclose(xy, spiral_path(n, resolve_step(overlap=0.6)), atol=1e-12)
    np.testing.assert_allclose(xy, [[e["data"]["det_pos_x"], e["data"]["det_pos_y"]]
                                    for e in events])
    uids = [e["data"]["det_unique_id"] for e in events]
    assert uids == sorted(uids) and len(set(uids)) == n

    # the frames went out over pvAccess with their positions
    by_uid = dict(received)
    for e in events:
        attrs = by_uid[e["data"]["det_unique_id"]]
        assert attrs["PosX"] == pytest.approx(e["data"]["stage_x"] * 1e-6)
        assert attrs["PosY"] == pytest.approx(e["data"]["stage_y"] * 1e-6)

    # ... and into the scan file, which reconstruction reads
    scan = read_scan(start["scan_file"])
    assert scan.n_frames == n and scan.scan_id == "t1"
    np.testing.assert_allclose(scan.positions_m, xy)
    assert scan.exposure_s == pytest.approx(0.05)
    assert list(scan.unique_ids) == uids
    assert scan.truth_crops.shape == (n, 128, 128)
    counts = [e["data"]["det_total_counts"] for e in events]
    np.testing.assert_allclose(scan.frames.reshape(n, -1).sum(1), counts)
    # dose follows the exposure: flux * exposure photons per frame enter the sample; the W film
    # passes 73 % of the amplitude (53 % of the photons) where it stands, the ground all
    full = det.flux.get() * 0.05
    assert 0.5 * full <= np.mean(counts) <= 1.02 * full


# --------------------------------------------------------------------------- with the edge IOC
@pytest.fixture
def model_file(tmp_path_factory):
    """An (untrained) PtychoNN 2.0 as ONNX: the IOC serves it, the plan does not care."""
    import torch

    from ptychostream.model import PtychoNN2, export_onnx

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "untrained.onnx"
    export_onnx(PtychoNN2(), path)
    return path


@pytest.fixture
def edge_ioc(epics_env, devices, model_file):
    """The real edge IOC in-process, monitoring the simulated detector, with its CA mirror."""
    from ptychostream.ioc.server import EdgeIOC as EdgeIOCServer

    stage, det = devices
    det.open()
    server = EdgeIOCServer(prefix=epics_env["prefix"], input_pv=det.pv_name.get(),
                           model_file=model_file, ca_mirror=True, batch_size=4)
    server.start()
    assert server.wait_model(60) == 1
    ioc = EdgeIOC(epics_env["prefix"], name="ioc")
    ioc.wait_for_connection(timeout=10)
    yield ioc
    server.stop()


def test_spiral_scan_stitches_a_map_in_the_ioc(RE, devices, edge_ioc, epics_env):
    from ptychostream.bluesky_plans.live import LiveStitchedMap
    from ptychostream.ioc.client import get_stitched, stitched_geometry

    stage, det = devices
    ioc = edge_ioc
    docs: dict[str, list] = {}
    RE.subscribe(lambda name, doc: docs.setdefault(name, []).append(doc))
    live = LiveStitchedMap(ioc, period=0.2)
    RE.subscribe(live)
    n = 24
    RE(spiral_ptycho_scan(det, stage, n_points=n, step=60e-9, exposure=0.05, ioc=ioc,
                          scan_name="with-ioc"))
    streams = {d["uid"]: d["name"] for d in docs["descriptor"]}
    primary = [e for e in docs["event"] if streams[e["descriptor"]] == "primary"]
    assert len(primary) == n
    # the IOC's state is in the baseline stream, read over Channel Access
    baseline = [e for e in docs["event"] if streams[e["descriptor"]] == "baseline"]
    assert len(baseline) == 2
    assert baseline[0]["data"]["ioc_nn_model_version"] == 1
    assert baseline[1]["data"]["ioc_stitch_num_frames"] == n

    image = get_stitched(epics_env["prefix"])
    (x0, y0), pixel = stitched_geometry(image)
    assert image.attrib["NumFrames"] == n
    assert pixel == pytest.approx(det.pixel_m)
    # the map covers the whole scan: every beam position lands on a stitched pixel
    scan = read_scan(docs["start"][0]["scan_file"], frames=False)
    cols = np.round((scan.positions_m[:, 0] - x0) / pixel).astype(int)
    rows = np.round((scan.positions_m[:, 1] - y0) / pixel).astype(int)
    assert np.isfinite(np.asarray(image)[rows, cols]).all()
    # the live view showed the IOC's map, whole, at the end of the run
    assert live.frames == n
    np.testing.assert_array_equal(live.image, np.asarray(image))
    assert live.extent_m[0] == pytest.approx(x0 - pixel / 2)
    assert f"{n} frames stitched" in live.ax.get_title()


# --------------------------------------------------------------------------- routes, units, live view
def test_a_given_route_runs_and_a_route_in_the_wrong_units_is_refused(RE, devices):
    from ptychostream.bluesky_plans import ptycho_scan
    from ptychostream.scanfile import ScanUnitsError

    stage, det = devices
    docs: dict[str, list] = {}
    RE.subscribe(lambda name, doc: docs.setdefault(name, []).append(doc))
    gx, gy = np.meshgrid(np.arange(3) * 150e-9, np.arange(2) * 150e-9)
    route = np.stack([gx.ravel(), gy.ravel()], axis=1) - 100e-9  # a raster, in metres
    RE(ptycho_scan(det, stage, route, exposure=0.01, scan_name="raster"))
    events = docs["event"]
    xy = np.array([[e["data"]["stage_x"], e["data"]["stage_y"]] for e in events]) * 1e-6
    np.testing.assert_allclose(xy, route, atol=1e-12)
    start = docs["start"][0]
    assert start["num_points"] == 6 and start["step_m"] == pytest.approx(150e-9)
    # the live plot is the transmission map: counts over x and y, not the uniqueId
    assert [d[0] for d in start["hints"]["dimensions"]] == [["stage_x"], ["stage_y"]]
    hinted = docs["descriptor"][0]["hints"]["det"]["fields"]
    assert hinted == ["det_total_counts"]

    # the same route typed in um: refused before anything moves, naming the mistake
    with pytest.raises(ScanUnitsError, match=r"look like um") as err:
        RE(ptycho_scan(det, stage, route * 1e6 + 5.0))
    assert "pixels" in str(err.value)
    assert len(docs["start"]) == 1  # no run was opened


def test_headless_run_engine_skips_plots_and_keeps_the_table(devices, capsys):
    """The best-effort callback's plots on a non-GUI backend drew the figure at every event
    (a 50-point scan 1.7 s bare, 26 s with them); make_run_engine keeps only the table there."""
    import time

    import matplotlib
    from bluesky import RunEngine

    from ptychostream.bluesky_plans import make_run_engine

    stage, det = devices
    assert matplotlib.get_backend().lower() == "agg"  # headless test session
    det.open()
    bare = RunEngine({})
    t0 = time.perf_counter()
    bare(spiral_ptycho_scan(det, stage, n_points=30, step=60e-9, exposure=0.01))
    t_bare = time.perf_counter() - t0
    import matplotlib.pyplot as plt

    plt.close("all")
    RE = make_run_engine()
    t0 = time.perf_counter()
    RE(spiral_ptycho_scan(det, stage, n_points=30, step=60e-9, exposure=0.01))
    t_bec = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "det_total_counts" in out and out.count("|        30 |") == 1  # the table, 30 rows
    assert plt.get_fignums() == []  # no figure drawn where nobody sees it
    assert t_bec < 3 * t_bare + 1.0, (t_bare, t_bec)


def test_scan_waits_for_the_ioc_and_reports_what_it_got(RE, devices, epics_env, model_file):
    """The IOC starts before the detector serves its PV (it searches for it); the plan waits
    until the IOC receives the stream, so no first frame is missed, sends the planned positions
    with the frames' uniqueIds, and reports what the IOC got."""
    import time

    from p4p.client.thread import Context

    from ptychostream.ioc.server import EdgeIOC as EdgeIOCServer

    stage, det = devices
    prefix = epics_env["prefix"]
    server = EdgeIOCServer(prefix=prefix, input_pv=det.pv_name.get(), model_file=model_file,
                           ca_mirror=True, batch_size=4)
    server.start()
    try:
        assert server.wait_model(60) == 1
        ioc = EdgeIOC(prefix, name="ioc")
        ioc.wait_for_connection(timeout=10)
        time.sleep(1.0)  # the IOC's search for the (absent) detector PV backs off meanwhile
        assert not det.has_subscriber()
        docs: dict[str, list] = {}
        RE.subscribe(lambda name, doc: docs.setdefault(name, []).append(doc))
        n = 16
        t0 = time.perf_counter()
        RE(spiral_ptycho_scan(det, stage, n_points=n, step=60e-9, exposure=0.05, ioc=ioc,
                              scan_name="late-detector"))
        elapsed = time.perf_counter() - t0
        with Context("pva") as ctx:
            table = ctx.get(prefix + "Stitch:Positions", timeout=5)
    finally:
        server.stop()
    assert ioc.last_report["sent"] == n
    assert ioc.last_report["stitched"] == n, ioc.last_report
    assert ioc.last_report["dropped"] == 0 and ioc.last_report["missed"] == 0
    assert elapsed < 40, f"the scan waited {elapsed:.0f} s"
    primary = next(d["uid"] for d in docs["descriptor"] if d["name"] == "primary")
    uids = [e["data"]["det_unique_id"] for e in docs["event"] if e["descriptor"] == primary]
    assert list(table.value.uniqueId) == uids  # matched by uniqueId, not by arrival order


def test_frames_the_ioc_never_gets_are_reported_missed_without_a_long_wait(RE, devices,
                                                                             epics_env, caplog):
    """An IOC watching the wrong PV: the plan warns that the IOC is not receiving the stream,
    stops waiting once nothing moves (not after the whole timeout) and reports the frames
    missed. The detector knows when a client monitors it."""
    import time

    from p4p.client.thread import Context

    from ptychostream.ioc.server import EdgeIOC as EdgeIOCServer

    stage, det = devices
    prefix = epics_env["prefix"]
    det.open()
    assert not det.has_subscriber()
    with Context("pva") as ctx:
        sub = ctx.monitor(det.pv_name.get(), lambda v: None)
        deadline = time.monotonic() + 10
        while not det.has_subscriber() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert det.has_subscriber()
        sub.close()
    deadline = time.monotonic() + 10
    while det.has_subscriber() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not det.has_subscriber()

    with EdgeIOCServer(prefix=prefix, input_pv=prefix + "no:such:Image", ca_mirror=True):
        ioc = EdgeIOC(prefix, name="ioc")
        ioc.wait_for_connection(timeout=10)
        n = 8
        t0 = time.perf_counter()
        RE(spiral_ptycho_scan(det, stage, n_points=n, step=60e-9, exposure=0.01, ioc=ioc,
                              ioc_timeout=60.0, ioc_ready_timeout=2.0))
        elapsed = time.perf_counter() - t0
    assert ioc.last_report == {**ioc.last_report, "sent": n, "stitched": 0, "dropped": 0,
                               "missed": n}
    assert elapsed < 20, f"waited {elapsed:.0f} s for frames that never came"
    assert "not receiving" in caplog.text and "8 missed" in caplog.text
