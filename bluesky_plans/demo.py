"""The one-command demo: the story of the paper on simulated data, end to end, on one machine.

Starts the simulated detector (an ophyd device publishing NTNDArray frames over pvAccess), the
edge IOC (in-process, with its Channel Access mirror) and the local HPC executor; then

1. training scans over random etched features at high overlap, each followed by iterative
   reconstruction, labels, training (warm start) and validation on the executor, and the new
   model deployed to the IOC by a PV write (the continual-learning plan);
2. a test scan over features the network never saw (letters), streamed live through the IOC,
   which infers every frame and refines its map against each frame with the probe the HPC
   reconstruction recovered (the first scan's probe comes from the simulation); then a sparse
   scan of the same letters;
3. iterative reconstructions of both; every map (flat, network alone, live, iterative) scored
   against the truth over the illuminated area: SSIM, correlation and MAE;
4. a table (printed and ``demo.json``) and figures (``stitched_*.png``: truth | network | live |
   iterative, and ``ssim_rounds.png``).

    ptychostream demo --quick        # under a minute on 2 cores
    ptychostream demo --out demo-output --prefix DEMO:
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ptychostream.epics_env import use_loopback
from ptychostream.geometry import place_on_grid

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes of the story; ``quick()`` and ``full()`` are sized for a 2-core machine.

    ``sparse_points`` None: as many as cover the test scan's area at the sparse step.
    ``field_of_view_m`` None: the features fill the area the scans illuminate."""

    train_scans: int = 4
    train_points: int = 200
    train_step_m: float = 70e-9  # overlap 0.85 with the 800 nm beam
    test_points: int = 120
    test_step_m: float = 70e-9
    sparse_step_m: float = 180e-9  # overlap 0.61: where the paper's iterative result degrades
    sparse_points: int | None = None
    test_text: str = ""  # letters of the test sample ('' : the core default)
    exposure_s: float = 0.4
    field_of_view_m: float | None = None
    iterations: int = 30
    epochs: int = 5
    max_pairs: int | None = 400
    batch_size: int = 16
    ioc_batch_size: int = 8
    tolerance: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        from ptychostream.simulation import spiral_positions

        def radius(n: int, step: float) -> float:
            return float(np.hypot(*spiral_positions(n, step).T).max())

        r_test = radius(self.test_points, self.test_step_m)
        if self.sparse_points is None:
            n = 2
            while radius(n + 1, self.sparse_step_m) <= r_test:
                n += 1
            self.sparse_points = n
        if self.field_of_view_m is None:
            r = max(r_test, radius(self.train_points, self.train_step_m))
            self.field_of_view_m = 2 * r + 0.8e-6  # plus the beam

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(train_scans=1, train_points=50, train_step_m=100e-9, test_points=50,
                   test_step_m=100e-9, test_text="EPICS AI", iterations=8, epochs=2,
                   max_pairs=None)

    @classmethod
    def full(cls) -> DemoConfig:
        return cls()


# --------------------------------------------------------------------------- analysis helpers
MAPS = ("flat", "ceiling", "network", "live", "iterative")
MAP_TITLES = {"network": "network alone (offline stitch)",
              "ceiling": "truth crops stitched as the network's phases (a perfect network)",
              "live": "live map at the IOC (refined)", "iterative": "iterative (pty-chi rPIE)",
              "flat": "flat map"}


def _wait_refined(ioc, timeout: float = 60.0, stall: float = 3.0) -> float:
    """Wait until the map stage's idle passes reach Stitch:MaxPasses (or stop moving), then one
    map update more, so the live map read is the one the IOC ends the scan with."""
    target = float(ioc.stitch.max_passes.get())
    start = last_change = time.monotonic()
    last = -1.0
    while time.monotonic() - start < timeout:
        passes = float(ioc.stitch.passes.get())
        if passes >= target - 1e-6:
            break
        if passes != last:
            last, last_change = passes, time.monotonic()
        elif time.monotonic() - last_change > stall:
            break
        time.sleep(0.2)
    time.sleep(float(ioc.stitch.update_period.get()) + 0.2)
    return float(ioc.stitch.passes.get())


