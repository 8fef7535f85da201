"""Simulated detector: publishes diffraction frames as NTNDArray, as an areaDetector PVA plugin does.

``FramePublisher`` is the reusable piece (one PV on its own p4p server); ``SimDetector`` streams a
scan (simulated, or read from a scan file) through it at a chosen frame rate with the attributes
PosX/PosY (m) and PixelSize (object pixel, m) the IOC's stitcher uses.

    ptychostream-sim-detector --pv 13SIM1:Pva1:Image --n-positions 200 --rate 100
    ptychostream-sim-detector --pv 13SIM1:Pva1:Image --scan-file scan.h5 --repeat 0
    ptychostream-sim-detector --pv 13SIM1:Pva1:Image --positions-file route.csv --loopback

The command serves its PV as an areaDetector PVA plugin does, through pvDatabase (pvapy's
``PvaServer``, ``--server pvapy``, the default when pvapy is installed), so several
``pvapy-hpc-consumer`` processes can share the stream through the data distributor
(``--distributor-updates``). A p4p (pvxs) server (``--server p4p``) has no distributor: a
consumer asking for one receives nothing from it.

The detector follows the host's EPICS environment (EPICS_PVAS_*), as any IOC does;
``--loopback`` keeps it on 127.0.0.1 (tests, demos, a laptop).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterator

import numpy as np

from ptychostream.epics_env import pva_server_conf
from ptychostream.ntndarray import Frame, ntndarray_type, to_value
from ptychostream.scanfile import ScanData, load_positions

log = logging.getLogger(__name__)


class FramePublisher:
    """One NTNDArray PV served by its own p4p server; ``publish`` posts a frame to its monitors.

    Use as a context manager, or call ``close()``. The PV is served at once with an empty array
    (uniqueId 0), as an areaDetector PVA plugin's is before its first frame, so clients can
    connect before the scan starts; ``open_empty=False`` serves it from the first ``publish``.
    """

    def __init__(self, pv_name: str, open_empty: bool = True) -> None:
        from p4p.server import Server
        from p4p.server.thread import SharedPV

        self.pv_name = pv_name
        self.count = 0
        self.subscribed = False  # a client has the channel open (frames sent now reach it)
        self._lock = threading.Lock()
        self._pv = SharedPV(handler=self)
        if open_empty:
            self._pv.open(to_value(Frame(np.zeros((0, 0), np.uint32))))
        self._server = Server(providers=[{pv_name: self._pv}], conf=pva_server_conf(),
                              useenv=True)
        log.debug("FramePublisher serving %s", pv_name)

    # p4p SharedPV handler: who is listening
    def onFirstConnect(self, pv) -> None:
        self.subscribed = True
        log.debug("%s: first client connected", self.pv_name)

    def onLastDisconnect(self, pv) -> None:
        self.subscribed = False
        log.debug("%s: last client disconnected", self.pv_name)

    def wait_for_subscriber(self, timeout: float = 10.0) -> bool:
        """Wait until a client (the IOC) has the channel open; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.subscribed and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.subscribed

    @staticmethod
    def frame_type():
        return ntndarray_type()

    def publish(self, data: np.ndarray, unique_id: int, attributes: dict | None = None,
                timestamp: float | None = None) -> None:
        """Post one frame (2-D array) with its uniqueId, attributes and timestamp (default now)."""
        value = to_value(Frame(np.asarray(data), int(unique_id), timestamp or time.time(),
                               dict(attributes or {})))
        with self._lock:
            if self._pv.isOpen():
                self._pv.post(value)
            else:
                self._pv.open(value)
            self.count += 1

    def close(self) -> None:
        """Close the PV (clients see a disconnect) and stop the server."""
        if self._server is None:
            return
        try:
            self._pv.close(destroy=True)
        finally:
            self._server.stop()
            self._server = None

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PvapyFramePublisher:
    """FramePublisher's interface on pvapy's ``PvaServer`` (pvAccessCPP and pvDatabase), which
    serves pvDatabase's data distributor plugin (``pydistributor``) as an areaDetector PVA
    plugin serves pvDatabase's: ``pvapy-hpc-consumer --n-consumers N --distributor-updates 1``
    then shares the stream among N consumers, each frame going to one of them.

    pvAccessCPP reads the EPICS_* variables once per process: use it in its own process (the
    ``ptychostream-sim-detector`` command), not beside p4p. It cannot tell who is listening, so
    ``subscribed`` stays False and ``wait_for_subscriber`` waits its timeout.
    """

    def __init__(self, pv_name: str, open_empty: bool = True) -> None:
        import pvaccess as pva

        self._pva = pva
        self.pv_name = pv_name
        self.count = 0
        self.subscribed = False
        self._last = 0.0
        self._lock = threading.Lock()
        self._server = pva.PvaServer()
        self._server.addRecord(pv_name, pva.NtNdArray(), None)
        if open_empty:  # uniqueId 0, no pixels: what an areaDetector PVA plugin holds at first
            self._server.update(pv_name, pva.NtNdArray())
        log.debug("PvapyFramePublisher serving %s", pv_name)

    def wait_for_subscriber(self, timeout: float = 10.0) -> bool:
        time.sleep(max(0.0, timeout))
        return False

    def _value(self, data: np.ndarray, unique_id: int, attributes: dict, timestamp: float):
        from pvapy.utility.adImageUtility import AdImageUtility

        pva = self._pva
        out = AdImageUtility.generateNtNdArray2D(int(unique_id) & 0x7FFFFFFF,
                                                 np.ascontiguousarray(data))
        stamp = pva.PvTimeStamp(timestamp)
        out["timeStamp"] = stamp
        out["dataTimeStamp"] = stamp
        out["descriptor"] = ""
        attrs = [pva.NtAttribute("ColorMode", pva.PvInt(0))]
        for name, value in attributes.items():
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, bool):
                attrs.append(pva.NtAttribute(name, pva.PvBoolean(value)))
            elif isinstance(value, int):
                attrs.append(pva.NtAttribute(name, pva.PvLong(value)))
            elif isinstance(value, float):
                attrs.append(pva.NtAttribute(name, pva.PvDouble(value)))
            elif isinstance(value, str):
                attrs.append(pva.NtAttribute(name, pva.PvString(value)))
        out["attribute"] = attrs
        return out

    def publish(self, data: np.ndarray, unique_id: int, attributes: dict | None = None,
                timestamp: float | None = None) -> None:
        """Post one frame (2-D array) with its uniqueId, attributes and timestamp (default now)."""
        value = self._value(np.asarray(data), unique_id, dict(attributes or {}),
                            timestamp or time.time())
        with self._lock:
            self._server.update(self.pv_name, value)
            self.count += 1
            self._last = time.monotonic()

    def close(self, linger_s: float = 1.0) -> None:
        """Stop serving, ``linger_s`` after the last frame: pvAccessCPP sends updates from its
        own threads, and a record removed at once loses the ones still on their way."""
        if self._server is None:
            return
        wait = self._last + linger_s - time.monotonic()
        if self.count and wait > 0:
            time.sleep(wait)
        try:
            self._server.removeRecord(self.pv_name)
        finally:
            self._server.stop()
            self._server = None

    def __enter__(self) -> PvapyFramePublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pvapy_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("pvaccess") is not None


