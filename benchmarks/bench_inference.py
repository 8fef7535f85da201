#!/usr/bin/env python
"""Inference time per frame (µs) at batch 1, 2, 4, 8, 16 (and 64, 256, 1024 on a GPU) for every
engine and precision on this machine, beside REFERENCE.md's published RTX A6000 and AGX Xavier
figures.

    python benchmarks/bench_inference.py [--engines onnxruntime torch tensorrt] [--json out.json]

Timing: after warm-up, each batch size is run for at least ``--seconds`` and ``--min-calls``
calls; the median call time divided by the batch size is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ptychostream import setup_logging
from ptychostream.engines import available_engines, make_engine
from ptychostream.model import PtychoNN2, state_dict_bytes

log = logging.getLogger("bench_inference")

BATCHES = (1, 2, 4, 8, 16)
# REFERENCE.md, "inference time per frame", µs per frame at batch 1/2/4/8/16
PUBLISHED = {
    "RTX A6000 (TensorRT, published)": dict(zip(BATCHES, (370, 220, 130, 90, 70), strict=True)),
    "AGX Xavier (TensorRT, published)": dict(zip(BATCHES, (2300, 1360, 960, 850, 680), strict=True)),
}


def time_engine(engine, batch: int, seconds: float, min_calls: int) -> float:
    """Median µs per frame over repeated calls of one batch."""
    rng = np.random.default_rng(batch)
    frames = rng.poisson(50, (batch, 128, 128)).astype(np.uint32)
    for _ in range(3):
        engine.infer(frames)
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        engine.infer(frames)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch * 1e6


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def variants(engines: list[str]) -> list[tuple[str, dict]]:
    """Every precision of every engine: torch fp32 / bf16 (and on a GPU fp16, with and without
    CUDA graphs); onnxruntime and TensorRT as they come."""
    out: list[tuple[str, dict]] = []
    for name in engines:
        if name != "torch":
            out.append((name, {}))
            continue
        if cuda_available():
            out += [("torch", {"precision": "fp32", "cuda_graphs": False,
                               "channels_last": False}),
                    ("torch", {"precision": "fp16", "cuda_graphs": False}),
                    ("torch", {"precision": "fp16"}), ("torch", {"precision": "bf16"})]
        else:
            out += [("torch", {"precision": "fp32"}), ("torch", {"precision": "bf16"})]
    return out


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="*", default=None, help="engines to time (default: all available)")
    ap.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timing per batch size")
    ap.add_argument("--min-calls", type=int, default=10)
    ap.add_argument("--model", help="model file (ONNX or state dict); default: untrained PtychoNN 2.0")
    ap.add_argument("--no-large-batches", action="store_true",
                    help="on a GPU, do not add batches 64, 256 and 1024")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    setup_logging()

    if args.model:
        model_bytes = Path(args.model).read_bytes()
    else:
        import torch

        torch.manual_seed(0)
        model_bytes = state_dict_bytes(PtychoNN2())
    engines = args.engines or available_engines()
    batches = list(args.batches)
    if cuda_available() and not args.no_large_batches:  # where a GPU's best batch lies
        batches += [b for b in (64, 256, 1024) if b not in batches]
    args.batches = batches
    results: dict[str, dict[int, float]] = {}
    for name, kwargs in variants(engines):
        try:
            engine = make_engine(name, model_bytes, **kwargs)  # state dicts become ONNX as needed
        except Exception as exc:  # an engine that cannot start here is reported, not fatal
            log.warning("engine %s %s unavailable: %s", name, kwargs or "", exc)
            continue
        label = f"{engine.describe()} (this machine)"
        results[label] = {}
        for b in args.batches:
            results[label][b] = time_engine(engine, b, args.seconds, args.min_calls)
            log.info("%s batch %d: %.0f µs/frame", label, b, results[label][b])

    rows = {**results, **PUBLISHED}
    width = max(len(k) for k in rows) + 2
    header = "engine".ljust(width) + "".join(f"{'batch ' + str(b):>11}" for b in args.batches)
    print(f"\nPtychoNN 2.0 inference, µs per frame (128x128) — {machine()}")
    print(header)
    print("-" * len(header))
    for name, per in rows.items():
        print(name.ljust(width) + "".join(f"{per.get(b, float('nan')):>11.0f}" for b in args.batches))
    for name, per in results.items():
        best = min(per.values())
        print(f"{name}: best {best:.0f} µs/frame = {1e6 / best:.0f} frames/s")

    out = {
        "machine": machine(),
        "unit": "microseconds per frame",
        "batches": args.batches,
        "measured": {k: {str(b): v for b, v in per.items()} for k, per in results.items()},
        "published": {k: {str(b): v for b, v in per.items()} for k, per in PUBLISHED.items()},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        log.info("wrote %s", args.json)
    return out


if __name__ == "__main__":
    main()
