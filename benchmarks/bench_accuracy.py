#!/usr/bin/env python
"""Accuracy of the live phase map: stitched network output, per-frame refinement and iterative
phase retrieval against the truth of the simulated experiment (issues 8 and 14).

    python benchmarks/bench_accuracy.py --model builtin --json acc.json --out acc-figures
    python benchmarks/bench_accuracy.py --quick --model model.pt     # 2 CPU cores, ~1 minute

Cases: (a) held-out random features at overlap 0.9, (b) letters at overlap 0.9, (c) letters
at zero overlap (step 460 nm), (d) letters at 0.5 ms exposure, frames x10 before inference
(step 100 nm), (e) letters over an overlap sweep (0.9, 0.78, 0.6, 0.3, 0). Every row gives
SSIM, Pearson correlation and MAE (rad) over the illuminated area (within half the beam FWHM
of a beam position; constant phase matched by the median), beside the flat map's figures and
the ceiling: the truth crops stitched by the same stitcher (a perfect network). Per-frame MAE
in the beam (network output vs truth crop), with and without each frame's constant offset.

Beamline conditions by default, so that no row commits the inverse crime (REFERENCE.md): the
recorded positions carry 15 nm rms encoder errors (every method gets them), and refinement and
iterative reconstruction get a probe reconstructed from an earlier high-overlap scan of another
area, started from a wrong guess, not the simulation's own probe. ``--ideal`` gives them the
true probe and exact positions instead.

Methods: ``ai`` (network, stitched), ``refine`` (the IOC's refinement stage: one rPIE step per
frame in arrival order, seeded flat, then revisits up to ``--refine-passes`` passes, by default
``Stitch:MaxPasses``' default, what the IOC reaches while the detector pauses), ``ai+refine`` (the
same, seeded by the network as the IOC blends it), ``iterative`` (pty-chi rPIE,
:func:`ptychostream.hpc.reconstruct`). Stitching options (whole frame / crop / probe weights,
each with and without constant-offset registration) are measured on every case. No ``--model``:
no network rows. Refinement rows need :mod:`ptychostream.refine` (skipped while absent).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from ptychostream.geometry import place_on_grid
from ptychostream.metrics import flat_baseline, frame_mae, illuminated_mask, map_figures
from ptychostream.simulation import (
    ExperimentConfig,
    beam_mask,
    make_probe,
    overlap_ratio,
    simulate_scan,
    step_for_overlap,
)

log = logging.getLogger("bench_accuracy")

SWEEP = (0.9, 0.78, 0.6, 0.3, 0.0)
ZERO_OVERLAP_STEP_M = 460e-9  # the paper's sparse scan
LOW_DOSE_STEP_M = 100e-9  # the paper's 0.5 ms live demonstration
SEED_RANDOM, SEED_LETTERS, SEED_CALIBRATION = 9100, 9200, 9300
#: stitching variants: keyword arguments of ptychostream.stitch.stitch ("crop" is filled in)
STITCH_VARIANTS = {
    "whole": {"weighting": "uniform", "crop": None, "register_offsets": False},
    "crop": {"weighting": "crop", "crop": "beam", "register_offsets": False},
    "probe": {"weighting": "probe", "register_offsets": False},
    "whole+reg": {"weighting": "uniform", "crop": None, "register_offsets": True},
    "crop+reg": {"weighting": "crop", "crop": "beam", "register_offsets": True},
    "probe+reg": {"weighting": "probe", "register_offsets": True},
}


# --------------------------------------------------------------------------- helpers
def stitch_map(phases: np.ndarray, positions_m: np.ndarray, pixel_m: float, variant: str,
               probe: np.ndarray, beam_fwhm_m: float, shape, origin) -> np.ndarray:
    """Stitch with ``variant`` (:data:`STITCH_VARIANTS`); the map on the truth grid."""
    from ptychostream.stitch import stitch

    opts = dict(STITCH_VARIANTS[variant])
    if opts.get("crop") == "beam":
        opts["crop"] = int(2 * round(beam_fwhm_m / pixel_m / 2))
    image, img_origin = stitch(np.asarray(phases, np.float32), positions_m, pixel_m, probe=probe,
                               beam_fwhm_m=beam_fwhm_m, **opts)
    return place_on_grid(image, img_origin, pixel_m, shape, origin)


def probe_fidelity(probe: np.ndarray, true_probe: np.ndarray) -> float:
    """|<p, p_true>|^2 / (|p|^2 |p_true|^2): 1 for the true probe up to scale and phase."""
    p = np.asarray(probe).reshape(-1, *true_probe.shape)[0].ravel()
    q = true_probe.ravel()
    return float(abs(np.vdot(q, p)) ** 2 / (np.vdot(p, p).real * np.vdot(q, q).real))


def _refine_api():
    try:
        from ptychostream.refine import refine_scan
    except ImportError:
        return None
    return refine_scan


def calibrate_probe(args, cfg: ExperimentConfig, work: Path) -> tuple[np.ndarray, dict]:
    """A probe as a beamline has one: reconstructed (pty-chi) from an earlier high-overlap scan
    of another (random-feature) area with encoder errors, started from a wrong guess (a zone
    plate of a 15 % larger beam, other pupil)."""
    from ptychostream.hpc import read_reconstruction, reconstruct
    from ptychostream.scanfile import write_scan

    scan = simulate_scan(cfg, n_positions=args.cal_positions, sample_kind="train",
                         step_m=step_for_overlap(0.9, cfg.beam_fwhm_m), seed=SEED_CALIBRATION,
                         scan_id="calibration")
    true_probe = scan.probe
    scan.probe = make_probe(cfg.frame_size, cfg.object_pixel_m, cfg.energy_ev,
                            1.15 * cfg.beam_fwhm_m, pupil_fill=0.27, central_stop=0.5)
    path = write_scan(work / "calibration.h5", scan, compression=None)
    t0 = time.perf_counter()
    rec = read_reconstruction(reconstruct(str(path), str(work / "calibration-rec.h5"),
                                          iterations=args.cal_iterations, device=args.device,
                                          **_threads(args)))
    probe = rec.probe[0]
    info = {"positions": args.cal_positions, "iterations": args.cal_iterations,
            "seconds": time.perf_counter() - t0,
            "guess_fidelity": probe_fidelity(scan.probe, true_probe),
            "fidelity": probe_fidelity(probe, true_probe),
            "mean_counts": float(scan.frames.sum(axis=(1, 2)).mean())}
    log.info("calibration probe: fidelity %.3f (guess %.3f) after %d iterations, %.0f s",
             info["fidelity"], info["guess_fidelity"], args.cal_iterations, info["seconds"])
    return probe, info


def _refine_device(args) -> str:
    """Refinement runs where the IOC's would: the GPU when there is one (``--device``)."""
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _threads(args) -> dict:
    return {"threads": args.threads} if args.threads else {}


