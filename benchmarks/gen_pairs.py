#!/usr/bin/env python
"""Bulk training pairs of the simulated experiment, written as a training corpus.

    python benchmarks/gen_pairs.py --out corpus --pairs 100000 [--dose-min 2.5e5 --dose-max 6e7]

Each pair is a diffraction frame of a fresh random-feature training area (the W film of
:mod:`ptychostream.simulation`) and its label: the true phase crop, set to 0 outside the beam
and weighted to it (``label_weight``), as :func:`ptychostream.hpc.labels.make_labels` writes
reconstruction labels, so ``ptychostream.hpc.train`` reads them unchanged. Frames are computed
on torch (a GPU when there is one): crop, multiply by the probe, FFT, Poisson. One labels file
per sample map under ``OUT/pairs/``; the manifest is rebuilt from them at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gen_pairs")

#: defaults shared with the base-model recipe
DEFAULTS = {
    "pairs_per_map": 4096,
    "map_px": 2048,
    # network-side photons per frame, log-uniform: from 0.5 ms x10 frames (5.5e5) with room
    # below, to above the 0.4 s dose (4.4e7), so a low-dose frame scaled up is familiar
    "dose_min": 2.5e5,
    "dose_max": 6e7,
    "scaled_fraction": 0.3,  # measured at dose/scale, then multiplied by scale (IntensityScale)
    "scale": 10.0,
}


def write_labels(path: Path, chunk: dict, weight: np.ndarray, pixel_m: float, scan_id: str) -> Path:
    """One labels file (hpc labels format 1) for one chunk of pairs; uncompressed, contiguous:
    written and read at disk speed (a 100k-pair corpus is ~13 GB)."""
    import h5py

    from ptychostream.hpc.labels import LABEL_FORMAT

    n = len(chunk["frames"])
    labels = chunk["labels"] * weight  # 0 rad outside the beam, as make_labels does
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({
            "ptychostream_labels_format": LABEL_FORMAT, "scan_id": scan_id,
            "recon_id": f"truth-{scan_id}", "scan_path": "", "recon_path": "",
            "pixel_size_m": float(pixel_m), "engine": "truth", "created": time.time(),
            "n_pairs": int(n), "sample_seed": int(chunk["sample_seed"]),
        })
        f.create_dataset("frames", data=chunk["frames"])
        f.create_dataset("labels", data=labels.astype(np.float32))
        f.create_dataset("label_weight", data=np.broadcast_to(weight.astype(np.uint8), labels.shape))
        f.create_dataset("positions_m", data=chunk["positions_m"])
        f.create_dataset("photons", data=chunk["photons"])
        f.create_dataset("intensity_scale", data=chunk["intensity_scale"])
    tmp.replace(path)
    return path


def generate_corpus(out: str | Path, n_pairs: int, seed: int = 0, device: str | None = None,
                    batch: int | None = None, cfg=None, **options) -> dict:
    """Write ``n_pairs`` training pairs as a corpus at ``out``; returns counts and rates."""
    from ptychostream.hpc.corpus import Corpus
    from ptychostream.simulation import ExperimentConfig, beam_mask, iter_pairs, make_probe

    opts = {**DEFAULTS, **options}
    cfg = cfg or ExperimentConfig(sample_kind="train")
    out = Path(out)
    probe = make_probe(cfg.frame_size, cfg.object_pixel_m, cfg.energy_ev, cfg.beam_fwhm_m)
    weight = beam_mask(probe).astype(np.float32)
    t0 = time.perf_counter()
    t_sim = 0.0
    files = []
    t = time.perf_counter()
    for chunk in iter_pairs(n_pairs, cfg, photons=(opts["dose_min"], opts["dose_max"]),
                            scaled_fraction=opts["scaled_fraction"], scale=opts["scale"],
                            map_px=opts["map_px"], pairs_per_map=opts["pairs_per_map"],
                            seed=seed, device=device, batch=batch):
        t_sim += time.perf_counter() - t
        scan_id = f"simpairs-s{seed}-m{chunk['map']:04d}"
        files.append(write_labels(out / "pairs" / f"{scan_id}.h5", chunk, weight,
                                  cfg.object_pixel_m, scan_id))
        log.info("pairs: map %d, %d pairs -> %s", chunk["map"], len(chunk["frames"]), files[-1].name)
        t = time.perf_counter()
    corpus = Corpus.rebuild(out)
    seconds = time.perf_counter() - t0
    return {"corpus_dir": str(out), "n_pairs": corpus.n_pairs, "n_files": len(files),
            "seconds": seconds, "simulate_seconds": t_sim,
            "pairs_per_s": n_pairs / seconds, "simulate_pairs_per_s": n_pairs / max(t_sim, 1e-9),
            "device": device or _device(), "seed": seed, **opts}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="corpus folder to write")
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--pairs-per-map", type=int, default=DEFAULTS["pairs_per_map"])
    ap.add_argument("--map-px", type=int, default=DEFAULTS["map_px"], help="sample map side (px)")
    ap.add_argument("--dose-min", type=float, default=DEFAULTS["dose_min"])
    ap.add_argument("--dose-max", type=float, default=DEFAULTS["dose_max"])
    ap.add_argument("--scaled-fraction", type=float, default=DEFAULTS["scaled_fraction"])
    ap.add_argument("--scale", type=float, default=DEFAULTS["scale"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu / cuda (default: a GPU if there is one)")
    ap.add_argument("--batch", type=int, help="pairs per torch batch (default 4096 GPU, 128 CPU)")
    ap.add_argument("--json", help="write the counts and rates here")
    args = ap.parse_args(argv)
    from ptychostream import setup_logging

    setup_logging()
    res = generate_corpus(args.out, args.pairs, seed=args.seed, device=args.device, batch=args.batch,
                          pairs_per_map=args.pairs_per_map, map_px=args.map_px,
                          dose_min=args.dose_min, dose_max=args.dose_max,
                          scaled_fraction=args.scaled_fraction, scale=args.scale)
    print(f"{res['n_pairs']} pairs in {res['seconds']:.1f} s on {res['device']}: "
          f"{res['pairs_per_s']:.0f} pairs/s written, {res['simulate_pairs_per_s']:.0f} pairs/s simulated")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