def stitched_map(phases: np.ndarray, scan, shape, origin_m, pixel_m: float) -> np.ndarray:
    """Per-frame phases stitched offline as the IOC stitches the network's (probe weights,
    offsets registered if that is the default), on a given grid."""
    from ptychostream.stitch import DEFAULT_REGISTER_OFFSETS, Stitcher

    st = Stitcher(pixel_m, phases.shape[-1], positions_m=scan.positions_m, weighting="probe",
                  probe=scan.probe, beam_fwhm_m=scan.beam_fwhm_m,
                  register_offsets=DEFAULT_REGISTER_OFFSETS)
    st.add_many(phases, scan.positions_m, batch=8)
    return st.resample_to(shape, origin_m)


def network_map(model_path: str | None, scan_path: str, shape, origin_m, pixel_m: float):
    """The serving network's phases stitched as the IOC stitches them; None without a model."""
    if not model_path:
        return None
    from ptychostream.engines import load_engine
    from ptychostream.scanfile import read_scan

    scan = read_scan(scan_path)
    phases = load_engine("onnxruntime", model_path).infer(scan.frames)
    return stitched_map(phases, scan, shape, origin_m, pixel_m)


def compare_maps(live: np.ndarray, live_origin, scan_path: str, recon_path: str,
                 model_path: str | None = None) -> tuple[dict, dict]:
    """Every map against the truth over the illuminated area (ptychostream.metrics): SSIM,
    correlation and MAE of the flat map, the truth ceiling, the network alone, the live IOC map
    and the iterative reconstruction, and SSIM of the live map against the iterative one. Returns (figures, maps
    cropped to the area, offsets matched)."""
    from ptychostream.hpc import read_reconstruction
    from ptychostream.metrics import align_median, illuminated_mask, map_figures, phase_ssim
    from ptychostream.scanfile import read_scan

    rec = read_reconstruction(recon_path)
    scan = read_scan(scan_path, frames=False)
    shape, px = rec.phase.shape, rec.pixel_size_m
    truth = place_on_grid(scan.truth_phase, scan.truth_origin_m, px, shape, rec.origin_m)
    mask = illuminated_mask(scan.positions_m, shape, rec.origin_m, px, scan.beam_fwhm_m)
    mask &= np.isfinite(truth)
    maps = {"live": place_on_grid(live, live_origin, px, shape, rec.origin_m),
            "iterative": rec.phase, "flat": np.zeros(shape, np.float32)}
    net = network_map(model_path, scan_path, shape, rec.origin_m, px)
    if net is not None:
        maps["network"] = net
    if scan.truth_crops is not None:  # what the network's map could be at best: the ceiling
        maps["ceiling"] = stitched_map(scan.truth_crops, scan, shape, rec.origin_m, px)
    figures = {k: map_figures(v, truth, mask) for k, v in maps.items()}
    ok = mask & np.isfinite(maps["live"])
    out = {"figures": figures, "region_px": int(mask.sum()),
           "ssim_live_truth": figures["live"]["ssim"],
           "ssim_live_iterative": phase_ssim(maps["live"], rec.phase, mask=ok),
           "ssim_iterative_truth": figures["iterative"]["ssim"]}
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))

    def crop(a):
        a = np.array(align_median(a, truth, mask)[box], np.float32)
        a[~mask[box]] = np.nan
        return a

    shown = {k: crop(v) for k, v in maps.items() if k not in ("flat", "ceiling")}
    shown["truth"] = crop(truth)
    return out, shown


