#!/usr/bin/env python
"""The live map an operator sees, by detector rate: a scan file streamed into a real
``ptychostream-ioc`` (its own process, as a beamline runs it) at each rate, the map's figures
against the scan's truth when the last frame is placed and once the idle passes have settled
(Stitch:MaxPasses), beside the flat map's.

    python benchmarks/bench_live_map.py --scan demo-output/scans/test.h5 \
        --probe demo-output/work/train-4.recon.h5 \
        --model demo-output/work/model-train-4/model.onnx --rates 2 5 60 --json live.json
    python benchmarks/bench_live_map.py --scan demo-output/scans/test.h5 \
        demo-output/scans/sparse.h5 --probe ... --model ... --rates 60 --repeats 3   # the demo's

A slow detector leaves time for every idle pass between two frames; a fast one for none until
the scan ends (refine.LIVE_MAX_PASSES says why the passes wait for the stream to pause).
Figures over the illuminated area (ptychostream.metrics): SSIM / correlation / MAE (rad).
EPICS stays on loopback, on ports of its own (bench_pipeline.isolate), for this process and the
IOC it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_pipeline import isolate

from ptychostream import setup_logging

log = logging.getLogger("bench_live_map")
PREFIX = "LIVEMAP:"


def map_figures_now(scan) -> dict:
    """The IOC's Stitch:Image against the scan's truth."""
    from ptychostream.geometry import place_on_grid
    from ptychostream.ioc import client
    from ptychostream.metrics import illuminated_mask, map_figures

    image = client.get_stitched(PREFIX)
    origin, pixel = client.stitched_geometry(image)
    est = place_on_grid(np.asarray(image), origin, pixel, scan.truth_phase.shape,
                        scan.truth_origin_m)
    mask = illuminated_mask(scan.positions_m, scan.truth_phase.shape, scan.truth_origin_m,
                            scan.object_pixel_size_m, scan.beam_fwhm_m)
    fig = map_figures(est, scan.truth_phase, mask)
    return {k: fig[k] for k in ("ssim", "corr", "mae")}


def stream_once(det, scan, rate: float, first_uid: int, settle_timeout: float) -> dict:
    """Stream the scan at ``rate`` into a fresh IOC, score its map at the end and once settled.
    uniqueIds run on from the run before (a stream's do)."""
    from ptychostream.ioc import client

    det.scan, det.rate, det.first_unique_id, det.repeat = scan, rate, first_uid, 1
    t0 = time.perf_counter()
    det.run()
    t_sent = time.perf_counter()
    deadline = time.time() + settle_timeout
    while client.get(PREFIX, "Stitch:NumFrames_RBV") < scan.n_frames:
        if time.time() > deadline:
            raise RuntimeError("the IOC did not place every frame")
        time.sleep(0.05)
    time.sleep(0.3)  # Stitch:UpdatePeriod 0.2 s: the map after the last frame is posted
    end = {"passes": float(client.get(PREFIX, "Stitch:Passes_RBV")), **map_figures_now(scan)}
    max_passes = float(client.get(PREFIX, "Stitch:MaxPasses"))
    while client.get(PREFIX, "Stitch:Passes_RBV") < max_passes - 0.1 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    settled = {"passes": float(client.get(PREFIX, "Stitch:Passes_RBV")),
               "seconds_after_scan": time.perf_counter() - t_sent, **map_figures_now(scan)}
    return {"rate_hz": rate, "scan_s": t_sent - t0, "scan_end": end, "settled": settled}


def start_ioc(cmd: list[str], tmp: Path, model: bool) -> subprocess.Popen:
    """``ptychostream-ioc`` in its own process, once it serves (its model loaded) and its input
    monitor is connected."""
    from ptychostream.ioc import client

    logfile = open(tmp / "ioc.log", "w")
    ioc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=tmp,
                           env=dict(os.environ))
    deadline = time.time() + 120
    while True:
        try:
            if (client.get(PREFIX, "NN:ModelVersion_RBV", timeout=2) >= model
                    and client.get(PREFIX, "NN:InputConnected_RBV", timeout=2)):
                break
        except Exception:  # not up yet
            pass
        if time.time() > deadline or ioc.poll() is not None:
            ioc.kill()
            raise SystemExit(f"the IOC did not come up:\n{(tmp / 'ioc.log').read_text()}")
        time.sleep(0.5)
    client.put(PREFIX, "Stitch:UpdatePeriod", 0.2)
    return ioc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", required=True, nargs="+",
                    help="scan files with truth (e.g. the demo's); several stream in this order "
                         "into one IOC, the map reset between them, as a beamline's scans do")
    ap.add_argument("--probe", required=True, help="the IOC's --probe (e.g. an earlier scan's "
                                                   "reconstruction)")
    ap.add_argument("--model", help="the IOC's --model-file (seeds the map); none: no network")
    ap.add_argument("--rates", nargs="+", type=float, default=[2.0, 5.0, 60.0],
                    help="detector frame rates (Hz)")
    ap.add_argument("--repeats", type=int, default=1, help="runs at each rate (a fresh IOC each)")
    ap.add_argument("--settle-timeout", type=float, default=180.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    isolate()  # before p4p is imported
    setup_logging()
    from ptychostream.ioc import client
    from ptychostream.ioc.sim_detector import SimDetector
    from ptychostream.metrics import flat_baseline, illuminated_mask
    from ptychostream.scanfile import read_scan

    scans, flats = [], {}
    for path in args.scan:
        scan = read_scan(path)
        if scan.truth_phase is None:
            raise SystemExit(f"{path} holds no truth to score against")
        mask = illuminated_mask(scan.positions_m, scan.truth_phase.shape, scan.truth_origin_m,
                                scan.object_pixel_size_m, scan.beam_fwhm_m)
        flats[path] = {k: v for k, v in flat_baseline(scan.truth_phase, mask).items()
                       if k in ("ssim", "corr", "mae")}
        scans.append((path, scan))
    ioc_cli = Path(sys.executable).with_name("ptychostream-ioc")
    cmd = [str(ioc_cli), "--loopback", "--prefix", PREFIX, "--input", PREFIX + "det:Image",
           "--probe", args.probe, *(["--model-file", args.model] if args.model else [])]
    rows = []
    det = SimDetector(PREFIX + "det:Image", scans[0][1])  # served before the IOC looks for it
    try:
        uid = 1
        for rate in args.rates:
            for repeat in range(args.repeats):
                # a fresh IOC each run: the probe it learns stays with a map reset
                with tempfile.TemporaryDirectory(prefix="bench-live-map-") as tmp:
                    ioc = start_ioc(cmd, Path(tmp), bool(args.model))
                    try:
                        for k, (path, scan) in enumerate(scans):
                            if k:
                                client.put(PREFIX, "Stitch:Reset", 1)
                            row = stream_once(det, scan, rate, uid, args.settle_timeout)
                            rows.append({"scan": path, "repeat": repeat, **row})
                            uid += scan.n_frames
                            log.info("%s at %g Hz: %s", path, rate, rows[-1])
                    finally:
                        ioc.terminate()
                        ioc.wait(30)
    finally:
        det.publisher.close()
    print(f"\nlive map in ptychostream-ioc, probe {args.probe}, model {args.model or 'none'}; "
          "SSIM / corr / MAE (rad) over the illuminated area")
    print(f"{'scan':<28} {'rate Hz':>7} {'scan s':>7} {'passes':>6} {'when the scan ends':>26} "
          f"{'passes':>6} {'settled':>26} {'s after':>7}")
    for r in rows:
        e, s = r["scan_end"], r["settled"]
        print(f"{Path(r['scan']).name:<28} {r['rate_hz']:>7g} {r['scan_s']:>7.1f} "
              f"{e['passes']:>6.1f} {e['ssim']:>8.3f} / {e['corr']:.4f} / {e['mae']:.4f} "
              f"{s['passes']:>6.1f} {s['ssim']:>8.3f} / {s['corr']:.4f} / {s['mae']:.4f} "
              f"{s['seconds_after_scan']:>7.1f}")
    for path, f in flats.items():
        print(f"{Path(path).name + ', flat map':<28} {'':>7} {'':>7} {'':>6} {f['ssim']:>8.3f} / "
              f"{f['corr']:.4f} / {f['mae']:.4f}")
    out = {"scans": args.scan, "probe": args.probe, "model": args.model, "rows": rows,
           "flat": flats}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
