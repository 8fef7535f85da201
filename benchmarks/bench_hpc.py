"""HPC-side throughput: reconstruction frames/s and training pairs/s, beside the paper's figures.

    python benchmarks/bench_hpc.py                       # CPU, pty-chi, small sizes
    python benchmarks/bench_hpc.py --engines ptychi tike --device cuda --positions 963 \
        --step-nm 50 --iterations 500 --pairs 4000 --epochs 2 --json out.json

Reconstruction "frames/s" counts frame-iterations per second (frames x iterations / s), the
figure REFERENCE.md quotes (500 iterations on 963 frames in ~1 min: ~8000 frame-iterations/s,
i.e. 16 scans-worth of frames per second). Training pairs/s counts pairs through forward and
backward per second (REFERENCE.md: 100k pairs x 50 epochs in ~10 min on 8 A100s, ~8300/s).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
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


def bench_reconstruction(work: Path, engine: str, device: str, positions: int, step_m: float,
                         iterations: int, seed: int) -> dict:
    from ptychostream.hpc import make_labels, read_labels, read_reconstruction, reconstruct
    from ptychostream.scanfile import read_scan, write_scan
    from ptychostream.simulation import simulate_scan

    scan_path = work / f"scan-{positions}-{seed}.h5"
    if not scan_path.exists():
        write_scan(scan_path, simulate_scan(n_positions=positions, step_m=step_m, seed=seed))
    t0 = time.perf_counter()
    recon = reconstruct(str(scan_path), str(work / f"recon-{engine}.h5"), engine=engine,
                        iterations=iterations, device=device)
    wall = time.perf_counter() - t0
    rec = read_reconstruction(recon)
    labels = read_labels(make_labels(str(scan_path), recon, str(work / f"labels-{engine}.h5")))
    truth = read_scan(scan_path).truth_crops
    w = labels["label_weight"].astype(bool)
    corr = float(np.corrcoef(labels["labels"][w], truth[w])[0, 1])
    return {
        "engine": engine, "device": device, "frames": positions, "iterations": iterations,
        "step_nm": step_m * 1e9, "seconds": rec.seconds, "wall_s": wall,
        "frame_iterations_per_s": positions * iterations / rec.seconds,
        "label_truth_corr": corr, "label_truth_mae_rad": float(np.mean(np.abs(labels["labels"][w] - truth[w]))),
    }


def bench_training(device: str, pairs: int, batch_size: int, steps: int, threads: int) -> dict:
    """Forward + backward + Adam step of PtychoNN2 on random counts (speed only)."""
    import torch

    from ptychostream.model import PtychoNN2

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PtychoNN2().to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(batch_size, 1, 128, 128, device=device)
    y = torch.rand(batch_size, 1, 128, 128, device=device)
    for _ in range(2):  # warm-up
        opt.zero_grad()
        torch.nn.functional.l1_loss(model(x), y).backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.l1_loss(model(x), y).backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rate = steps * batch_size / dt
    return {"device": device, "batch_size": batch_size, "steps": steps, "pairs_per_s": rate,
            "est_50_epochs_100k_pairs_min": 100_000 * 50 / rate / 60}


def bench_train_function(work: Path, epochs: int, device: str, threads: int, max_pairs: int | None) -> dict:
    """The real train() on the corpus built from the benchmark's labels (includes I/O, split,
    validation, best-model bookkeeping, ONNX export)."""
    from ptychostream.hpc import corpus_append, train

    corpus = work / "corpus"
    for labels in sorted(work.glob("labels-*.h5")):
        corpus_append(str(corpus), str(labels))
    t0 = time.perf_counter()
    r = train(str(corpus), str(work / "model"), epochs=epochs, batch_size=8, max_pairs=max_pairs,
              device=device, threads=threads, progress=False)
    return {"epochs": epochs, "n_pairs": r["n_pairs"], "seconds": r["seconds"],
            "wall_s": time.perf_counter() - t0, "pairs_per_s": r["pairs_per_s"],
            "best_val_loss": r["best_val_loss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["ptychi"], choices=["ptychi", "tike"])
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--positions", type=int, default=100)
    ap.add_argument("--step-nm", type=float, default=100.0)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="training batch")
    ap.add_argument("--steps", type=int, default=10, help="training steps timed")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the real train() run")
    ap.add_argument("--pairs", type=int, default=None, help="max pairs for the train() run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    setup_logging(logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"host": platform.node(), "cpu_threads": args.threads, "device": device,
                     "torch": torch.__version__, "reconstruction": [], "paper": PAPER}
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for engine in args.engines:
            try:
                results["reconstruction"].append(bench_reconstruction(
                    work, engine, device, args.positions, args.step_nm * 1e-9, args.iterations, args.seed))
            except Exception as exc:  # e.g. tike not installed: report, keep going
                log.warning("%s: %s", engine, exc)
                results["reconstruction"].append({"engine": engine, "error": str(exc)})
        results["training_step"] = bench_training(device, 0, args.batch_size, args.steps, args.threads)
        if any("error" not in r for r in results["reconstruction"]):
            results["train_function"] = bench_train_function(work, args.epochs, device, args.threads, args.pairs)

    print(f"\nptychostream HPC benchmark ({device}, {args.threads} CPU threads)")
    print(f"{'what':46s} {'measured':>14s} {'paper':>14s}")
    for r in results["reconstruction"]:
        if "error" in r:
            print(f"{'reconstruction ' + r['engine']:46s} {'error':>14s}  {r['error'][:60]}")
            continue
        what = f"rPIE {r['engine']} {r['frames']} fr x {r['iterations']} it (frame-it/s)"
        print(f"{what:46s} {r['frame_iterations_per_s']:14.0f} {PAPER['recon_frame_iterations_per_s']:14.0f}")
        print(f"{'  seconds / label-truth corr / MAE rad':46s} {r['seconds']:8.1f} s {r['label_truth_corr']:6.3f} {r['label_truth_mae_rad']:6.3f}")
    t = results["training_step"]
    print(f"{'PtychoNN2 fwd+bwd batch ' + str(t['batch_size']) + ' (pairs/s)':46s} {t['pairs_per_s']:14.1f} {PAPER['train_pairs_per_s']:14.0f}")
    print(f"{'  => 50 epochs on 100k pairs (min)':46s} {t['est_50_epochs_100k_pairs_min']:14.0f} {10:14d}")
    if "train_function" in results:
        tf = results["train_function"]
        print(f"{'train() ' + str(tf['n_pairs']) + ' pairs x ' + str(tf['epochs']) + ' epochs (pairs/s)':46s} {tf['pairs_per_s']:14.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
