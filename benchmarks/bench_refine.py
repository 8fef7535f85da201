#!/usr/bin/env python
"""Live refinement alone: frame-updates per second and accuracy against truth, by batch size
and device, on a simulated letters scan streamed in arrival order (ptychostream.refine).

    python benchmarks/bench_refine.py [--device cpu|cuda] [--batches 1 8 32 128] [--json out.json]
    python benchmarks/bench_refine.py --scan SCAN.h5 --probe RECON.h5 --passes 1 2 4 8 \
        --probe-steps 0 0.5 --move-ramp on off --seed-model MODEL.onnx
    python benchmarks/bench_refine.py --scan SCAN.h5 --probe RECON.h5 --seed-model MODEL.onnx \
        --batches --arrival-caps 2 4 8 32

A batch's frames update together (corrections from the same map, summed, applied once), so a
GPU can take big batches; this shows what that costs in accuracy. ``--passes`` adds accuracy
after further passes (the IOC's idle-time revisits) with the probe given (``--probe``: a file
:func:`ptychostream.refine.load_probe` reads, e.g. an earlier scan's reconstruction; default the
scan's true probe), for each ePIE probe step: how far the probe, not the frames, limits the map;
``--move-ramp on off`` with and without the learning probe taking the map's phase ramp,
``--seed-model`` with and without the network's phases blended in as the IOC does
(``--seed-model truth``: the true phase crops, a perfect network), ``--probe-starts`` with the
probe learning from that many frames on.
``--arrival-caps``: a slow detector, whose gaps leave time for every idle pass between two
frames, with the passes capped while frames arrive (refine.LIVE_MAX_PASSES) or not (32).
Figures are over the illuminated area (ptychostream.metrics), beside the flat map's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from ptychostream import setup_logging
from ptychostream.refine import DEFAULT_MAX_PASSES, DEFAULT_PROBE_STEP

log = logging.getLogger("bench_refine")


def score(r, scan) -> dict:
    """SSIM, correlation and MAE of refiner ``r``'s map against the scan's truth over the
    illuminated area (ptychostream.metrics), and the same once the plane fitted to map - truth
    (the ramp no diffraction pattern can tell) is removed."""
    from ptychostream.geometry import place_on_grid
    from ptychostream.metrics import illuminated_mask, map_figures, remove_ramp

    truth = scan.truth_phase
    est = place_on_grid(r.phase_image(), r.origin, scan.object_pixel_size_m, truth.shape,
                        scan.truth_origin_m)
    mask = illuminated_mask(scan.positions_m, truth.shape, scan.truth_origin_m,
                            scan.object_pixel_size_m, scan.beam_fwhm_m)
    fig = map_figures(est, truth, mask)
    flat_est, ramp = remove_ramp(est, truth, mask)
    deramped = map_figures(flat_est, truth, mask)
    return {**{k: fig[k] for k in ("ssim", "corr", "mae")}, "ramp_rad_per_px": ramp,
            **{f"deramped_{k}": deramped[k] for k in ("ssim", "corr", "mae")}}


def run(scan, batch: int, device: str, threads: int | None, probe_step: float) -> dict:
    import torch

    from ptychostream.refine import Refiner

    if threads:
        torch.set_num_threads(threads)
    r = Refiner(scan.probe, scan.object_pixel_size_m, positions_m=scan.positions_m,
                device=device, batch=batch, probe_step=probe_step, history=scan.n_frames)
    frames = torch.as_tensor(scan.frames.astype(np.float32), device=device)
    r.update(frames[:batch], scan.positions_m[:batch], store=False)  # warm-up (and rescale)
    r.reset(scan.positions_m)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(0, scan.n_frames, batch):
        r.update(frames[s:s + batch], scan.positions_m[s:s + batch])
    sync()
    seconds = time.perf_counter() - t0
    fig = score(r, scan)
    return {"batch": batch, "device": device, "frames": scan.n_frames,
            "frames_per_s": scan.n_frames / seconds, "us_per_frame": seconds / scan.n_frames * 1e6,
            **{k: fig[k] for k in ("ssim", "corr", "mae")}}


def run_passes(scan, probe, probe_step: float, passes: list[int], device: str,
               move_ramp: bool = True, seed_phases: np.ndarray | None = None,
               seed_mode: str = "blend", probe_start: int | None = None,
               handover: int = 64) -> list[dict]:
    """One live pass (seeded by ``seed_phases`` when given, as ``seed_mode`` says), then
    revisits; the map's figures after each number of passes asked."""
    from ptychostream.refine import DEFAULT_PROBE_START, Refiner

    seed_mode = "none" if seed_phases is None else seed_mode
    probe_start = DEFAULT_PROBE_START if probe_start is None else int(probe_start)
    r = Refiner(probe, scan.object_pixel_size_m, positions_m=scan.positions_m, device=device,
                probe_step=probe_step, seed=seed_mode, probe_start=probe_start,
                history=scan.n_frames, move_ramp=move_ramp)
    for s in range(0, scan.n_frames, handover):  # handed over as a stream's batches
        e = s + handover
        r.update(scan.frames[s:e], scan.positions_m[s:e],
                 None if seed_phases is None else seed_phases[s:e])
    rows = []
    for target in sorted(passes):
        while r.passes < target - 1e-9:
            r.revisit()
        rows.append({"probe_step": probe_step, "probe_start": probe_start,
                     "handover": handover, "move_ramp": move_ramp,
                     "seed": seed_mode, "passes": target,
                     "batch": r.batch, **score(r, scan)})
    return rows


