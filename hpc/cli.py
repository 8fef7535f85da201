"""``ptychostream-hpc``: the HPC functions from a shell (one step each, JSON result on stdout).

    ptychostream-hpc reconstruct scan.h5 recon.h5 --iterations 50
    ptychostream-hpc labels scan.h5 recon.h5 labels.h5
    ptychostream-hpc append corpus/ labels.h5
    ptychostream-hpc train corpus/ model/ --epochs 50 [--warm-start model/model.pt]
    ptychostream-hpc validate model/model.onnx scan.h5 recon.h5
    ptychostream-hpc compare scan.h5 tike.recon.h5 ptychi.recon.h5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ptychostream import setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ptychostream-hpc", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("reconstruct", help="rPIE reconstruction of a scan file")
    p.add_argument("scan")
    p.add_argument("out")
    p.add_argument("--engine", default="ptychi", choices=["ptychi", "tike"])
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--probe-modes", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--preset", default=None, choices=["cpu", "gpu"], help="pty-chi settings (default: by device)")
    p.add_argument("--num-batch", type=int, default=None, help="minibatches per epoch")
    p = sub.add_parser("labels", help="training labels from a scan and its reconstruction")
    p.add_argument("scan")
    p.add_argument("recon")
    p.add_argument("out")
    p = sub.add_parser("append", help="append a labels file to a corpus folder")
    p.add_argument("corpus")
    p.add_argument("labels")
    p = sub.add_parser("train", help="train PtychoNN 2.0 on a corpus")
    p.add_argument("corpus")
    p.add_argument("out")
    p.add_argument("--warm-start", default=None)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p = sub.add_parser("validate", help="SSIM of a model against a reconstruction")
    p.add_argument("model")
    p.add_argument("scan")
    p.add_argument("recon")
    p.add_argument("--max-frames", type=int, default=None)
    p = sub.add_parser("compare", help="agreement of two reconstructions of one scan (e.g. Tike vs pty-chi)")
    p.add_argument("scan")
    p.add_argument("recon_a")
    p.add_argument("recon_b")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    from . import corpus_append, make_labels, reconstruct, train, validate
    from .compare import compare_reconstructions

    try:
        if args.cmd == "reconstruct":
            extra = {k: v for k, v in (("threads", args.threads), ("preset", args.preset),
                                       ("num_batch", args.num_batch)) if v}
            result = reconstruct(args.scan, args.out, engine=args.engine, iterations=args.iterations,
                                 probe_modes=args.probe_modes, device=args.device, **extra)
        elif args.cmd == "labels":
            result = make_labels(args.scan, args.recon, args.out)
        elif args.cmd == "append":
            result = corpus_append(args.corpus, args.labels)
        elif args.cmd == "train":
            result = train(args.corpus, args.out, warm_start=args.warm_start, epochs=args.epochs,
                           batch_size=args.batch_size, seed=args.seed, max_pairs=args.max_pairs,
                           device=args.device, threads=args.threads)
        elif args.cmd == "compare":
            result = compare_reconstructions(args.scan, args.recon_a, args.recon_b)
        else:
            result = validate(args.model, args.scan, args.recon, max_frames=args.max_frames)
    except (ValueError, RuntimeError, OSError) as exc:
        log.error("%s failed: %s", args.cmd, exc)
        return 1
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
