"""Scale-out: the inference plugin under pvapy-hpc-consumer with two consumers sharing one stream
(pvDatabase distributor), the IOC stitching both outputs into one map equal to an offline stitch."""

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

import ptychostream.plugins.pvapy_adapter as adapter_module
from ptychostream.model import PtychoNN2, export_onnx
from ptychostream.stitch import stitch

BIN = Path(sys.executable).parent


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process and its children: pvapy-hpc-consumer -nc N forks N processes that outlive
    their parent when only the parent is signalled (each was started in its own session)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.1)


@pytest.mark.timeout(240)
def test_two_pvapy_consumers_feed_one_stitched_map(epics_env, tmp_path):
    from p4p.client.thread import Context

    from ptychostream.ioc import client
    from ptychostream.ioc.server import EdgeIOC
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    p = epics_env["prefix"]
    n = 16
    scan = simulate_scan(n_positions=n, step_m=150e-9, seed=5)
    scan_file = write_scan(tmp_path / "scan.h5", scan, compression=None)
    model = tmp_path / "model.onnx"
    torch.manual_seed(0)
    export_onnx(PtychoNN2(), model)
    env = dict(os.environ)
    log = open(tmp_path / "consumers.log", "w")
    consumers = subprocess.Popen(
        [str(BIN / "pvapy-hpc-consumer"), "-ic", p + "det:Image", "-nc", "2", "-du", "1",
         "-oc", p + "phase:*", "-sc", p + "status:*", "-pf", adapter_module.__file__,
         "-pc", "InferenceProcessor", "-rt", "180", "-dc", "-ll", "warning",
         "-pa", json.dumps({"modelFile": str(model), "batchSize": 4})],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    outputs = {1: {}, 2: {}}
    srv = None
    try:
        with Context("pva") as ctx:
            # both consumers are up when their status channels answer
            wait_for(lambda: not any(isinstance(v, Exception) for v in ctx.get(
                [p + "status:1", p + "status:2"], timeout=2, throw=False)), 120, "consumers")
            seen = []

            def collect(v, i):
                seen.append((i, v if isinstance(v, Exception) else int(v.raw["uniqueId"])))
                if not isinstance(v, Exception) and v.raw["uniqueId"]:
                    outputs[i][int(v.raw["uniqueId"])] = np.array(v)

            subs = [ctx.monitor(f"{p}phase:{i}", lambda v, i=i: collect(v, i),
                                request="record[queueSize=64]", notify_disconnect=True)
                    for i in (1, 2)]
            with EdgeIOC(p, stitch_inputs=[p + "phase:1", p + "phase:2"]) as ioc:
                # pvapy's simulator sends no PosX/PosY: positions come from the table, by uniqueId
                client.put_positions(p, scan.positions_m, unique_ids=np.arange(1, n + 1))
                client.put(p, "Stitch:PixelSize", scan.object_pixel_size_m * 1e9)  # nm
                client.put(p, "Stitch:UpdatePeriod", 0.2)
                client.put(p, "Stitch:RegisterOffsets", 0)  # exact: independent of batching
                srv = subprocess.Popen(
                    [str(BIN / "pvapy-ad-sim-server"), "-if", str(scan_file), "-hds",
                     "/entry/data/data", "-cn", p + "det:Image", "-nf", str(n), "-cs", str(n // 2),
                     "-fps", "40", "-std", "5", "-shd", "1", "-rt", "60", "-dc", "-rp", "0"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                wait_for(lambda: ioc.stitching.n_frames == n, 90, "all frames stitched")
                wait_for(lambda: client.get(p, "Stitch:NumFrames_RBV") == n, 10, "NumFrames")
                wait_for(lambda: client.get_stitched(p).attrib.get("NumFrames") == n, 10, "map")
                live = client.get_stitched(p)
            for s in subs:
                s.close()
    finally:
        for proc in (srv, consumers):
            if proc is not None:
                stop_group(proc)
        log.close()
    both = {**outputs[1], **outputs[2]}
    assert sorted(both) == list(range(1, n + 1)), seen  # each frame once, none lost
    assert outputs[1] and outputs[2], "each consumer took part of the stream"
    assert not set(outputs[1]) & set(outputs[2]), "no frame was processed twice"
    phases = np.stack([both[u] for u in range(1, n + 1)])
    offline, origin = stitch(phases, scan.positions_m, scan.object_pixel_size_m,
                             weighting="probe")
    assert client.stitched_geometry(live)[0] == pytest.approx(origin)
    np.testing.assert_allclose(np.asarray(live), offline, rtol=1e-6, atol=1e-6, equal_nan=True)