def run_arrival(scan, probe, cap: float, final: float, device: str,
                seed_phases: np.ndarray | None = None) -> dict:
    """A slow detector: frames one at a time, and between two frames idle passes up to ``cap``
    (the stream leaves time for all of them), then up to ``final`` once the scan is over, as
    the IOC does with refine.LIVE_MAX_PASSES as ``cap``; the map's figures at both points."""
    from ptychostream.refine import Refiner

    r = Refiner(probe, scan.object_pixel_size_m, positions_m=scan.positions_m, device=device,
                probe_step=DEFAULT_PROBE_STEP, seed="none" if seed_phases is None else "blend",
                history=scan.n_frames)
    for i in range(scan.n_frames):
        r.update(scan.frames[i:i + 1], scan.positions_m[i:i + 1],
                 None if seed_phases is None else seed_phases[i:i + 1])
        while r.passes < cap - 1e-9 and r.revisit():
            pass
    at_end = score(r, scan)
    while r.passes < final - 1e-9 and r.revisit():
        pass
    return {"cap": cap, "passes": final, "scan_end": {k: at_end[k] for k in ("ssim", "corr", "mae")},
            **{k: v for k, v in score(r, scan).items()}}


def probe_overlap(probe, true_probe) -> float:
    """|<p, p_true>| / (|p| |p_true|) of the first modes: 1 for the true probe up to scale."""
    n = np.shape(true_probe)[-1]
    p = np.asarray(probe).reshape(-1, n, n)[0].ravel()
    q = np.asarray(true_probe).reshape(-1, n, n)[0].ravel()
    return float(abs(np.vdot(q, p)) / (np.linalg.norm(p) * np.linalg.norm(q)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32, 128])
    ap.add_argument("--positions", type=int, default=400)
    ap.add_argument("--step-nm", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--probe-step", type=float, default=0.0, help="probe step of the batch rows")
    ap.add_argument("--scan", help="a scan file with truth (default: a simulated letters scan)")
    ap.add_argument("--probe", help="probe for the passes rows: a .npy, reconstruction or scan "
                                    "file (default: the scan's true probe)")
    ap.add_argument("--passes", nargs="*", type=int, default=[],
                    help="also report accuracy after these numbers of passes")
    ap.add_argument("--probe-steps", nargs="*", type=float, default=[0.0, 0.5],
                    help="probe steps of the passes rows")
    ap.add_argument("--move-ramp", nargs="*", choices=("on", "off"), default=["on"],
                    help="passes rows with the learning probe taking the map's ramp, without")
    ap.add_argument("--seed-model", help="also seed the live pass with this model's phases "
                                         "(blend, as the IOC does): rows with and without; "
                                         "'truth': the scan's true phase crops (a perfect "
                                         "network)")
    ap.add_argument("--probe-starts", nargs="*", type=int, default=[None],
                    help="passes rows with the probe learning from this many frames on "
                         "(default refine.DEFAULT_PROBE_START)")
    ap.add_argument("--seed-modes", nargs="*", choices=("blend", "new"), default=["blend"],
                    help="how --seed-model's phases seed the map (refine.SEED_MODES)")
    ap.add_argument("--handover", type=int, default=64,
                    help="frames handed to the refiner at once in the passes rows (the IOC "
                         "hands over its NN:BatchSize, 8 by default; the probe starts learning "
                         "at the first hand-over past --probe-starts)")
    ap.add_argument("--arrival-caps", nargs="*", type=float, default=[],
                    help="also a slow detector: idle passes between two frames up to each of "
                         "these caps, then Stitch:MaxPasses' default once the scan is over")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    setup_logging()
    import torch

    from ptychostream.metrics import flat_baseline, illuminated_mask
    from ptychostream.simulation import simulate_scan

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.scan:
        from ptychostream.scanfile import read_scan

        scan = read_scan(args.scan)
        if scan.truth_phase is None:
            raise SystemExit(f"{args.scan} holds no truth to score against")
    else:
        scan = simulate_scan(n_positions=args.positions, step_m=args.step_nm * 1e-9, seed=4242,
                             sample_kind="test")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(scan, b, device, args.threads, args.probe_step) for b in args.batches]
    probe, probe_name = scan.probe, "the scan's true probe"
    if args.probe:
        from ptychostream.refine import load_probe

        probe, probe_name = load_probe(args.probe)
    seeds: list[tuple[np.ndarray | None, str]] = [(None, "none")]
    if args.seed_model:
        if args.seed_model == "truth":  # a perfect network: what seeding itself costs
            if scan.truth_crops is None:
                raise SystemExit(f"{args.scan} holds no truth crops to seed with")
            phases = np.asarray(scan.truth_crops, np.float32)
        else:
            from ptychostream.engines import load_engine

            engine = load_engine("onnxruntime" if args.seed_model.endswith(".onnx")
                                 else "torch", args.seed_model)
            phases = np.concatenate([engine.infer(scan.frames[s:s + 8].astype(np.float32))
                                     for s in range(0, scan.n_frames, 8)])
        seeds += [(phases, mode) for mode in args.seed_modes]
    pass_rows = [row for seed, mode in seeds for move in args.move_ramp
                 for step in (args.probe_steps if args.passes else [])
                 for start in args.probe_starts
                 for row in run_passes(scan, probe, step, args.passes, device,
                                       move_ramp=move == "on", seed_phases=seed,
                                       seed_mode=mode, probe_start=start,
                                       handover=args.handover)]
    arrival_rows = [{"seed": mode, **run_arrival(scan, probe, cap, DEFAULT_MAX_PASSES, device,
                                                 seed)}
                    for seed, mode in seeds[-1:] for cap in args.arrival_caps]
    mask = illuminated_mask(scan.positions_m, scan.truth_phase.shape, scan.truth_origin_m,
                            scan.object_pixel_size_m, scan.beam_fwhm_m)
    flat = flat_baseline(scan.truth_phase, mask)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{device}, " \
        f"{args.threads} thread(s)"
    step_nm = (scan.step_m or args.step_nm * 1e-9) * 1e9
    print(f"\nlive refinement, {args.scan or 'letters scan'}, {scan.n_frames} frames at "
          f"{step_nm:.0f} nm (overlap {1 - 3 ** 0.5 * step_nm * 1e-9 / scan.beam_fwhm_m:.2f}), "
          f"{name}")
    print(f"{'batch':>6} {'frames/s':>10} {'us/frame':>9} {'SSIM':>6} {'corr':>6} {'MAE rad':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['frames_per_s']:>10.0f} {r['us_per_frame']:>9.0f} "
              f"{r['ssim']:>6.3f} {r['corr']:>6.3f} {r['mae']:>8.3f}")
    print(f"{'flat':>6} {'':>10} {'':>9} {flat['ssim']:>6.3f} {flat['corr']:>6.3f} "
          f"{flat['mae']:>8.3f}")
    if pass_rows:
        overlap = probe_overlap(probe, scan.probe)
        print(f"\nfurther passes (batch {pass_rows[0]['batch']}), probe: {probe_name} "
              f"(normalised overlap with the scan's true probe {overlap:.5f})")
        print("(ramp: slope of the plane fitted to map - truth, the error no diffraction pattern "
              "can tell; deramped: the figures once that plane is removed)")
        print(f"{'seed':>5} {'ramp to probe':>13} {'probe step':>10} {'from':>5} {'passes':>6} "
              f"{'SSIM':>6} "
              f"{'corr':>6} {'MAE rad':>8} {'ramp rad/px':>11} {'deramped SSIM / corr / MAE':>27}")
        for r in pass_rows:
            print(f"{r['seed']:>5} {'on' if r['move_ramp'] else 'off':>13} "
                  f"{r['probe_step']:>10.2f} {r['probe_start']:>5} {r['passes']:>6} "
                  f"{r['ssim']:>6.3f} "
                  f"{r['corr']:>6.4f} {r['mae']:>8.4f} {r['ramp_rad_per_px']:>11.1e} "
                  f"{r['deramped_ssim']:>13.3f} / {r['deramped_corr']:.4f} / "
                  f"{r['deramped_mae']:.4f}")
    if arrival_rows:
        print(f"\nslow detector: frames one at a time, idle passes between them up to the cap, "
              f"then {DEFAULT_MAX_PASSES:g} (probe: {probe_name}, probe step "
              f"{DEFAULT_PROBE_STEP:g}, seed {arrival_rows[0]['seed']})")
        print(f"{'cap':>5} {'at scan end SSIM / corr / MAE':>30} "
              f"{f'after {DEFAULT_MAX_PASSES:g} passes':>30}")
        for r in arrival_rows:
            e = r["scan_end"]
            print(f"{r['cap']:>5g} {e['ssim']:>12.3f} / {e['corr']:.4f} / {e['mae']:.4f} "
                  f"{r['ssim']:>12.3f} / {r['corr']:.4f} / {r['mae']:.4f}")
    out = {"device": name, "scan": args.scan, "positions": scan.n_frames, "step_nm": step_nm,
           "rows": rows, "flat": flat, "probe": probe_name, "passes": pass_rows,
           "arrival": arrival_rows,
           "probe_overlap": probe_overlap(probe, scan.probe)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