# --------------------------------------------------------------------------- one case
def run_case(name: str, cfg: ExperimentConfig, args, engine, probe_known: np.ndarray | None,
             cal_counts: float | None, work: Path, intensity_scale: float = 1.0) -> dict:
    """Every method on one simulated scan; figures, timings and the maps for the figure."""
    scan = simulate_scan(cfg)
    truth, origin = scan.truth_phase, scan.truth_origin_m
    dx = scan.object_pixel_size_m
    mask = illuminated_mask(scan.positions_m, truth.shape, origin, dx, cfg.beam_fwhm_m)
    drange = float(np.ptp(truth[mask])) or 1.0
    counts = float(scan.frames.sum(axis=(1, 2)).mean())
    if probe_known is None:  # --ideal: the true probe at the data's scale
        probe = scan.probe * np.sqrt(cfg.photons_per_frame)
    else:  # the calibrated probe, rescaled to this scan's dose
        probe = probe_known * np.sqrt(counts / cal_counts)
    out: dict = {
        "scan": {"sample_kind": cfg.sample_kind, "positions": cfg.n_positions,
                 "step_nm": cfg.step_m * 1e9, "overlap": round(overlap_ratio(cfg.step_m, cfg.beam_fwhm_m), 3),
                 "exposure_s": cfg.exposure_s, "photons_per_frame": cfg.photons_per_frame,
                 "intensity_scale": intensity_scale, "position_error_nm": cfg.position_error_m * 1e9,
                 "mean_counts": counts},
        "rows": {}, "stitch": {}, "seconds": {}, "maps": {"truth": truth, "mask": mask},
    }
    rows = out["rows"]
    rows["flat"] = flat_baseline(truth, mask, drange)

    def fig(m):
        return map_figures(m, truth, mask, drange)

    variants = list(STITCH_VARIANTS) if args.stitch_variants else [args.stitch]
    for v in variants:
        ceil = stitch_map(scan.truth_crops, scan.positions_m, dx, v, probe, cfg.beam_fwhm_m,
                          truth.shape, origin)
        out["stitch"][v] = {"ceiling": fig(ceil)}
    phases = None
    if engine is not None:
        t0 = time.perf_counter()
        phases = engine.infer(scan.frames, intensity_scale)
        out["seconds"]["ai_inference"] = time.perf_counter() - t0
        out["frame_mae"] = frame_mae(phases, scan.truth_crops, beam_mask(scan.probe))
        for v in variants:
            t0 = time.perf_counter()
            live = stitch_map(phases, scan.positions_m, dx, v, probe, cfg.beam_fwhm_m,
                              truth.shape, origin)
            out["stitch"][v]["ai"] = fig(live)
            out["stitch"][v]["seconds"] = time.perf_counter() - t0
            if v == args.stitch:
                out["maps"]["ai"] = live
    chosen = out["stitch"].get(args.stitch)
    if isinstance(chosen, dict):  # the main rows use the chosen stitching
        rows["ceiling"] = chosen["ceiling"]
        if "ai" in chosen:
            rows["ai"] = chosen["ai"]
    refine_scan = _refine_api()
    if refine_scan is None:
        out["refine"] = "ptychostream.refine not available"
    else:
        seeds = [("refine", None)] + ([("ai+refine", phases)] if phases is not None else [])
        for label, seed in seeds:
            t0 = time.perf_counter()
            rmap, rorigin = refine_scan(scan.frames, scan.positions_m, probe, dx,
                                        passes=args.refine_passes, seed_phases=seed,
                                        device=_refine_device(args))
            out["seconds"][label] = time.perf_counter() - t0
            on_grid = place_on_grid(np.asarray(rmap, np.float32), rorigin, dx, truth.shape, origin)
            rows[label] = fig(on_grid)
            out["maps"][label] = on_grid
    if args.iterations > 0:
        from ptychostream.hpc import read_reconstruction, reconstruct
        from ptychostream.scanfile import write_scan

        file_scan = scan.subset(slice(None))
        file_scan.probe = np.asarray(probe, np.complex64)
        path = write_scan(work / f"{name}.h5", file_scan, compression=None)
        t0 = time.perf_counter()
        rec = read_reconstruction(reconstruct(str(path), str(work / f"{name}-rec.h5"),
                                              iterations=args.iterations, device=args.device,
                                              **_threads(args)))
        out["seconds"]["iterative"] = time.perf_counter() - t0
        it = place_on_grid(rec.phase, rec.origin_m, dx, truth.shape, origin)
        rows["iterative"] = fig(it)
        out["maps"]["iterative"] = it
        if "ai" in out["maps"]:
            ok = mask & np.isfinite(it)
            out["ai_vs_iterative"] = map_figures(out["maps"]["ai"], it, ok, drange)
    log.info("%s: %s", name, ", ".join(f"{k} r={v['corr']:.3f} MAE={v['mae']:.3f}"
                                        for k, v in rows.items()))
    return out


