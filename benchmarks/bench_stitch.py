"""Map-stage benchmark: CPU time per frame of ``Stitcher.add_batch``, the live map's stitching.

Rows: offset registration on/off (``Stitch:RegisterOffsets``) x a map sized from the planned
positions (what the Bluesky device sends) or one that grows as frames arrive. Probe weighting,
the simulated scan's probe, 128x128 phase images in batches as the IOC hands them on. CPU time
of this process (best of ``--repeats``), so a busy machine inflates it less than wall time::

    python benchmarks/bench_stitch.py
    python benchmarks/bench_stitch.py --frames 2000 --batch 16 --json bench-results/stitch.json

The IOC's own figure, with the engine beside it, is bench_pipeline.py's "CPU per frame" rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_stitch")


def run(frames: int, batch: int, repeats: int, threads: int) -> list[dict]:
    import torch

    from ptychostream.simulation import simulate_scan
    from ptychostream.stitch import Stitcher

    torch.set_num_threads(threads)  # as the IOC runs its map stage (refine_threads=1)
    scan = simulate_scan(n_positions=frames, step_m=100e-9, seed=0)
    phases = np.random.default_rng(0).normal(size=(frames, 128, 128)).astype(np.float32)
    pos = scan.positions_m
    rows = []
    for register in (True, False):
        for planned in (True, False):
            best = float("inf")
            for _ in range(repeats):
                st = Stitcher(scan.object_pixel_size_m, 128, weighting="probe", probe=scan.probe,
                              register_offsets=register, positions_m=pos if planned else None)
                t0 = time.process_time()
                for s in range(0, frames, batch):
                    st.add_batch(phases[s:s + batch], pos[s:s + batch])
                best = min(best, time.process_time() - t0)
            rows.append({"register_offsets": register, "planned": planned,
                         "us_per_frame": best / frames * 1e6, "map_shape": list(st.shape)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="frames per add_batch (the IOC's batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.frames, args.batch, args.repeats, args.threads)
    lines = [f"\nStitcher.add_batch: {args.frames} frames of 128x128 in batches of {args.batch}, "
             f"probe weighting, {args.threads} torch thread(s), CPU time, best of {args.repeats}",
             f"{'registration':<14}{'map':<10}{'us/frame':>10}{'map px':>12}"]
    for r in rows:
        lines.append(f"{'on' if r['register_offsets'] else 'off':<14}"
                     f"{'planned' if r['planned'] else 'grows':<10}{r['us_per_frame']:10.0f}"
                     f"{'x'.join(map(str, r['map_shape'])):>12}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"frames": args.frames, "batch": args.batch,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
