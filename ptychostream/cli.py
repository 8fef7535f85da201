"""The ``ptychostream`` command: ``ptychostream demo [--quick]``, ``ptychostream pvs``.

EPICS traffic stays on loopback unless the standard EPICS_* variables say otherwise
(:func:`ptychostream.epics_env.use_loopback` keeps values already set).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ptychostream.epics_env import use_loopback

log = logging.getLogger("ptychostream.cli")


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


def build_parser() -> argparse.ArgumentParser:
    from ptychostream.pvnames import DEFAULT_PREFIX

    p = argparse.ArgumentParser(prog="ptychostream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")
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
    return p


def main(argv: list[str] | None = None) -> int:
    use_loopback()
    from ptychostream import setup_logging

    args = build_parser().parse_args(argv)
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
