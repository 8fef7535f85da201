"""What one NTNDArray update costs the server that posts it, by image size and subscriber count.

The IOC posts every phase image on NN:Phase; on a GPU at 20 kHz this, not inference, sets the
limit. Measured here: the CPU time of building each update from a frame
(``ntndarray.to_value``, and p4p's ``NTNDArray.wrap`` beside it); CPU seconds of the posting
process (all its threads: p4p, pvxs's serialisation and the kernel's loopback TCP) per
update, and the wall time of ``post()``, with 0 or N subscribers in other processes, each
asking for every update::

    python benchmarks/bench_pva_post.py [--sizes 16 128 256] [--subscribers 0 1 2] [--json out.json]

Posts are paced in bursts (as the IOC's publisher posts a batch at a time) so the
subscribers keep up; each subscriber checks that it received every update.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

log = logging.getLogger("bench_pva_post")

SUBSCRIBER = textwrap.dedent("""
    import sys, threading, time
    from p4p.client.thread import Context
    n, got, first = int(sys.argv[2]), [0], threading.Event()
    def cb(v):
        got[0] += 1
        first.set()
    sub = Context("pva").monitor(sys.argv[1], cb, request="record[queueSize=100000]")
    first.wait(30)
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[3])
    while got[0] < n + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    print(got[0] - 1, flush=True)
""")


def encode_us(encode, frame, n: int = 1000) -> float:
    """CPU µs to build one update from a Frame (warm: the first few are not counted)."""
    from ptychostream.ntndarray import Frame

    frames = [Frame(frame.data, i + 2, frame.timestamp, frame.attributes) for i in range(n)]
    for f in frames[:20]:
        encode(f)
    cpu0 = time.process_time()
    for f in frames:
        encode(f)
    return (time.process_time() - cpu0) / n * 1e6


def measure(size: int, n_subs: int, n: int, burst: int) -> dict:
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    from ptychostream.ntndarray import Frame, _wrapped, to_value

    name = f"BENCHPOST{size}x{n_subs}:Phase"
    frame = Frame(np.random.default_rng(0).random((size, size)).astype(np.float32), 1,
                  time.time(), {"PosX": 1e-6, "PosY": 2e-6, "ModelVersion": 1})
    pv = SharedPV(initial=to_value(frame))
    with Server(providers=[{name: pv}]):
        subs = [subprocess.Popen([sys.executable, "-c", SUBSCRIBER, name, str(n), "120"],
                                 stdout=subprocess.PIPE, text=True) for _ in range(n_subs)]
        for s in subs:
            assert s.stdout.readline().strip() == "ready", "a subscriber did not connect"
        encode, wrap = (encode_us(fn, frame) for fn in (to_value, lambda f: _wrapped(f, f.data)))
        values = [to_value(Frame(frame.data, i + 2, frame.timestamp, frame.attributes))
                  for i in range(burst)]
        cpu0, wall_post = time.process_time(), 0.0
        for _ in range(n // burst):
            t = time.perf_counter()
            for v in values:
                pv.post(v)
            wall_post += time.perf_counter() - t
            time.sleep(2e-4 * burst)  # let the subscribers keep up
        cpu = time.process_time() - cpu0
        received = [int(s.stdout.readline() or -1) for s in subs]
        for s in subs:
            s.wait(10)
    posted = (n // burst) * burst
    return {"size": size, "subscribers": n_subs, "posted": posted, "received": received,
            "cpu_us_per_update": cpu / posted * 1e6, "encode_us_per_update": encode,
            "p4p_wrap_us_per_update": wrap,
            "post_wall_us_per_update": wall_post / posted * 1e6,
            "mb_per_update": size * size * 4 / 2**20}


def isolate() -> None:
    """Loopback and ports of its own (inherited by the subscribers), before p4p loads."""
    from ptychostream.epics_env import free_port, use_loopback

    use_loopback(force=True)
    tcp, udp = free_port(), free_port()
    os.environ.update({"EPICS_PVA_SERVER_PORT": str(tcp), "EPICS_PVAS_SERVER_PORT": str(tcp),
                       "EPICS_PVA_BROADCAST_PORT": str(udp),
                       "EPICS_PVAS_BROADCAST_PORT": str(udp)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 256])
    ap.add_argument("--subscribers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--updates", type=int, default=4096)
    ap.add_argument("--burst", type=int, default=16, help="updates posted back to back")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    from ptychostream import setup_logging

    setup_logging(logging.WARNING)
    isolate()
    rows = [measure(size, k, a.updates, a.burst) for size in a.sizes for k in a.subscribers]
    print(f"\nNTNDArray float32 updates posted by one p4p SharedPV, {a.updates} each, bursts of "
          f"{a.burst}")
    print(f"{'image':>9}{'subscribers':>13}{'encode us':>11}{'(p4p wrap)':>11}{'CPU us/update':>15}"
          f"{'post() us':>11}{'max updates/s/core':>20}  received")
    for r in rows:
        rate = 1e6 / r["cpu_us_per_update"] if r["cpu_us_per_update"] > 0 else float("inf")
        print(f"{r['size']:>5}x{r['size']:<3}{r['subscribers']:>13}{r['encode_us_per_update']:>11.0f}"
              f"{r['p4p_wrap_us_per_update']:>11.0f}"
              f"{r['cpu_us_per_update']:>15.0f}"
              f"{r['post_wall_us_per_update']:>11.0f}{rate:>20.0f}  {r['received']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