# --------------------------------------------------------------------------- output
METHOD_ORDER = ("flat", "ceiling", "ai", "refine", "ai+refine", "iterative")


def print_table(result: dict) -> str:
    lines = [f"{'case':<28} {'method':<11} {'SSIM':>6} {'corr':>6} {'MAE':>6}"]
    for name, case in result["cases"].items():
        for m in METHOD_ORDER:
            if m in case["rows"]:
                r = case["rows"][m]
                lines.append(f"{name:<28} {m:<11} {r['ssim']:6.3f} {r['corr']:6.3f} {r['mae']:6.3f}")
        if "frame_mae" in case:
            fm = case["frame_mae"]
            lines.append(f"{name:<28} per-frame MAE in the beam {fm['mae']:.3f} rad, "
                         f"{fm['mae_offset_removed']:.3f} with each frame's offset removed")
    lines.append("")
    lines.append(f"{'stitching (AI / ceiling corr)':<28} " + " ".join(f"{v:>12}" for v in
                                                                       STITCH_VARIANTS))
    for name, case in result["cases"].items():
        cells = []
        for v in STITCH_VARIANTS:
            s = case["stitch"].get(v)
            if not isinstance(s, dict):
                cells.append(f"{'-':>12}")
            else:
                a = f"{s['ai']['corr']:.2f}" if "ai" in s else "-"
                cells.append(f"{a + '/' + format(s['ceiling']['corr'], '.2f'):>12}")
        lines.append(f"{name:<28} " + " ".join(cells))
    text = "\n".join(lines)
    print(text)
    return text