class SimDetector:
    """Streams the frames of a scan through a FramePublisher at ``rate`` frames/s.

    ``repeat``: how many passes over the scan (0: forever). uniqueIds keep counting across
    passes, from ``first_unique_id``. ``rate`` <= 0 publishes as fast as possible.
    """

    def __init__(self, pv_name: str, scan: ScanData, rate: float = 100.0, repeat: int = 1,
                 first_unique_id: int = 1,
                 publisher: FramePublisher | PvapyFramePublisher | None = None) -> None:
        self.scan = scan
        self.rate = rate
        self.repeat = repeat
        self.first_unique_id = first_unique_id
        self.publisher = publisher or FramePublisher(pv_name)
        self.sent_unique_ids: list[int] = []
        self.sent_times: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def frames(self) -> Iterator[tuple[int, np.ndarray, dict]]:
        """(uniqueId, frame, attributes) for every frame of every pass."""
        uid = self.first_unique_id
        n_pass = 0
        while self.repeat <= 0 or n_pass < self.repeat:
            for i in range(self.scan.n_frames):
                x, y = self.scan.positions_m[i]
                attrs = {"PosX": float(x), "PosY": float(y),
                         "PixelSize": float(self.scan.object_pixel_size_m),
                         "ScanId": self.scan.scan_id}
                yield uid, self.scan.frames[i], attrs
                uid += 1
            n_pass += 1

    def run(self) -> int:
        """Publish every frame, paced by ``rate``; returns the number published."""
        period = 1.0 / self.rate if self.rate > 0 else 0.0
        t_next = time.perf_counter()
        n = 0
        for uid, frame, attrs in self.frames():
            if self._stop.is_set():
                break
            if period:
                delay = t_next - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t_next += period
            now = time.time()
            self.publisher.publish(frame, uid, attrs, timestamp=now)
            self.sent_times[uid] = now
            self.sent_unique_ids.append(uid)
            n += 1
        log.info("simulated detector published %d frames on %s", n, self.publisher.pv_name)
        return n

    def start(self) -> SimDetector:
        """Run in a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="sim-detector", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> None:
        self._stop.set()
        self.wait(5.0)

    def close(self) -> None:
        self.stop()
        self.publisher.close()


def simulate_route(positions_m: np.ndarray, seed: int = 0, sample_kind: str = "train",
                   scan_id: str = "route", noise: bool = True) -> ScanData:
    """A simulated scan along a given route (beam positions (N, 2) x, y in m): the frames a
    real scan route would give, with the core forward model and sample."""
    from ptychostream.scanfile import check_positions
    from ptychostream.simulation import ExperimentConfig, simulate_scan

    cfg = ExperimentConfig(seed=seed, sample_kind=sample_kind, n_positions=len(positions_m),
                           scan_id=scan_id)
    positions = check_positions(positions_m, cfg.object_pixel_m, cfg.beam_fwhm_m, what="route")
    return simulate_scan(cfg, noise=noise, positions_m=positions)


def main(argv: list[str] | None = None) -> int:
    """CLI: stream a simulated or recorded scan as NTNDArray frames."""
    p = argparse.ArgumentParser(prog="ptychostream-sim-detector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pv", default="13SIM1:Pva1:Image", help="NTNDArray PV to publish")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--scan-file", help="stream this HDF5 scan file instead of a simulation")
    src.add_argument("--positions-file",
                     help="simulate along this route: .csv (columns x, y; header optional) or "
                          ".npy (N, 2), beam positions in --positions-units")
    p.add_argument("--positions-units", default="m", choices=["m", "mm", "um", "nm"],
                   help="units of --positions-file (default m)")
    p.add_argument("--n-positions", type=int, default=963, help="simulation: scan positions")
    p.add_argument("--step", type=float, default=50e-9, help="simulation: step size (m)")
    p.add_argument("--seed", type=int, default=0, help="simulation: random seed")
    p.add_argument("--sample", default="test",
                   help="simulation: test (letters, the default), train (random features), mixed")
    p.add_argument("--write-scan", metavar="PATH",
                   help="also write the scan (frames, positions, probe, truth) to this HDF5 file, "
                   "e.g. for ptychostream-ioc --probe PATH")
    p.add_argument("--rate", type=float, default=100.0, help="frames/s (<= 0: as fast as possible)")
    p.add_argument("--repeat", type=int, default=1, help="passes over the scan (0: forever)")
    p.add_argument("--start-delay", type=float, default=1.0,
                   help="seconds to wait before the first frame, so monitors can connect")
    p.add_argument("--server", choices=["pvapy", "p4p"], default=None,
                   help="pvAccess server: pvapy (pvDatabase, with the data distributor that "
                   "pvapy-hpc-consumer --distributor-updates uses; the default when pvapy is "
                   "installed) or p4p")
    p.add_argument("--loopback", action="store_true",
                   help="serve on 127.0.0.1 only (sets the EPICS_* variables not already set)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.loopback:  # the user's explicit choice; without it the host's EPICS_* environment
        from ptychostream.epics_env import configure

        configure(loopback=True)
    from ptychostream import setup_logging
    from ptychostream.scanfile import ScanFileError

    setup_logging(args.log_level)
    try:
        if args.scan_file:
            from ptychostream.scanfile import read_scan

            scan = read_scan(args.scan_file)
        elif args.positions_file:
            route = load_positions(args.positions_file, units=args.positions_units)
            scan = simulate_route(route, seed=args.seed, sample_kind=args.sample)
        else:
            from ptychostream.simulation import simulate_scan

            scan = simulate_scan(n_positions=args.n_positions, step_m=args.step, seed=args.seed,
                                 sample_kind=args.sample)
        if args.write_scan:
            from ptychostream.scanfile import write_scan

            write_scan(args.write_scan, scan)
    except (ScanFileError, OSError) as exc:
        log.error("%s", exc)
        return 2
    server = args.server or ("pvapy" if _pvapy_installed() else "p4p")
    publisher = PvapyFramePublisher(args.pv) if server == "pvapy" else FramePublisher(args.pv)
    log.info("serving %s with %s", args.pv, server)
    det = SimDetector(args.pv, scan, rate=args.rate, repeat=args.repeat, publisher=publisher)
    try:
        time.sleep(max(0.0, args.start_delay))
        det.run()
    except KeyboardInterrupt:
        pass
    finally:
        det.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
