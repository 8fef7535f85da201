"""The ``ptychostream`` command.

    ptychostream demo [--quick]                      the whole loop on simulated data (loopback)
    ptychostream deploy PTYCHO: model.onnx           send a model to a running IOC
    ptychostream export best.pt best.onnx --batch-size 8
    ptychostream import auto scan.cxi scan.h5        CXI, ptychodus, PtychoShelves, Tike -> scan file
    ptychostream pvs                                 the PV table

EPICS traffic follows the host's EPICS_* environment, as any EPICS client does; ``--loopback``
keeps it on 127.0.0.1 (the demo always does). Heavy libraries (torch, onnxruntime, p4p) load
only in the command that needs them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("ptychostream.cli")

#: exit statuses besides 0 and argparse's 2
REFUSED, UNREACHABLE, BAD_INPUT = 1, 3, 4


def _demo(args: argparse.Namespace) -> int:
    from ptychostream.bluesky_plans.demo import format_table, run_demo

    summary = run_demo(args.out, quick=args.quick, prefix=args.prefix, table=args.table)
    print()
    print(format_table(summary))
    print()
    print(f"figures: {', '.join(summary['figures'])}")
    print(f"summary: {args.out}/demo.json")
    return 0


def _pvs(args: argparse.Namespace) -> int:
    from ptychostream.pvnames import PVS

    for suffix, spec in PVS.items():
        access = "rw" if spec.writable else "ro"
        ca = "CA+PVA" if spec.ca else "PVA"
        print(f"{args.prefix}{suffix:<28} {spec.kind:<9} {access} {ca:<6} {spec.doc}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    """Put the model to $(P)NN:Model; the IOC answers when it has validated it."""
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return BAD_INPUT
    from ptychostream.ioc.client import deploy_model
    from ptychostream.model import ModelError

    name = args.name or path.name
    try:
        version = deploy_model(args.prefix, data, name=name, timeout=args.timeout)
    except ModelError as exc:
        print(f"{args.prefix}NN:Model refused {name}: {exc}", file=sys.stderr)
        return REFUSED
    except TimeoutError:
        print(f"no answer from {args.prefix}NN:Model within {args.timeout:g} s: is the IOC "
              f"running with --prefix {args.prefix}, and reachable (EPICS_PVA_ADDR_LIST)?",
              file=sys.stderr)
        return UNREACHABLE
    print(f"{args.prefix}: serving {name} as model version {version}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """A PyTorch state dict (PtychoNN 2.0 module names) to ONNX."""
    from ptychostream.model import ModelError, export_onnx, load_state_dict

    src = Path(args.state_dict)
    if not src.exists():
        print(f"{src} does not exist", file=sys.stderr)
        return BAD_INPUT
    try:
        model = load_state_dict(src)
    except ModelError as exc:
        print(f"{src}: {exc}", file=sys.stderr)
        return BAD_INPUT
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, args.out, batch_size=args.batch_size)
    batch = f"batch {args.batch_size}" if args.batch_size else "dynamic batch"
    print(f"wrote {args.out} ({batch}, 1x128x128 in and out)")
    return 0


def _import(args: argparse.Namespace) -> int:
    """Another package's scan file to ours (checked: centring, units)."""
    from ptychostream.importers import Geometry, convert
    from ptychostream.scanfile import ScanFileError, read_scan

    geo = Geometry(energy_ev=args.energy_ev, distance_m=args.distance_m,
                   detector_pixel_m=args.detector_pixel_m, object_pixel_m=args.object_pixel_m,
                   beam_fwhm_m=args.beam_fwhm_m, exposure_s=args.exposure_s,
                   scan_id=args.scan_id)
    try:
        out = convert(args.input, args.output, args.format, geo, diffraction=args.diffraction,
                      positions=args.positions, data_path=args.data_path)
        scan = read_scan(out, frames=False)
    except ScanFileError as exc:
        print(str(exc), file=sys.stderr)
        return BAD_INPUT
    print(f"wrote {out}: {scan.n_frames} frames of {scan.frame_size if scan.frames.size else '?'}"
          f" px, object pixel {scan.object_pixel_size_m * 1e9:.2f} nm, step "
          f"{scan.step_m * 1e9:.0f} nm, {scan.energy_ev / 1e3:.2f} keV")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ptychostream.pvnames import DEFAULT_PREFIX

    p = argparse.ArgumentParser(prog="ptychostream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")
    p.add_argument("--loopback", action="store_true",
                   help="keep EPICS traffic on 127.0.0.1 (sets the EPICS_* variables not set)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole loop on simulated data (detector, IOC, HPC)")
    d.add_argument("--quick", action="store_true", help="the same story, small (under a minute on 2 cores)")
    d.add_argument("--out", default="demo-output", help="folder for figures, table and data")
    d.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"IOC PV prefix (default {DEFAULT_PREFIX})")
    d.add_argument("--table", action="store_true",
                   help="print the best-effort callback's table (one line per frame)")
    d.set_defaults(func=_demo)

    v = sub.add_parser("pvs", help="print the PV table")
    v.add_argument("--prefix", default=DEFAULT_PREFIX)
    v.set_defaults(func=_pvs)

    m = sub.add_parser("deploy", help="send a model (ONNX or state dict) to a running IOC",
                       description="Write FILE to PREFIX NN:Model. Prints the version now "
                       "serving; exits 1 with the IOC's reason if it refuses the model (the old "
                       "one keeps serving), 3 if no IOC answers.")
    m.add_argument("prefix", help=f"the IOC's PV prefix, e.g. {DEFAULT_PREFIX}")
    m.add_argument("file", help="model file: ONNX, or a PyTorch state dict of PtychoNN 2.0")
    m.add_argument("--name", help="name the IOC shows (default: the file name)")
    m.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    m.set_defaults(func=_deploy)

    e = sub.add_parser("export", help="turn a PyTorch state dict into ONNX")
    e.add_argument("state_dict", help="PtychoNN 2.0 state dict (.pt/.pth, or a checkpoint)")
    e.add_argument("out", help="ONNX file to write")
    e.add_argument("--batch-size", type=int, default=None,
                   help="fixed batch dimension (as the published 8x1x128x128 files); "
                        "default dynamic")
    e.set_defaults(func=_export)

    i = sub.add_parser("import", help="convert a CXI, ptychodus, PtychoShelves or Tike scan",
                       description="Convert INPUT to a ptychostream scan file OUTPUT. Frames are "
                       "centred (zero frequency found from the data), lengths checked for unit "
                       "mistakes; what the format lacks comes from the options. See "
                       "ptychostream.importers for each format's layout.")
    i.add_argument("format", choices=["auto", "cxi", "ptychodus", "ptychoshelves", "tike"])
    i.add_argument("input")
    i.add_argument("output")
    i.add_argument("--diffraction", help="ptychodus: the diffraction file the product indexes")
    i.add_argument("--data-path", help="ptychodus: frames' dataset in --diffraction")
    i.add_argument("--positions", help="PtychoShelves: the para file (default: beside the dp)")
    for flag, what in (("--energy-ev", "photon energy (eV)"),
                       ("--distance-m", "sample-detector distance (m)"),
                       ("--detector-pixel-m", "detector pixel size (m)"),
                       ("--object-pixel-m", "object pixel size (m)"),
                       ("--beam-fwhm-m", "beam size (m, default 800e-9)"),
                       ("--exposure-s", "exposure per frame (s)")):
        i.add_argument(flag, type=float, help=what)
    i.add_argument("--scan-id", help="scan id (default: from the file or its name)")
    i.set_defaults(func=_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.loopback:
        from ptychostream.epics_env import use_loopback

        use_loopback()
    from ptychostream import setup_logging

    setup_logging(args.log_level)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except BrokenPipeError:  # output piped into `head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