def save_png(path: Path, name: str, case: dict) -> None:
    """truth | live AI | refined | iterative, one colour scale (the truth's), outside the
    illuminated area blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps, rows = case["maps"], case["rows"]
    truth, mask = maps["truth"], maps["mask"]
    panels = [("truth", truth), ("live AI", maps.get("ai")),
              ("refined", maps.get("ai+refine", maps.get("refine"))), ("iterative", maps.get("iterative"))]
    keys = {"live AI": "ai", "refined": "ai+refine" if "ai+refine" in maps else "refine",
            "iterative": "iterative"}
    rows_idx, cols_idx = np.nonzero(mask)
    box = (slice(rows_idx.min(), rows_idx.max() + 1), slice(cols_idx.min(), cols_idx.max() + 1))
    lo, hi = float(truth[mask].min()), float(truth[mask].max())
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (title, m) in zip(axes, panels, strict=True):
        ax.axis("off")
        if m is None:
            ax.set_title(f"{title}: not run")
            continue
        ok = mask & np.isfinite(m) & np.isfinite(truth)
        shown = m - np.median(m[ok] - truth[ok]) if title != "truth" else m.copy()
        shown = np.where(mask, shown, np.nan)
        ax.imshow(shown[box], cmap="viridis", vmin=lo, vmax=hi)
        r = rows.get(keys.get(title, ""))
        sub = f"\nSSIM {r['ssim']:.2f}  r {r['corr']:.3f}  MAE {r['mae']:.3f}" if r else ""
        if title == "truth":
            f = rows["flat"]
            sub = f"\nflat map: SSIM {f['ssim']:.2f}  MAE {f['mae']:.3f}"
        ax.set_title(title + sub, fontsize=10)
    sc = case["scan"]
    fig.suptitle(f"{name}: {sc['sample_kind']}, step {sc['step_nm']:.0f} nm (overlap "
                 f"{sc['overlap']:.2f}), {sc['photons_per_frame']:.2g} photons/frame x{sc['intensity_scale']:g}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_sweep_png(path: Path, sweep: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHOD_ORDER:
        pts = [(s["overlap"], s["rows"][m]) for s in sweep if m in s["rows"]]
        if not pts:
            continue
        x = [p[0] for p in pts]
        axes[0].plot(x, [p[1]["corr"] for p in pts], "o-", label=m)
        axes[1].plot(x, [p[1]["mae"] for p in pts], "o-", label=m)
    axes[0].set(xlabel="overlap", ylabel="correlation with truth", title="letters: correlation")
    axes[1].set(xlabel="overlap", ylabel="MAE (rad)", title="letters: MAE")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _jsonable(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "maps"}


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="state dict or ONNX file, or 'builtin' (the shipped base model); "
                    "none: no network rows")
    ap.add_argument("--engine", default=None, help="onnxruntime / torch / tensorrt "
                    "(default: torch on a GPU, else onnxruntime)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--out", help="folder for one PNG per case (truth | live AI | refined | iterative)")
    ap.add_argument("--quick", action="store_true", help="small scans, few iterations (2 CPU cores, ~1 min)")
    ap.add_argument("--cases", default="a,b,c,d,e", help="which of a,b,c,d,e")
    ap.add_argument("--positions", type=int, help="positions per scan (default 963; quick 32)")
    ap.add_argument("--overlaps", type=float, nargs="+", default=list(SWEEP), help="sweep (e)")
    ap.add_argument("--iterations", type=int, help="pty-chi iterations (default 50, quick 3; 0: no iterative rows)")
    ap.add_argument("--cal-positions", type=int, help="calibration scan positions (default 400, quick 40)")
    ap.add_argument("--cal-iterations", type=int, help="calibration iterations (default 100, quick 5)")
    ap.add_argument("--position-error-nm", type=float, default=15.0, help="rms encoder error per axis")
    ap.add_argument("--ideal", action="store_true", help="true probe and exact positions (inverse crime)")
    ap.add_argument("--refine-passes", type=int, default=None,
                    help="passes of the refinement rows (default: the IOC's Stitch:MaxPasses, "
                         "32; quick 8)")
    ap.add_argument("--stitch", default="probe", choices=list(STITCH_VARIANTS),
                    help="stitching of the main rows (the table measures all of them)")
    ap.add_argument("--no-stitch-variants", dest="stitch_variants", action="store_false",
                    help="only the --stitch variant")
    ap.add_argument("--device", help="pty-chi and refinement device (default: a GPU if there is one)")
    ap.add_argument("--threads", type=int, help="torch CPU threads for pty-chi")
    ap.add_argument("--seed-offset", type=int, default=0, help="added to every scan's seed")
    args = ap.parse_args(argv)
    q = args.quick
    args.positions = args.positions or (32 if q else 963)
    args.iterations = args.iterations if args.iterations is not None else (3 if q else 50)
    args.cal_positions = args.cal_positions or (40 if q else 400)
    args.cal_iterations = args.cal_iterations or (5 if q else 100)
    if args.ideal:
        args.position_error_nm = 0.0
    if args.refine_passes is None:
        from ptychostream.refine import DEFAULT_MAX_PASSES

        args.refine_passes = 8 if q else int(DEFAULT_MAX_PASSES)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from ptychostream import setup_logging

    setup_logging()
    t_start = time.perf_counter()
    engine, model_path = None, None
    if args.model:
        from ptychostream.basemodel import resolve_model
        from ptychostream.engines import load_engine

        model_path = resolve_model(args.model)
        name = args.engine
        if name is None:
            import torch

            name = "torch" if torch.cuda.is_available() and not _is_onnx(model_path) else "onnxruntime"
        engine = load_engine(name, model_path)
        args.engine = name
    cases = set(args.cases.split(","))
    base = ExperimentConfig(n_positions=args.positions, position_error_m=args.position_error_nm * 1e-9,
                            position_jitter_m=0.0 if args.ideal else 2e-9)
    beam = base.beam_fwhm_m
    result: dict = {"args": vars(args), "model": str(model_path) if model_path else None,
                    "cases": {}, "sweep": []}
    with tempfile.TemporaryDirectory(prefix="bench-acc-") as tmp:
        work = Path(tmp)
        probe_known, cal_counts = None, None
        needs_probe = args.iterations > 0 or _refine_api() is not None
        if needs_probe and not args.ideal:
            probe_known, cal = calibrate_probe(args, base, work)
            cal_counts = cal["mean_counts"]
            result["calibration"] = cal

        def cfg(kind: str, step: float, seed: int, **kw) -> ExperimentConfig:
            return ExperimentConfig(**{**base.__dict__, "sample_kind": kind, "step_m": step,
                                       "seed": seed + args.seed_offset, **kw})

        def case(name: str, c: ExperimentConfig, scale: float = 1.0) -> dict:
            res = run_case(name, c, args, engine, probe_known, cal_counts, work, scale)
            result["cases"][name] = res
            return res

        step09 = step_for_overlap(0.9, beam)
        if "a" in cases:
            case("a_random_heldout_ov0.9", cfg("train", step09, SEED_RANDOM))
        done: dict[float, dict] = {}
        if "b" in cases:
            done[0.9] = case("b_letters_ov0.9", cfg("test", step09, SEED_LETTERS))
        if "c" in cases:
            done[0.0] = case("c_letters_step460nm", cfg("test", ZERO_OVERLAP_STEP_M, SEED_LETTERS))
        if "d" in cases:
            case("d_letters_0.5ms_x10", cfg("test", LOW_DOSE_STEP_M, SEED_LETTERS, exposure_s=0.5e-3),
                 scale=10.0)
        if "e" in cases:
            for ov in args.overlaps:
                step = ZERO_OVERLAP_STEP_M if math.isclose(ov, 0.0) else step_for_overlap(ov, beam)
                res = done.get(ov) or case(f"e_letters_ov{ov:g}", cfg("test", step, SEED_LETTERS))
                result["sweep"].append({"overlap": ov, "step_nm": step * 1e9, "rows": res["rows"]})
        result["seconds"] = time.perf_counter() - t_start
        result["table"] = print_table(result)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for name, c in result["cases"].items():
                save_png(out / f"{name}.png", name, c)
            if result["sweep"]:
                save_sweep_png(out / "sweep.png", result["sweep"])
            (out / "accuracy.txt").write_text(result["table"] + "\n")
    result["cases"] = {k: _jsonable(v) for k, v in result["cases"].items()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=_json_default))
    log.info("accuracy benchmark done in %.0f s", result["seconds"])
    return result


def _is_onnx(path: Path) -> bool:
    from ptychostream.model import is_onnx

    return is_onnx(Path(path).read_bytes())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


if __name__ == "__main__":
    main()
