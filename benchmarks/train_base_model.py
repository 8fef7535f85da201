#!/usr/bin/env python
"""Train a PtychoNN 2.0 base model on simulated random-feature scans (ground-truth labels),
in rounds, and measure stitched SSIM against the truth after each round.

    python benchmarks/train_base_model.py --out base-model --rounds 3 --epochs 5 [--json r.json]

The base model plays the part of "the previous best checkpoint" that the continual-learning
loop warm-starts from. Labels are the simulation's true phase crops, weighted to the
illuminated region (the frame says nothing about the sample outside the beam). Training uses
``ptychostream.hpc.train`` itself. Evaluation: a held-out random-feature scan and a letters scan
(features never seen in training), inferred with onnxruntime, stitched, SSIM vs truth.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np

from ptychostream import setup_logging
from ptychostream.engines import load_engine
from ptychostream.metrics import phase_ssim
from ptychostream.simulation import make_probe, simulate_scan
from ptychostream.stitch import Stitcher

log = logging.getLogger("train_base_model")


def truth_labels(scan, path: Path) -> Path:
    """A labels file (hpc labels format) whose labels are the true phase crops."""
    n = scan.frame_size
    probe = make_probe(n, scan.object_pixel_size_m, scan.energy_ev, scan.beam_fwhm_m)
    illum = np.abs(probe) ** 2
    weight = (illum >= 0.1 * illum.max()).astype(np.uint8)
    from scipy import ndimage

    weight = ndimage.binary_fill_holes(weight).astype(np.uint8)  # the donut's dim centre counts
    with h5py.File(path, "w") as f:
        f.attrs.update({"ptychostream_labels_format": 1, "scan_id": scan.scan_id,
                        "recon_id": f"truth-{scan.scan_id}", "scan_path": "", "recon_path": "",
                        "pixel_size_m": scan.object_pixel_size_m, "engine": "truth",
                        "created": time.time(), "n_pairs": scan.n_frames})
        f.create_dataset("frames", data=scan.frames, chunks=(1, n, n), compression="gzip")
        labels = scan.truth_crops * weight
        f.create_dataset("labels", data=labels, chunks=(1, n, n), compression="gzip")
        f.create_dataset("label_weight", data=np.broadcast_to(weight, labels.shape),
                         chunks=(1, n, n), compression="gzip")
        f.create_dataset("positions_m", data=scan.positions_m)
    return path


def stitched_ssim(model_path: str, scan, crop: int = 64) -> float:
    """SSIM (data range 1 rad) of the stitched inference against the truth, where stitched."""
    engine = load_engine("onnxruntime", model_path)
    phases = engine.infer(scan.frames)
    st = Stitcher(scan.object_pixel_size_m, crop=crop, positions_m=scan.positions_m)
    st.add_many(phases, scan.positions_m)
    live = st.resample_to(scan.truth_phase.shape, scan.truth_origin_m)
    return phase_ssim(live, scan.truth_phase, data_range=1.0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="base-model", help="work folder")
    ap.add_argument("--scans", type=int, default=5, help="training scans")
    ap.add_argument("--positions", type=int, default=400, help="positions per training scan")
    ap.add_argument("--step-nm", type=float, default=70.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr-max", type=float, default=5e-4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    setup_logging()
    from ptychostream.hpc import corpus_append, train

    out = Path(args.out)
    corpus = out / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.scans):
        scan = simulate_scan(n_positions=args.positions, step_m=args.step_nm * 1e-9, seed=100 + i,
                             sample_kind="train", scan_id=f"base-train-{i}")
        corpus_append(str(corpus), str(truth_labels(scan, out / f"labels-{i}.h5")))
    held_out = simulate_scan(n_positions=150, step_m=args.step_nm * 1e-9, seed=999, sample_kind="train")
    letters = simulate_scan(n_positions=150, step_m=args.step_nm * 1e-9, seed=998, sample_kind="test")

    import torch

    from ptychostream.model import PtychoNN2, export_onnx

    torch.manual_seed(0)
    untrained = str(out / "untrained.onnx")
    export_onnx(PtychoNN2(), untrained)
    rows = [{"round": 0, "epochs": 0, "best_val_loss": float("nan"), "seconds": 0.0,
             "ssim_random_heldout": stitched_ssim(untrained, held_out),
             "ssim_letters": stitched_ssim(untrained, letters)}]
    log.info("untrained: SSIM held-out %.3f, letters %.3f", rows[0]["ssim_random_heldout"],
             rows[0]["ssim_letters"])
    warm = None
    for r in range(args.rounds):
        res = train(str(corpus), str(out / f"round-{r}"), warm_start=warm, epochs=args.epochs,
                    batch_size=args.batch_size, seed=r, threads=args.threads, masked_loss=True,
                    lr_max=args.lr_max, progress=False)
        warm = res["state_dict"]
        row = {"round": r + 1, "epochs": (r + 1) * args.epochs, "best_val_loss": res["best_val_loss"],
               "pairs_per_s": res.get("pairs_per_s"), "seconds": res["seconds"],
               "ssim_random_heldout": stitched_ssim(res["onnx"], held_out),
               "ssim_letters": stitched_ssim(res["onnx"], letters), "onnx": res["onnx"],
               "state_dict": res["state_dict"]}
        rows.append(row)
        log.info("round %d: val %.4f, SSIM held-out %.3f, letters %.3f (%.0f s)", r + 1,
                 row["best_val_loss"], row["ssim_random_heldout"], row["ssim_letters"], row["seconds"])
    print(f"{'round':>5} {'epochs':>6} {'val MAE':>8} {'SSIM random':>12} {'SSIM letters':>13} {'s':>6}")
    for row in rows:
        print(f"{row['round']:>5} {row['epochs']:>6} {row['best_val_loss']:>8.4f} "
              f"{row['ssim_random_heldout']:>12.3f} {row['ssim_letters']:>13.3f} {row['seconds']:>6.0f}")
    result = {"args": vars(args), "rounds": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