def plot_maps(path: Path, title: str, maps: dict, result: dict) -> None:
    """truth | network | live | iterative, one grey scale, each with its three figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["truth", *(k for k in ("network", "live", "iterative") if k in maps)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 4.2), constrained_layout=True)
    lo = np.nanpercentile(maps["truth"], 1) - 0.2
    hi = np.nanpercentile(maps["truth"], 99) + 0.2
    fl = result["figures"]["flat"]
    for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
        im = ax.imshow(maps[key], cmap="gray", vmin=lo, vmax=hi)
        if key == "truth":
            label = (f"truth\n(flat map: SSIM {fl['ssim']:.2f}, corr 0, "
                     f"MAE {fl['mae']:.2f} rad)")
        else:
            f = result["figures"][key]
            label = (f"{MAP_TITLES[key]}\nSSIM {f['ssim']:.2f}, corr {f['corr']:.2f}, "
                     f"MAE {f['mae']:.2f} rad")
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.8, label="phase (rad)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_rounds(path: Path, rounds: list[dict], tests: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    x = [r["round"] for r in rounds]
    ax.plot(x, [r["new_ssim"] for r in rounds], "o-", label="new model vs iterative (training scan)")
    served = [(r["round"], r["serving_ssim"]) for r in rounds if r["serving_ssim"] is not None]
    if served:
        ax.plot(*zip(*served, strict=True), "s--", label="serving model vs iterative, before training")
    for t in tests:
        ax.axhline(t["ssim_live_iterative"], ls=":", color="gray")
        ax.annotate(f"{t['name']}: live vs iterative", (x[0] if x else 1, t["ssim_live_iterative"]),
                    fontsize=8, va="bottom")
    ax.set_xlabel("training round (scan)")
    ax.set_ylabel("SSIM")
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    ax.set_title("SSIM over training rounds")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_table(summary: dict) -> str:
    """The final table: one line per scan, then the training rounds."""
    lines = [
        f"{'scan':<10} {'features':<8} {'frames':>6} {'step nm':>7} {'overlap':>7} "
        f"{'det Hz':>7} {'IOC fr':>6} {'drops':>5} {'model':>5} {'SSIM live/truth':>15} "
        f"{'live/iter':>9} {'iter/truth':>10}",
    ]
    for s in summary["scans"]:
        def f(key, s=s):
            v = s.get(key)
            return "-" if v is None else f"{v:.3f}"
        lines.append(
            f"{s['name']:<10} {s['features']:<8} {s['frames']:>6} {s['step_nm']:>7.0f} "
            f"{s['overlap']:>7.2f} {s['detector_hz']:>7.1f} {s['ioc_frames']:>6} {s['drops']:>5} "
            f"{'v' + str(s['model_version']):>5} {f('ssim_live_truth'):>15} "
            f"{f('ssim_live_iterative'):>9} {f('ssim_iterative_truth'):>10}")
    lines.append("")
    lines.append("maps against the truth over the illuminated area (offset matched): "
                 "SSIM / correlation / MAE (rad)")
    lines.append(f"{'scan':<10} " + " ".join(f"{k:>22}" for k in MAPS))
    for s in summary["scans"]:
        figs = s.get("figures")
        if not figs:
            continue
        cells = [("-" if k not in figs else
                  f"{figs[k]['ssim']:.2f} / {figs[k]['corr']:.3f} / {figs[k]['mae']:.3f}")
                 for k in MAPS]
        lines.append(f"{s['name']:<10} " + " ".join(f"{c:>22}" for c in cells))
    lines.append("")
    lines.append(f"{'round':<6} {'scan':<10} {'pairs':>6} {'train s':>8} {'recon s':>8} "
                 f"{'SSIM new':>8} {'deployed':>8} decision")
    for r in summary["rounds"]:
        new = "-" if r["new_ssim"] is None else f"{r['new_ssim']:.3f}"
        lines.append(f"{r['round']:<6} {r['scan']:<10} {r['pairs']:>6} {r['train_s']:>8.1f} "
                     f"{r['recon_s']:>8.1f} {new:>8} {r['deployed']:>8} {r['decision']}")
    t = summary["timing"]
    lines.append("")
    lines.append(f"IOC inference {summary['ioc_ms_per_frame']:.2f} ms a frame in one engine "
                 f"call ({summary['ioc_engine']}); total {t['total_s']:.0f} s "
                 f"(start-up {t['startup_s']:.0f}, training {t['training_s']:.0f}, "
                 f"test scans {t['tests_s']:.0f})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the story
class _Docs:
    """Keeps the documents of the last run, for rates and baseline readings."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.runs.append({"start": doc, "descriptors": {}, "events": [], "stop": None})
        elif name == "descriptor":
            self.runs[-1]["descriptors"][doc["uid"]] = doc["name"]
        elif name == "event":
            run = self.runs[-1]
            run["events"].append((run["descriptors"][doc["descriptor"]], doc))
        elif name == "stop":
            self.runs[-1]["stop"] = doc

    def scan_summary(self, run: dict) -> dict:
        primary = [d for s, d in run["events"] if s == "primary"]
        base = [d["data"] for s, d in run["events"] if s == "baseline"]
        t = [d["time"] for d in primary]
        start = run["start"]
        last = base[-1] if base else {}

        return {
            "name": start["scan_name"], "frames": len(primary), "step_nm": start["step_m"] * 1e9,
            "overlap": start["overlap"], "scan_file": start["scan_file"],
            "detector_hz": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0,
            "ioc_frames": int(last.get("ioc_stitch_num_frames", 0) or 0),
            # frames the detector sent that never reached the live map
            "drops": len(primary) - int(last.get("ioc_stitch_num_frames", 0) or 0) if base else 0,
            "model_version": int(last.get("ioc_nn_model_version", 0) or 0),
            "ioc_ms_per_frame": float(last.get("ioc_nn_execution_time", 0.0) or 0.0),
        }


