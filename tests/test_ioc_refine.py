"""The live map through the real IOC with no model: a probe is enough to show the sample.

A letters scan at overlap 0.9 is published frame by frame (p4p, loopback) into an EdgeIOC started
with the scan's probe; Stitch:Image (read back over pvAccess) correlates with the truth. A bad
probe write is refused with a reason and the old probe keeps refining.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from ptychostream.geometry import place_on_grid
from ptychostream.refine import DEFAULT_MAX_PASSES


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value is not None and value is not False and (isinstance(value, np.ndarray)
                                                         or value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def letters():
    from ptychostream.simulation import simulate_scan

    return simulate_scan(n_positions=150, step_m=50e-9, seed=4242, sample_kind="test")


def correlation(image, scan) -> float:
    from ptychostream.ioc.client import stitched_geometry
    from ptychostream.metrics import illuminated_mask

    origin, pixel = stitched_geometry(image)
    est = place_on_grid(np.asarray(image), origin, pixel, scan.truth_phase.shape,
                        scan.truth_origin_m)
    mask = illuminated_mask(scan.positions_m, scan.truth_phase.shape, scan.truth_origin_m,
                            scan.object_pixel_size_m, scan.beam_fwhm_m) & np.isfinite(est)
    return float(np.corrcoef(est[mask], scan.truth_phase[mask])[0, 1])


def test_probe_and_no_model_shows_the_sample(epics_env, letters, tmp_path):
    from p4p.client.thread import RemoteError

    from ptychostream.ioc import client
    from ptychostream.ioc.server import EdgeIOC
    from ptychostream.ioc.sim_detector import FramePublisher
    from ptychostream.scanfile import write_scan

    s = letters
    p = epics_env["prefix"]
    scan_file = write_scan(tmp_path / "scan.h5", s)  # ptychostream-ioc --probe scan.h5
    with EdgeIOC(p, input_pv=p + "det:Image", probe=str(scan_file),
                 map_dir=tmp_path / "maps") as ioc, FramePublisher(p + "det:Image") as pub:
        ioc.wait_model()
        assert "scan file" in client.get(p, "Stitch:ProbeStatus_RBV")
        assert client.get(p, "NN:ModelVersion_RBV") == 0
        client.put(p, "Stitch:UpdatePeriod", 0.2)
        assert client.get(p, "Stitch:MaxPasses") == ioc.stitching.max_passes == DEFAULT_MAX_PASSES
        client.put(p, "Stitch:MaxPasses", 2)  # idle re-visits stop at 2 frame updates a frame
        with pytest.raises(RemoteError, match="MaxPasses"):
            client.put(p, "Stitch:MaxPasses", 0)
        wait_for(ioc.input_connected.is_set, what="input monitor")
        for i in range(s.n_frames):
            pub.publish(s.frames[i], i + 1, {"PosX": s.positions_m[i, 0],
                                             "PosY": s.positions_m[i, 1],
                                             "PixelSize": s.object_pixel_size_m})
        wait_for(lambda: client.get(p, "Stitch:NumFrames_RBV") == s.n_frames, what="map")
        # a burst this fast puts the map stage behind: it seeds and keeps frames, and refines
        # them once the stream leaves time; Passes_RBV says when every frame has had its update
        wait_for(lambda: client.get(p, "Stitch:Passes_RBV") >= 1.0, what="every frame refined")
        image = wait_for(lambda: (lambda im: im if im.attrib.get("NumFrames") == s.n_frames
                                  and im.attrib.get("Passes", 0) >= 1.0 else None)(
            client.get_stitched(p)), what="final map")
        assert image.attrib["Refined"] == 1
        assert correlation(image, s) >= 0.95
        amplitude = client.get(p, "Stitch:Amplitude")
        assert amplitude.shape == image.shape
        assert client.get(p, "Stitch:Passes_RBV") >= 1.0
        wait_for(lambda: ioc.stitching.passes >= 2.0, what="two passes")
        time.sleep(0.5)  # idle, but no further pass
        assert ioc.stitching.max_passes == 2.0 and ioc.stitching.passes < 2.1
        # no model: the frames were passed on, not lost, and the map counted every one
        assert client.get(p, "NN:DroppedArrays_RBV") == 0
        assert client.get(p, "Stitch:DroppedArrays_RBV") == 0

        # a bad probe is refused with its reason; the old one keeps refining the map
        import io

        from ptychostream.refine import ProbeError

        buf = io.BytesIO()
        np.save(buf, np.full((128, 128), np.nan, np.complex64))
        with pytest.raises(ProbeError, match="non-finite"):
            client.deploy_probe(p, buf.getvalue(), name="nan-probe")
        status = client.get(p, "Stitch:ProbeStatus_RBV")
        assert status.startswith("Refused nan-probe") and status.severity == 2
        assert ioc.stitching.refining and "scan file" in ioc.stitching.probe_status()

        # the map (complex object, phase, amplitude) and the probe learnt are saved on request
        client.put(p, "Stitch:SaveFile", "letters")
        import h5py

        with h5py.File(tmp_path / "maps" / "letters.h5") as f:
            assert f["object"].dtype == np.complex64 and f["probe"].shape[-1] == 128
        with pytest.raises(RemoteError, match="file name"):
            client.put(p, "Stitch:SaveFile", "../escape")

        # reset clears the complex map too
        client.reset_stitch(p)
        wait_for(lambda: client.get(p, "Stitch:NumFrames_RBV") == 0, what="reset")
        assert ioc.stitching.image() is None
