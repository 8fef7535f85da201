"""HPC-side throughput and accuracy beside the paper's figures: reconstruction, labels, training.

    python benchmarks/bench_hpc.py --threads 1                       # CPU here, small sizes
    python benchmarks/bench_hpc.py --device cuda --positions 963 --step-nm 50 --iterations 500 \\
        --concurrent 2 --train-pairs 20000 --train-epochs 5 --out results/   # one GPU, < 8 min

Reconstruction "frame-iterations/s" is frames x iterations / s, the figure REFERENCE.md quotes
(500 iterations on 963 frames in ~1 min: ~8,000 frame-iterations/s), with the labels' correlation
and MAE against the simulation's truth. ``--concurrent N`` reconstructs N scans at once on the
same device (``reconstruct_many``) and reports the aggregate rate. Training pairs/s counts pairs
through forward and backward per second (REFERENCE.md: 100k pairs x 50 epochs in ~10 min on 8
A100s, ~8,300 pairs/s): the bare training step over a grid of batch / precision / memory format,
and the real ``train()`` end to end on a corpus of ``--train-pairs`` simulated pairs.

Tike and pty-chi cannot share an environment (numpy 1 vs 2): run this with ``--engines tike
--scan S --out A`` in the endpoint's environment, then ``--engines ptychi --scan S
--compare-with A/recon-tike.h5`` here; the comparison (SSIM of the two phase maps on their common
well-illuminated region, correlation and MAE of the label sets) is in the table and the JSON.
With ``--out DIR`` the JSON (bench_hpc.json), the table (bench_hpc.txt) and the reconstruction
files (recon-*.h5) are written there; scans, labels and the training corpus stay in a temporary
folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ptychostream import setup_logging

log = logging.getLogger("bench_hpc")

PAPER = {
    "recon_frame_iterations_per_s": 500 * 963 / 60.0,
    "train_pairs_per_s": 100_000 * 50 / 600.0,
}


def make_scan(work: Path, positions: int, step_m: float, seed: int) -> Path:
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    path = work / f"scan-{positions}-{step_m * 1e9:.0f}nm-{seed}.h5"
    if not path.exists():
        write_scan(path, simulate_scan(n_positions=positions, step_m=step_m, seed=seed))
    return path


def _label_truth(scan_path: Path, recon: str, labels_path: Path) -> dict:
    from ptychostream.hpc import make_labels, read_labels
    from ptychostream.scanfile import read_scan

    labels = read_labels(make_labels(str(scan_path), recon, str(labels_path)))
    truth = read_scan(scan_path).truth_crops
    if truth is None:
        return {}
    w = labels["label_weight"].astype(bool)
    return {"label_truth_corr": float(np.corrcoef(labels["labels"][w], truth[w])[0, 1]),
            "label_truth_mae_rad": float(np.mean(np.abs(labels["labels"][w] - truth[w])))}


def bench_reconstruction(work: Path, keep: Path, scan_path: Path, engine: str, device: str,
                         iterations: int, preset: str | None) -> dict:
    from ptychostream.hpc import read_reconstruction, reconstruct
    from ptychostream.scanfile import read_scan

    opts = {"preset": preset} if preset and engine == "ptychi" else {}
    tag = f"{engine}{'-' + preset if preset else ''}"
    t0 = time.perf_counter()
    recon = reconstruct(str(scan_path), str(keep / f"recon-{tag}.h5"), engine=engine,
                        iterations=iterations, device=device, **opts)
    wall = time.perf_counter() - t0
    rec = read_reconstruction(recon)
    frames = read_scan(scan_path, frames=False).n_frames
    return {
        "engine": engine, "preset": preset, "device": device, "frames": frames,
        "iterations": iterations, "seconds": rec.seconds, "wall_s": wall, "recon": recon,
        "frame_iterations_per_s": frames * iterations / rec.seconds,
        "settings": json.loads(rec.attrs.get("settings", "{}")),
        **_label_truth(scan_path, recon, work / f"labels-{tag}.h5"),
    }


def bench_concurrent(work: Path, scan_path: Path, n: int, device: str, iterations: int) -> dict:
    """N copies of the scan reconstructed at once (reconstruct_many) on the same device."""
    from ptychostream.hpc import reconstruct_many
    from ptychostream.scanfile import read_scan

    copies = []
    for i in range(n):
        p = work / f"concurrent-{i}.h5"
        shutil.copyfile(scan_path, p)
        copies.append(str(p))
    t0 = time.perf_counter()
    reconstruct_many(copies, str(work / "concurrent"), workers=n, iterations=iterations, device=device)
    wall = time.perf_counter() - t0
    frames = read_scan(scan_path, frames=False).n_frames
    return {"scans": n, "iterations": iterations, "wall_s": wall,
            "aggregate_frame_iterations_per_s": n * frames * iterations / wall}


def bench_training_step(device: str, batch_size: int, steps: int, amp: str | None,
                        channels_last: bool, compile_: bool = False) -> dict:
    """Forward + backward + Adam of PtychoNN 2.0 on resident random data (speed only)."""
    import torch

    from ptychostream.hpc.train import init_weights
    from ptychostream.model import PtychoNN2

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = PtychoNN2()
    init_weights(model)
    model = model.to(device, memory_format=fmt)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), 1e-4, **({"fused": True} if cuda else {}))
    x = torch.rand(batch_size, 1, 128, 128, device=device).contiguous(memory_format=fmt)
    y = torch.rand(batch_size, 1, 128, 128, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    scaler = torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None
    if cuda:
        torch.backends.cudnn.benchmark = True

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            pred = net(x)
        loss = torch.nn.functional.l1_loss(pred.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    t_warm = time.perf_counter()
    for _ in range(3 if not compile_ else 5):  # warm-up (cuDNN autotuning, compilation)
        step()
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rate = steps * batch_size / dt
    return {"device": device, "batch_size": batch_size, "amp": amp, "channels_last": channels_last,
            "compile": compile_, "steps": steps, "pairs_per_s": rate, "warmup_s": warm,
            "est_50_epochs_100k_pairs_min": 100_000 * 50 / rate / 60}


def make_corpus(work: Path, pairs: int, seed: int) -> Path:
    """A corpus of about ``pairs`` simulated pairs: one scan's frames with its truth crops as
    labels (the beam area as weight), appended under distinct scan ids (speed only needs the
    size; no reconstruction)."""
    import h5py

    from ptychostream.hpc import corpus_append
    from ptychostream.scanfile import read_scan

    scan = read_scan(make_scan(work, min(pairs, 963), 50e-9, seed))
    n = scan.n_frames
    r = np.hypot(*np.meshgrid(np.arange(128) - 63.5, np.arange(128) - 63.5))
    weight = np.broadcast_to((r < 45).astype(np.uint8), (n, 128, 128))
    corpus = work / "corpus"
    src = work / "pairs.h5"
    for i in range(int(np.ceil(pairs / n))):
        with h5py.File(src, "w") as f:
            f.attrs.update({"ptychostream_labels_format": 1, "scan_id": f"bench-{i}",
                            "recon_id": f"truth-{i}", "n_pairs": n})
            f["frames"] = scan.frames
            f["labels"] = scan.truth_crops.astype(np.float32)
            f["label_weight"] = weight
            f["positions_m"] = scan.positions_m
        corpus_append(str(corpus), str(src))
    return corpus


def bench_train_function(work: Path, corpus: Path, epochs: int, batch_size: int, device: str,
                         threads: int, max_pairs: int | None, **options) -> dict:
    """The real train() (resident pairs, split, validation, best-model bookkeeping, export)."""
    from ptychostream.hpc import train

    t0 = time.perf_counter()
    r = train(str(corpus), str(work / "model"), epochs=epochs, batch_size=batch_size,
              max_pairs=max_pairs, device=device, threads=threads, progress=False,
              masked_loss=True, **options)
    return {"epochs": epochs, "batch_size": batch_size, "n_pairs": r["n_pairs"],
            "seconds": r["seconds"], "wall_s": time.perf_counter() - t0,
            "pairs_per_s": r["pairs_per_s"], "best_val_loss": r["best_val_loss"],
            "runtime": r["runtime"], "options": options}


def _step_grid(device: str, batches: list[int] | None) -> list[dict]:
    if device.startswith("cuda"):
        batches = batches or [256, 1024]
        return [{"batch_size": b, "amp": amp, "channels_last": cl}
                for b in batches for amp in (None, "bf16") for cl in (False, True)]
    batches = batches or [16, 64]
    return [{"batch_size": b, "amp": None, "channels_last": cl} for b in batches for cl in (False, True)]


def format_table(results: dict) -> str:
    lines = [f"ptychostream HPC benchmark ({results['device']}, {results['cpu_threads']} CPU threads"
             f"{', ' + results['gpu'] if 'gpu' in results else ''})",
             f"{'what':58s} {'measured':>12s} {'paper':>10s}"]
    paper_r, paper_t = PAPER["recon_frame_iterations_per_s"], PAPER["train_pairs_per_s"]
    for r in results["reconstruction"]:
        if "error" in r:
            lines.append(f"{'rPIE ' + r['engine']:58s} {'error':>12s}  {r['error'][:70]}")
            continue
        what = f"rPIE {r['engine']} {r['preset'] or ''} {r['frames']} fr x {r['iterations']} it (frame-it/s)"
        lines.append(f"{what:58s} {r['frame_iterations_per_s']:12.0f} {paper_r:10.0f}")
        s = r["settings"]
        extra = f"batch {s.get('batch_size', s.get('num_batch', '?'))}"
        lines.append(f"{'  seconds; labels vs truth corr / MAE rad; ' + extra:58s} {r['seconds']:10.1f} s"
                     f"  {r.get('label_truth_corr', float('nan')):.3f} / {r.get('label_truth_mae_rad', float('nan')):.3f}")
    if "concurrent" in results:
        c = results["concurrent"]
        lines.append(f"{str(c['scans']) + ' scans at once, aggregate (frame-it/s)':58s} "
                     f"{c['aggregate_frame_iterations_per_s']:12.0f} {paper_r:10.0f}")
    for c in results.get("comparisons", []):
        if "error" in c:
            lines.append(f"{'labels ' + c.get('what', '')[:50]:58s} {'error':>12s}  {c['error'][:70]}")
            continue
        what = f"{c['a']['engine']} vs {c['b']['engine']}: SSIM map / label corr / MAE"
        lines.append(f"{what:58s} {c['ssim']:6.3f} {c['label_corr']:6.3f} {c['label_mae_rad']:6.3f}")
    for t in results.get("training_step", []):
        what = (f"PtychoNN2 step batch {t['batch_size']} {t['amp'] or 'fp32'}"
                f"{' channels_last' if t['channels_last'] else ''}{' compiled' if t['compile'] else ''} (pairs/s)")
        lines.append(f"{what:58s} {t['pairs_per_s']:12.1f} {paper_t:10.0f}")
    if "train_function" in results:
        tf = results["train_function"]
        rt = tf["runtime"]
        what = (f"train() {tf['n_pairs']} pairs x {tf['epochs']} ep, batch {tf['batch_size']}, "
                f"{rt['amp'] or 'fp32'} (pairs/s)")
        lines.append(f"{what:58s} {tf['pairs_per_s']:12.1f} {paper_t:10.0f}")
        lines.append(f"{'  => 10 M pair-passes (base model) in (min)':58s} {1e7 / tf['pairs_per_s'] / 60:12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["ptychi"], choices=["ptychi", "tike"])
    ap.add_argument("--presets", nargs="+", default=[None], help="pty-chi presets to run (cpu, gpu; "
                    "default: the device's)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--scan", type=Path, default=None, help="an existing scan file (else simulated)")
    ap.add_argument("--positions", type=int, default=100)
    ap.add_argument("--step-nm", type=float, default=100.0)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=0, help="also N scans at once (reconstruct_many)")
    ap.add_argument("--compare-with", type=Path, nargs="*", default=[],
                    help="reconstruction files of the same scan (e.g. Tike's) to compare labels with")
    ap.add_argument("--step-batches", type=int, nargs="*", default=None, help="training-step batches")
    ap.add_argument("--steps", type=int, default=10, help="training steps timed per configuration")
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    ap.add_argument("--train-pairs", type=int, default=0, help="train() on this many pairs (0: skip)")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=None, help="train() batch (default 1024 GPU, 32 CPU)")
    ap.add_argument("--skip-recon", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="folder for JSON, table and files")
    args = ap.parse_args(argv)
    setup_logging(logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"host": platform.node(), "cpu_threads": args.threads, "device": device,
                     "torch": torch.__version__, "numpy": np.__version__, "reconstruction": [],
                     "paper": PAPER, "argv": argv}
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    tmp = tempfile.TemporaryDirectory()  # scans, labels, corpus: large, never in --out
    work = Path(tmp.name)
    keep = args.out or work  # reconstructions (a few MB each): kept with --out, for --compare-with
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    try:
        scan = args.scan or make_scan(work, args.positions, args.step_nm * 1e-9, args.seed)
        if not args.skip_recon:
            for engine in args.engines:
                for preset in (args.presets if engine == "ptychi" else [None]):
                    try:
                        results["reconstruction"].append(
                            bench_reconstruction(work, keep, scan, engine, device, args.iterations, preset))
                    except Exception as exc:  # e.g. tike not in this environment: report, go on
                        log.warning("%s: %s", engine, exc)
                        results["reconstruction"].append({"engine": engine, "error": str(exc)})
            done = [r for r in results["reconstruction"] if "error" not in r]
            pairs = [(done[i]["recon"], done[j]["recon"]) for i in range(len(done))
                     for j in range(i + 1, len(done)) if done[i]["engine"] != done[j]["engine"]]
            pairs += [(str(other), d["recon"]) for other in args.compare_with for d in done]
            if pairs:
                from ptychostream.hpc import compare_reconstructions

                results["comparisons"] = []
                for a, b in pairs:
                    try:
                        results["comparisons"].append(compare_reconstructions(str(scan), a, b))
                    except Exception as exc:
                        results["comparisons"].append({"what": f"{a} vs {b}", "error": str(exc)})
            if args.concurrent:
                results["concurrent"] = bench_concurrent(work, scan, args.concurrent, device, args.iterations)
        results["training_step"] = [bench_training_step(device, steps=args.steps, **g)
                                    for g in _step_grid(device, args.step_batches)]
        if args.compile:
            best = max(results["training_step"], key=lambda t: t["pairs_per_s"])
            results["training_step"].append(bench_training_step(
                device, best["batch_size"], args.steps, best["amp"], best["channels_last"], True))
        if args.train_pairs:
            corpus = make_corpus(work, args.train_pairs, args.seed)
            batch = args.train_batch or (1024 if device.startswith("cuda") else 32)
            results["train_function"] = bench_train_function(
                work, corpus, args.train_epochs, batch, device, args.threads, args.train_pairs)
    finally:
        tmp.cleanup()
    table = format_table(results)
    print("\n" + table)
    if args.out:
        (args.out / "bench_hpc.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "bench_hpc.txt").write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