def run_demo(out_dir: str | Path = "demo-output", quick: bool = False, prefix: str | None = None,
             config: DemoConfig | None = None, table: bool = False) -> dict:
    """Run the whole story; returns the summary (also written to ``out_dir/demo.json``)."""
    use_loopback()
    t_start = time.perf_counter()
    from bluesky import RunEngine
    from bluesky.callbacks.best_effort import BestEffortCallback
    from bluesky.utils import RunEngineInterrupted

    from ptychostream.bluesky_plans.continual import (
        ContinualLearner,
        call,
        continual_learning_plan,
        remote,
        report_decision,
        report_ssim,
    )
    from ptychostream.bluesky_plans.devices import EdgeIOC, SimPtychoDetector, SimSpiralStage
    from ptychostream.bluesky_plans.plans import spiral_ptycho_scan
    from ptychostream.hpc import ContinualPolicy, get_executor, reconstruct, validate
    from ptychostream.ioc.client import get_stitched, stitched_geometry
    from ptychostream.ioc.server import EdgeIOC as EdgeIOCServer
    from ptychostream.pvnames import DEFAULT_PREFIX
    from ptychostream.simulation import overlap_ratio

    cfg = config or (DemoConfig.quick() if quick else DemoConfig.full())
    prefix = prefix or DEFAULT_PREFIX
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    for old in (work, out / "scans"):  # each demo tells the story from the start
        if old.exists():
            log.info("removing %s from an earlier demo", old)
            shutil.rmtree(old)
    log.info("demo (%s) in %s, PV prefix %s", "quick" if quick else "full", out, prefix)

    stage = SimSpiralStage(name="stage", limits=(-cfg.field_of_view_m, cfg.field_of_view_m))
    det = SimPtychoDetector(name="det", stage=stage, pv_name=f"{prefix}SIM1:Pva1:Image",
                            write_dir=out / "scans", field_of_view_m=cfg.field_of_view_m,
                            seed=cfg.seed)
    det.acquire_time.put(cfg.exposure_s)
    det.open()
    base = _base_model()  # the shipped base model, when a GPU run has shipped one
    # the very first scan's probe comes from the simulation; later ones from HPC reconstructions
    server = EdgeIOCServer(prefix=prefix, input_pv=det.pv_name.get(), ca_mirror=True,
                           probe=det.probe, model_file=base,
                           batch_size=cfg.ioc_batch_size)
    server.start()
    from ptychostream.bluesky_plans.session import _quiet_requested_aborts

    _quiet_requested_aborts()  # Ctrl-C aborts the demo: not an error, no traceback
    RE = RunEngine({})
    bec = BestEffortCallback()
    bec.disable_plots()
    if not table:
        bec.disable_table()
        bec.disable_baseline()  # the IOC's PVs at each scan's start and end: in demo.json
    RE.subscribe(bec)
    docs = _Docs()
    RE.subscribe(docs)
    _progress(RE)
    executor = get_executor(max_workers=1)
    summary: dict = {"config": asdict(cfg), "prefix": prefix, "scans": [], "rounds": []}
    try:
        ioc = EdgeIOC(prefix, name="ioc")
        ioc.wait_for_connection(timeout=30)
        policy = ContinualPolicy(tolerance=cfg.tolerance, min_train_scans=cfg.train_scans)
        learner = ContinualLearner(
            executor, work, policy=policy,
            recon_options={"iterations": cfg.iterations, "device": "cpu"},
            train_options={"epochs": cfg.epochs, "batch_size": cfg.batch_size,
                           "max_pairs": cfg.max_pairs, "progress": False, "seed": cfg.seed},
            serving_model=base,  # the loop warm-starts from the base model
        )
        t_train = time.perf_counter()
        summary["timing"] = {"startup_s": t_train - t_start}

        # 1. training scans over random features, each followed by a round of the loop
        log.info("== 1. %d training scan(s) of %d points over random features, step %.0f nm",
                 cfg.train_scans, cfg.train_points, cfg.train_step_m * 1e9)
        train_specs = [dict(n_points=cfg.train_points, step=cfg.train_step_m,
                            exposure=cfg.exposure_s, sample=("train", 100 + i),
                            scan_name=f"train-{i + 1}") for i in range(cfg.train_scans)]
        RE(continual_learning_plan(det, stage, learner, train_specs, ioc=ioc))
        for i, rec in enumerate(learner.history):
            run = docs.runs[i]
            s = docs.scan_summary(run)
            s.update(features="random")
            summary["scans"].append(s)
            tr = rec.get("train") or {}
            summary["rounds"].append({
                "round": i + 1, "scan": rec["scan_id"], "pairs": int(tr.get("n_pairs", 0)),
                "train_s": float(tr.get("seconds", 0.0)), "recon_s": _recon_seconds(rec),
                "serving_ssim": rec["serving_ssim"], "new_ssim": rec["new_ssim"],
                "deployed": "yes" if rec["deployed"] else "no",
                "decision": rec["decisions"][-1]["action"] if rec["decisions"] else "",
            })
        version = int(ioc.nn.model_version.get())
        log.info("== the IOC now serves model v%d (%s)", version, ioc.nn.model_name.get())
        t_tests = time.perf_counter()
        summary["timing"]["training_s"] = t_tests - t_train

        # 2. unseen features (letters), streamed live through the IOC; then a sparse scan
        tests = [("test", cfg.test_points, cfg.test_step_m),
                 ("sparse", cfg.sparse_points, cfg.sparse_step_m)]
        results = []
        for name, n, step in tests:
            log.info("== 2. %s scan: %d points over unseen features (letters), step %.0f nm "
                     "(overlap %.2f), live through the IOC", name, n, step * 1e9,
                     overlap_ratio(step, 800e-9))

            def scan_and_check(name=name, n=n, step=step):
                yield from _set_sample(det, "test", 7, cfg.test_text)
                yield from spiral_ptycho_scan(det, stage, n_points=n, step=step,
                                              exposure=cfg.exposure_s, ioc=ioc, scan_name=name)

            RE(scan_and_check())
            passes = _wait_refined(ioc)
            live = get_stitched(prefix)
            live_origin, _ = stitched_geometry(live)
            s = docs.scan_summary(docs.runs[-1])
            # frame updates per frame the live map had when it was read (Stitch:Passes_RBV)
            s.update(features="letters", live_passes=round(passes, 2))
            log.info("== %s: live map read after %.2f passes", name, s["live_passes"])
            log.info("== %s: iterative reconstruction for comparison", name)
            box: dict = {}

            def iterate(name=name, s=s, box=box):
                recon = yield from remote(executor, reconstruct, s["scan_file"],
                                          str(work / f"{name}.recon.h5"),
                                          iterations=cfg.iterations, device="cpu")
                box["recon"] = recon
                if learner.serving_model is None:
                    raise RuntimeError("no model was trained: nothing to validate")
                check = yield from remote(executor, validate, learner.serving_model,
                                          s["scan_file"], recon)
                box["ssim"] = check["ssim"]
                yield from report_ssim(ioc, check["ssim"])
                box["decision"] = yield from call(policy.decide, name, check["ssim"])
                yield from report_decision(ioc, box["decision"])

            RE(iterate())
            ssims, maps = compare_maps(np.asarray(live), live_origin, s["scan_file"],
                                       box["recon"], learner.serving_model)
            s.update(ssims)
            s["validate_ssim"] = box["ssim"]
            s["decision"] = f"{box['decision'].action}: {box['decision'].reason}"
            summary["scans"].append(s)
            results.append({"name": name, **ssims})
            png = out / f"stitched_{name}.png"
            plot_maps(png, f"{name} scan: {s['frames']} frames, step {step * 1e9:.0f} nm "
                      f"(overlap {s['overlap']:.2f}), model v{s['model_version']}", maps, ssims)
            f = ssims["figures"]
            log.info("== %s vs truth (SSIM/corr/MAE): live %.2f/%.3f/%.3f, iterative "
                     "%.2f/%.3f/%.3f, flat %.2f/0/%.3f; wrote %s", name,
                     *(f["live"][k] for k in ("ssim", "corr", "mae")),
                     *(f["iterative"][k] for k in ("ssim", "corr", "mae")),
                     f["flat"]["ssim"], f["flat"]["mae"], png)
        plot_rounds(out / "ssim_rounds.png", summary["rounds"], results)
        summary["ioc_ms_per_frame"] = float(ioc.nn.execution_time.get())
        summary["ioc_engine"] = str(ioc.nn.engine.get())
        summary["qa"] = {"ssim": float(ioc.qa.ssim.get()), "decision": str(ioc.qa.decision.get())}
        summary["timing"]["tests_s"] = time.perf_counter() - t_tests
        summary["timing"]["total_s"] = time.perf_counter() - t_start
        summary["figures"] = sorted(str(p) for p in out.glob("*.png"))
        (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary
    except (KeyboardInterrupt, RunEngineInterrupted):
        log.warning("interrupted: stopping the HPC worker, the IOC and the detector")
        if RE.state != "idle":
            RE.abort("interrupted")
        _terminate_workers(executor)
        raise KeyboardInterrupt from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        server.stop()
        det.close()


def _base_model() -> str | None:
    """The shipped base model's path, or None (said once) while no GPU run has shipped one."""
    from ptychostream.basemodel import builtin_model_path
    from ptychostream.modelfile import ModelError

    try:
        return str(builtin_model_path())
    except ModelError as exc:
        log.info("the network starts untrained: %s", exc)
        return None


def _terminate_workers(executor) -> None:
    """Stop a local pool's worker now (a reconstruction may run for minutes); a remote
    executor's tasks are left to finish on their endpoint."""
    terminate = getattr(executor, "terminate", None)
    if terminate is not None:
        terminate()


def _set_sample(det, kind: str, seed: int, text: str = ""):
    from bluesky import plan_stubs as bps

    yield from bps.mv(det.sample_kind, kind, det.sample_seed, seed, det.sample_text, text)


def _recon_seconds(record: dict) -> float:
    recon = record.get("recon")
    if not recon:
        return 0.0
    try:
        from ptychostream.hpc import read_reconstruction

        return float(read_reconstruction(recon).seconds)
    except Exception:  # the table is informative only
        return 0.0


def _progress(RE) -> None:
    """A tqdm bar per scan, so progress shows without the best-effort table's one line per point."""
    from tqdm import tqdm

    state: dict = {}

    def cb(name: str, doc: dict) -> None:
        if name == "start" and doc.get("num_points"):
            state["bar"] = tqdm(total=doc["num_points"], desc=doc.get("scan_name", "scan"),
                                unit="frame", leave=False)
            state["streams"] = {}
        elif name == "descriptor":
            state.setdefault("streams", {})[doc["uid"]] = doc["name"]
        elif name == "event" and "bar" in state:
            if state["streams"].get(doc["descriptor"]) == "primary":
                state["bar"].update(1)
        elif name == "stop" and "bar" in state:
            state.pop("bar").close()

    RE.subscribe(cb)
