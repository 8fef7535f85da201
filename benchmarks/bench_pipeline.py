"""End-to-end pipeline benchmark: detector -> inference -> map, on one machine, in one run.

Rows, all measured in the same run with one model on the same frames:

* bare engine: ``InferenceEngine.infer`` in batches, from one caller and as the IOC arranges it
  (its inference workers, each calling the engine in turn: ``ioc.server.engine_workers_for``);
  best of passes before and after the rest, and a pass of each right before and after every
  saturated IOC run, so each run has a reference measured beside it on a shared machine;
* the IOC: our simulated detector -> a ``ptychostream-ioc`` process (batched inference, NN:Phase,
  map stage) -> a monitor on NN:Phase here. Saturated (everything queued) and at input rates
  swept with a small queue: throughput, drops, missed (uniqueId gaps), frames that never came
  out and where they went (not inferred / inferred but not posted on NN:Phase / posted but not
  received), latency p50/p99 frame -> phase and frame -> map;
* refinement off vs on: the IOC started with ``--probe scan.h5`` (the streamed scan's own file,
  as ``ptychostream-sim-detector --write-scan`` writes it), ``Stitch:Refine`` 0 then 1;
* scale-out: ``ptychostream-sim-detector`` (pvapy server, data distributor) -> N
  ``pvapy-hpc-consumer`` workers with our InferenceProcessor -> the IOC gathering their outputs
  (``--stitch-input``), for each N of ``--workers``;
* the published workflow's consumer: a pvapy ``UserDataProcessor`` calling onnxruntime per
  frame (``PerFrameOnnxProcessor`` below, as the paper's code did) under pvapy-hpc-consumer.

All EPICS traffic stays on loopback, on ports of its own; every process it starts runs with a
temporary folder as its working directory, so the source tree never shadows the installed
package, and the script runs from any directory::

    python benchmarks/bench_pipeline.py --frames 300 --json bench-results/pipeline.json
    python benchmarks/bench_pipeline.py --sections ioc,refine --rates 50,100,0
    # on a GPU (one prepared command, a few minutes; results and logs in gpu-results/):
    python benchmarks/bench_pipeline.py --engine torch --device cuda --frames 4000 \\
        --batch-size 64 --rates 1000,2000,5000,10000,20000,0 --workers 1,2,4 --out gpu-results

JSON keys kept from earlier versions: ``bare_engine_hz`` (the better arrangement),
``ratio`` (best IOC saturated / best bare), ``max_rate_zero_drops_hz``; new:
``bare_engine_one_caller_hz``, ``bare_engine_workers_hz``, ``ratio_paired`` (each saturated run
over the mean of the bare passes just before and after it) and its median, ``ratio_cpu`` (on
the CPU: the bare engine's CPU per frame over the whole run's, IOC and this process; idle
gaps do not count in it, so it moves less from run to run on a shared host), ``workers`` (one row per worker count), ``refine``,
``baseline_per_frame``, ``sweep`` rows with ``missed``, ``not_inferred``, ``phase_skipped``
(inferred but not posted on NN:Phase: its publisher's queue was full) and ``lost_in_transit``;
``cpu_us_per_frame`` in every IOC row: CPU per frame of each of the IOC's stages (its threads are
named) and of this process (the detector and the NN:Phase monitor), read from /proc.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_pipeline")

HERE = Path(__file__).resolve()
#: pvapy's consumer, run as its module: its console script lies beside the interpreter in a
#: venv but elsewhere under ``pip install --target`` (the GPU machine's install, see benchmarks/gpu)
CONSUMER = [sys.executable, "-m", "pvapy.cli.hpcConsumer"]
PROCESSOR = "ptychostream.plugins.pvapy_adapter.InferenceProcessor"


# ---------------------------------------------------------------------- environment

def isolate() -> None:
    """Loopback, own PVA/CA ports (the benchmark never meets another server on this host), no
    onnxruntime telemetry; set before p4p, pvapy or onnxruntime is loaded, inherited by every
    process started here."""
    from ptychostream.epics_env import free_port, use_loopback

    use_loopback(force=True)
    pva, udp, ca, rep = free_port(), free_port(), free_port(), free_port()
    os.environ.update({
        "EPICS_PVA_SERVER_PORT": str(pva), "EPICS_PVAS_SERVER_PORT": str(pva),
        "EPICS_PVA_BROADCAST_PORT": str(udp), "EPICS_PVAS_BROADCAST_PORT": str(udp),
        "EPICS_CA_SERVER_PORT": str(ca), "EPICS_CAS_SERVER_PORT": str(ca),
        "EPICS_CA_REPEATER_PORT": str(rep),
    })
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def cpu_load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------- the published consumer
if "pvapy.hpc" in sys.modules:  # loaded by pvapy-hpc-consumer as --processor-file
    import pvaccess as _pva
    from pvapy.hpc.adImageProcessor import AdImageProcessor as _AdImageProcessor

    class PerFrameOnnxProcessor(_AdImageProcessor):
        """The published workflow's consumer: each frame through onnxruntime on its own
        (batch 1), its phase published with the frame's uniqueId and timestamp."""

        def __init__(self, configDict=None):  # noqa: N803 (pvapy's API)
            super().__init__(configDict or {})
            import onnxruntime as ort

            cfg = dict(configDict or {})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = int(cfg.get("threads", 0))
            self.session = ort.InferenceSession(cfg["modelFile"], opts,
                                                providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.n = 0

        def start(self):
            if self.pvaServer is not None and self.outputChannel:
                self.pvaServer.addRecord(self.outputChannel, _pva.NtNdArray(), None)

        def getOutputPvObjectType(self, pvObject):  # noqa: N802, N803
            return None

        def process(self, pvObject):  # noqa: N803
            uid, image = self.reshapeNtNdArray(pvObject)[:2]
            x = np.asarray(image, np.float32).reshape(1, 1, *image.shape)
            phase = self.session.run(None, {self.input_name: x})[0][0, 0]
            out = self.generateNtNdArray2D(uid, np.ascontiguousarray(phase, np.float32))
            out["dataTimeStamp"] = pvObject["dataTimeStamp"]
            self.pvaServer.update(self.outputChannel, out)
            self.n += 1
            return pvObject

        def getStats(self):  # noqa: N802
            return {"nPublished": self.n}

        def getStatsPvaTypes(self):  # noqa: N802
            return {"nPublished": _pva.UINT}


# ---------------------------------------------------------------------- the IOC, instrumented
def serve_ioc(argv: list[str]) -> int:
    """``--serve-ioc STATS.jsonl [--device D] IOC-OPTIONS``: the IOC as ``ptychostream-ioc``
    runs it (same options, same EdgeIOC), plus a record of when each frame left inference and
    the map stage. SIGUSR1 appends the record and the counters to STATS.jsonl and clears it;
    SIGTERM/SIGINT stop the IOC."""
    stats_path, argv = Path(argv[0]), argv[1:]
    device = monitor_queue = None
    if "--device" in argv:
        i = argv.index("--device")
        device = argv[i + 1]
        del argv[i:i + 2]
    if "--monitor-queue" in argv:
        i = argv.index("--monitor-queue")
        monitor_queue = int(argv[i + 1])
        del argv[i:i + 2]
    from ptychostream import setup_logging
    from ptychostream.ioc import server
    from ptychostream.ioc.server import EdgeIOC, parse_args, tune_process

    tune_process()
    if monitor_queue:  # what-if: the IOC's input monitor queue (server.MONITOR_REQUEST)
        server.MONITOR_REQUEST = f"record[queueSize={monitor_queue}]"

    a = parse_args(argv)
    setup_logging(a.log_level)
    kwargs = {"device": device} if a.engine == "torch" and device else {}
    ioc = EdgeIOC(prefix=a.prefix, input_pv=a.input, engine=a.engine, batch_size=a.batch_size,
                  model_file=a.model_file, model_store=a.model_store, ca_mirror=a.ca,
                  queue_size=a.queue_size, intensity_scale=a.intensity_scale,
                  stitch_inputs=a.stitch_input, stitch_pixel_m=a.stitch_pixel, probe=a.probe,
                  refine=a.refine, map_dir=a.map_dir, device=device, engine_kwargs=kwargs,
                  engine_workers=a.engine_workers)
    lock = threading.Lock()
    record: dict[str, list] = {"inferred": [], "stitched": []}

    def recorder(key):
        def sink(batch) -> None:
            now = time.time()
            with lock:
                record[key].extend((int(u), now, now - float(t))
                                   for u, t in zip(batch.unique_ids, batch.timestamps,
                                                   strict=True))
        return sink

    ioc.nn.sinks.append(recorder("inferred"))
    ioc.stitch.sinks.append(recorder("stitched"))
    done = threading.Event()
    dump = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    signal.signal(signal.SIGUSR1, lambda *_: dump.set())
    ioc.start()
    try:
        while not done.wait(0.05):
            if not dump.is_set():
                continue
            dump.clear()
            with lock:
                rec = {k: list(v) for k, v in record.items()}
                for v in record.values():
                    v.clear()
            pub = ioc.nn_pvs.publisher
            rec.update(nn=_plain(ioc.nn.stats()), stitch=_plain(ioc.stitch.stats()),
                       nn_missed=ioc.nn.missed, stitch_missed=ioc.stitch.missed,
                       phase_posted=pub.posted, phase_skipped=pub.skipped,
                       gather=ioc.gather.stats() if ioc.gather is not None else None,
                       model_version=ioc.inference.model_version)
            with open(stats_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    finally:
        ioc.stop()
    return 0


def _plain(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "Status_RBV"}


class IOCProcess:
    """An instrumented IOC in a process of its own (see serve_ioc)."""

    def __init__(self, prefix: str, args: list[str], tmp: Path, name: str,
                 device: str | None = None, monitor_queue: int | None = None) -> None:
        self.prefix, self.tmp = prefix, tmp
        self.stats_path = tmp / f"{name}.stats.jsonl"
        self.log = open(tmp / f"{name}.log", "w")
        cmd = [sys.executable, str(HERE), "--serve-ioc", str(self.stats_path),
               *(["--device", device] if device else []),
               *(["--monitor-queue", str(monitor_queue)] if monitor_queue else []),
               "--prefix", prefix,
               "--log-level", "WARNING", *args]
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=dict(os.environ), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._n = 0

    def wait_ready(self, model: bool = True, timeout: float = 180) -> None:
        from ptychostream.ioc import client

        deadline = time.time() + timeout
        while True:
            try:
                v = client.get(self.prefix, "NN:ModelVersion_RBV", timeout=2)
                if v >= 1 or not model:
                    return
            except Exception:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the IOC did not come up: see {self.log.name}")
            time.sleep(0.5)

    def snapshot(self, timeout: float = 20.0) -> dict:
        """What the IOC recorded since the last snapshot."""
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.stats_path.read_text() if self.stats_path.exists() else ""
            if text.endswith("\n"):  # a line still being written is not a record yet
                lines = text.splitlines()
                if len(lines) > self._n:
                    self._n = len(lines)
                    return json.loads(lines[-1])
            time.sleep(0.05)
        raise RuntimeError("the IOC wrote no counters")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------- measurements
def bare_engine(engine_name: str, model: bytes, frames: np.ndarray, batch: int,
                repeats: int = 3, workers: int = 1, cpu: list | None = None,
                **kwargs) -> float:
    """Frames/s of engine.infer over all frames in batches (best of ``repeats`` passes), from
    one caller or, as the IOC's inference workers call it, from ``workers`` threads taking the
    batches in turn (onnxruntime runs concurrent calls on one session). ``cpu``: gets the CPU
    µs per frame of each pass (this process's CPU time)."""
    from ptychostream.engines import load_engine

    engine = load_engine(engine_name, model, **kwargs)
    engine.infer(frames[:batch])  # warm-up
    starts = list(range(0, len(frames), batch))

    def run(mine) -> None:
        for s in mine:
            engine.infer(frames[s:s + batch])

    best = 0.0
    for _ in range(repeats):
        threads = [threading.Thread(target=run, args=(starts[k::workers],))
                   for k in range(workers)]
        t0, c0 = time.perf_counter(), time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, len(frames) / (time.perf_counter() - t0))
        if cpu is not None:
            cpu.append((time.process_time() - c0) / len(frames) * 1e6)
    return best


class Bare:
    """The bare engine in both arrangements (one caller; the IOC's workers), best so far."""

    def __init__(self, engine: str, model: bytes, frames: np.ndarray, batch: int,
                 workers: int, kwargs: dict) -> None:
        self.engine, self.model, self.frames, self.batch = engine, model, frames, batch
        self.workers = workers
        from ptychostream.ioc.server import worker_engine_kwargs

        self.kwargs = kwargs
        self.workers_kwargs = worker_engine_kwargs(engine, workers, kwargs)  # as the IOC does
        self.one_caller = self.with_workers = 0.0
        self.cpu_us: dict[str, list[float]] = {"one caller": [], "workers": []}

    def measure(self, repeats: int = 1) -> float:
        """Best of both arrangements now (``repeats`` passes each); keeps the best seen."""
        one = bare_engine(self.engine, self.model, self.frames, self.batch, repeats,
                          cpu=self.cpu_us["one caller"], **self.kwargs)
        self.one_caller = max(self.one_caller, one)
        if self.workers <= 1:
            return one
        many = bare_engine(self.engine, self.model, self.frames, self.batch, repeats,
                           self.workers, cpu=self.cpu_us["workers"], **self.workers_kwargs)
        self.with_workers = max(self.with_workers, many)
        return max(one, many)

    @property
    def best(self) -> float:
        return max(self.one_caller, self.with_workers)

    @property
    def least_cpu_us(self) -> float:
        """CPU µs per frame of the bare engine's cheapest arrangement (median of its passes)."""
        return min(float(np.median(v)) for v in self.cpu_us.values() if v)


class Arrivals:
    """Arrival time and the frame's own timestamp of every update of some NTNDArray PVs."""

    def __init__(self, pvs: list[str]) -> None:
        from p4p.client.thread import Context

        self.lock = threading.Lock()
        self.arrivals: dict[int, tuple[float, float]] = {}
        self.duplicates = 0
        self._ctx = Context("pva", nt=False)
        self._subs = [self._ctx.monitor(pv, self._cb, request="record[queueSize=100000]")
                      for pv in pvs]

    def _cb(self, value) -> None:
        if isinstance(value, Exception):
            return
        now = time.time()
        uid = int(value["uniqueId"])
        if not uid:
            return
        ts = value["dataTimeStamp.secondsPastEpoch"] + value["dataTimeStamp.nanoseconds"] * 1e-9
        with self.lock:
            if uid in self.arrivals:
                self.duplicates += 1
            self.arrivals[uid] = (now, float(ts))

    def take(self) -> dict[int, tuple[float, float]]:
        with self.lock:
            out, self.arrivals, self.duplicates = self.arrivals, {}, 0
        return out

    def close(self) -> None:
        for s in self._subs:
            s.close()
        self._ctx.close()


def settle(count, expected: int, settle_s: float, timeout: float = 600) -> None:
    """Wait until ``count()`` reaches ``expected`` or stops growing for ``settle_s``."""
    last, last_t, t_end = -1, time.time(), time.time() + timeout
    while time.time() < t_end:
        n = count()
        if n >= expected:
            return
        if n != last:
            last, last_t = n, time.time()
        elif time.time() - last_t > settle_s:
            return
        time.sleep(0.05)


def figures(uids: list[int], sent: dict[int, float], got: dict[int, float]) -> dict:
    """Throughput (first frame sent to last out), latency p50/p99 (ms) of the frames out."""
    out = [u for u in uids if u in got]
    if not out:
        return {"out": 0, "throughput_hz": 0.0, "latency_p50_ms": float("nan"),
                "latency_p99_ms": float("nan")}
    lat = np.array([got[u] - sent[u] for u in out]) * 1e3
    span = max(got[u] for u in out) - min(sent[u] for u in uids)
    return {"out": len(out), "throughput_hz": len(out) / span if span > 0 else float("nan"),
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99))}


#: Linux thread names (the IOC names its stages' threads) -> the group a row of CPU shows
CPU_GROUPS = {"plugin-NN": "inference (NN thread)", "plugin-Stitch": "map stage",
              "nn-phase-publis": "NN:Phase publisher", "ioc-memory-guar": "memory guard"}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread group of process ``pid`` (from /proc, Linux): where
    the cores go, which a throughput figure alone cannot say. Engine pool threads inherit the
    name of the thread that made them ("python" here: counted as "engine pool and other")."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{t}/stat").read_text()
        except OSError:
            continue  # the thread ended
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        group = CPU_GROUPS.get(comm, "pvxs (PVX*)" if comm.startswith("PVX")
                               else "engine pool and other")
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_per_frame(before: dict, after: dict, n: int) -> dict[str, float]:
    """µs of CPU per frame of each group between two :func:`thread_cpu` readings."""
    return {k: round((after.get(k, 0.0) - before.get(k, 0.0)) / max(n, 1) * 1e6, 1)
            for k in sorted(after, key=lambda k: before.get(k, 0.0) - after[k])}


def ioc_run(ioc: IOCProcess, det, phases: Arrivals | None, scan, rate: float, first_uid: int,
            queue_size: int, settle_s: float = 3.0, stage: str = "phase") -> dict:
    """Publish the scan once at ``rate`` (0: as fast as possible) into the IOC; what came out
    on NN:Phase (``phases``), what the IOC inferred and stitched, and where the rest went."""
    from ptychostream.ioc import client

    p = ioc.prefix
    client.put(p, "NN:QueueSize", queue_size)
    client.put(p, "NN:ArrayCounter", 0)
    client.put(p, "Stitch:ArrayCounter", 0)
    ioc.snapshot()  # clears the IOC's record
    if phases is not None:
        phases.take()
    det.scan, det.rate, det.first_unique_id, det.repeat = scan, rate, first_uid, 1
    det.sent_times.clear()
    det.sent_unique_ids.clear()
    cpu0, own0 = thread_cpu(ioc.proc.pid), time.process_time()
    t0 = time.time()
    det.run()
    t_sent = time.time() - t0
    uids = list(det.sent_unique_ids)
    if stage == "phase" and phases is not None:
        settle(lambda: len(phases.arrivals), len(uids), settle_s)
    else:
        settle(lambda: int(client.get(p, "Stitch:ArrayCounter_RBV")), len(uids), settle_s)
    cpu = cpu_per_frame(cpu0, thread_cpu(ioc.proc.pid), len(uids))
    cpu["this process (detector, NN:Phase monitor)"] = round(
        (time.process_time() - own0) / max(len(uids), 1) * 1e6, 1)
    time.sleep(0.6)  # the IOC posts its counters every 0.25 s
    snap = ioc.snapshot()
    got = phases.take() if phases is not None else {}
    sent = det.sent_times
    inferred = {u: t for u, t, _ in snap["inferred"]}
    stitched = {u: t for u, t, _ in snap["stitched"]}
    nn = snap["nn"]
    row = {"requested_rate_hz": rate, "rate_in_hz": rate or len(uids) / t_sent,
           "sent": len(uids), "queue_size": queue_size,
           "ioc_dropped": int(nn["DroppedArrays_RBV"]), "missed": int(snap["nn_missed"]),
           "inferred": len(inferred), "phase_posted": int(snap["phase_posted"]),
           "phase_skipped": int(snap["phase_skipped"]), "stitched": len(stitched),
           "stitch_dropped": int(snap["stitch"]["DroppedArrays_RBV"]),
           "cpu_us_per_frame": cpu}
    if phases is not None:
        ph = figures(uids, sent, {u: a for u, (a, _) in got.items()})
        row.update({"received": ph["out"], "throughput_hz": ph["throughput_hz"],
                    "latency_p50_ms": ph["latency_p50_ms"], "latency_p99_ms": ph["latency_p99_ms"],
                    "missing": len(uids) - ph["out"]})
        # where the frames that never came out went
        row["not_inferred"] = len(uids) - len(inferred)
        row["lost_in_transit"] = max(0, len(inferred) - row["phase_skipped"] - ph["out"])
    m = figures(uids, sent, stitched)
    row.update({"map_throughput_hz": m["throughput_hz"], "map_latency_p50_ms": m["latency_p50_ms"],
                "map_latency_p99_ms": m["latency_p99_ms"]})
    return row


def wait_pv(prefix_pvs: list[str], timeout: float = 180) -> None:
    from p4p.client.thread import Context

    deadline = time.time() + timeout
    with Context("pva", nt=False) as ctx:
        while time.time() < deadline:
            got = ctx.get(prefix_pvs, timeout=2, throw=False)
            if not any(isinstance(v, Exception) for v in got):
                return
            time.sleep(0.5)
    raise RuntimeError(f"{prefix_pvs} did not come up")


def serve_detector(argv: list[str]) -> int:
    """``--serve-detector SCAN.h5 PV``: the simulated detector on pvapy's server (the data
    distributor), as ``ptychostream-sim-detector --server pvapy --scan-file`` serves it, kept
    up between runs so consumers connect once: each stdin line ``run RATE`` streams the scan
    once from uniqueId 1 and answers ``done N``."""
    from ptychostream import setup_logging
    from ptychostream.ioc.sim_detector import PvapyFramePublisher, SimDetector
    from ptychostream.scanfile import read_scan

    setup_logging("WARNING")
    scan_file, pv = argv[0], argv[1]
    det = SimDetector(pv, read_scan(scan_file), publisher=PvapyFramePublisher(pv))
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        det.rate, det.first_unique_id, det.repeat = float(cmd[1]), 1, 1
        print(f"done {det.run()}", flush=True)
    det.close()
    return 0


class DetectorProcess:
    """The pvapy simulated detector in a process of its own (see serve_detector)."""

    def __init__(self, tmp: Path, scan_file: Path, pv: str) -> None:
        self.pv = pv
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "--serve-detector", str(scan_file), pv], cwd=tmp,
            env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(tmp / "detector.log", "w"), text=True, bufsize=1)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the detector did not start: see detector.log")

    def run(self, rate: float) -> int:
        self.proc.stdin.write(f"run {rate}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def start_consumers(argv: list[str], cwd: Path, log_file) -> subprocess.Popen:
    """``pvapy-hpc-consumer ARGV`` (status every second, no curses) in a session of its own,
    with the default SIGINT: a benchmark started in the background has SIGINT ignored, which
    its children would inherit, and then the Ctrl-C of :func:`stop_consumers` never arrives."""
    return subprocess.Popen(
        [*CONSUMER, *argv, "--report-period", "1", "--disable-curses",
         "--log-level", "warning"],
        cwd=cwd, env=dict(os.environ), stdout=log_file, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop_consumers(consumers: subprocess.Popen) -> None:
    """Ctrl-C (pvapy's clean stop); the whole group killed if it has not ended in 60 s."""
    consumers.send_signal(signal.SIGINT)
    try:
        consumers.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(consumers.pid, signal.SIGKILL)


def consumer_status(prefix: str, n: int) -> list[dict]:
    from p4p.client.thread import Context

    with Context("pva", nt=False) as ctx:
        vals = ctx.get([f"{prefix}status:{i}" for i in range(1, n + 1)], timeout=3, throw=False)
    return [{} if isinstance(v, Exception) else v.todict() for v in vals]


def connected(prefix: str, n: int, what: str, timeout: float = 120) -> list[dict]:
    """Wait until each consumer got the detector's current value (it connected); their stats."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = consumer_status(prefix, n)
        if all(s.get("receiverStats", {}).get("nReceived", 0) >= 1 for s in st):
            return st
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not connect to the detector")


def missed(status: list[dict]) -> int:
    return sum(int(s.get("processorStats", {}).get("nMissed", 0)) for s in status)


def scale_out(args, tmp: Path, scan, det: DetectorProcess, model_file: Path, n_workers: int,
              rates: list[float], bare: float) -> dict:
    """N pvapy consumers fed by our detector, the IOC gathering them: one row per rate."""
    from ptychostream.ioc import client

    prefix = f"SO{n_workers}:"
    ncpu = os.cpu_count() or 1
    pargs = {"modelFile": str(model_file), "batchSize": args.batch_size, "engine": args.engine,
             "queueSize": args.frames + 64}
    if args.engine == "onnxruntime":
        pargs["threads"] = max(1, ncpu // n_workers)
    clog = open(tmp / f"consumers{n_workers}.log", "w")
    consumers = start_consumers(
        ["--input-channel", det.pv, "--n-consumers", str(n_workers), "--distributor-updates", "1",
         "--output-channel", prefix + "phase:*", "--status-channel", prefix + "status:*",
         "--processor-class", PROCESSOR, "--processor-args", json.dumps(pargs),
         "--server-queue-size", str(args.frames + 64)], tmp, clog)
    ioc = IOCProcess(prefix, [a for i in range(1, n_workers + 1)
                              for a in ("--stitch-input", f"{prefix}phase:{i}")],
                     tmp, f"ioc-scaleout{n_workers}", args.device)
    rows = []
    outs = None
    try:
        wait_pv([f"{prefix}phase:{i}" for i in range(1, n_workers + 1)])
        ioc.wait_ready(model=False)
        client.put(prefix, "Stitch:UpdatePeriod", 1.0)
        outs = Arrivals([f"{prefix}phase:{i}" for i in range(1, n_workers + 1)])
        status = connected(prefix, n_workers, f"{n_workers} consumers")
        time.sleep(1.0)
        for rate in rates:
            client.put(prefix, "Stitch:ArrayCounter", 0)
            g0 = ioc.snapshot()["gather"] or {}
            outs.take()
            before = missed(status)
            det.run(rate)
            settle(lambda: len(outs.arrivals), scan.n_frames, 4.0)
            time.sleep(1.0)  # the gather's timeout, the map stage's queue
            snap = ioc.snapshot()
            got = outs.take()
            time.sleep(1.2)  # a fresh status (report period 1 s)
            status = consumer_status(prefix, n_workers)
            uids = list(range(1, scan.n_frames + 1))
            sent = {u: ts for u, (_, ts) in got.items()}  # the detector's timestamps
            for u in uids:
                sent.setdefault(u, min(sent.values()) if sent else time.time())
            ph = figures(uids, sent, {u: a for u, (a, _) in got.items()})
            st = figures(uids, sent, {u: t for u, t, _ in snap["stitched"]})
            g = {k: v - g0.get(k, 0) if k in ("received", "released", "duplicates", "gaps",
                                              "late", "restarts") else v
                 for k, v in (snap["gather"] or {}).items()}
            rows.append({
                "workers": n_workers, "requested_rate_hz": rate, "sent": scan.n_frames,
                "out": ph["out"], "throughput_hz": ph["throughput_hz"],
                "latency_p50_ms": ph["latency_p50_ms"], "latency_p99_ms": ph["latency_p99_ms"],
                "stitched": len(snap["stitched"]), "map_throughput_hz": st["throughput_hz"],
                "map_latency_p50_ms": st["latency_p50_ms"],
                "map_latency_p99_ms": st["latency_p99_ms"],
                "consumer_missed": missed(status) - before,
                "consumer_dropped": sum(int(s.get("userStats", {}).get("nDropped", 0))
                                        for s in status),
                "gather": g, "stitch_dropped": int(snap["stitch"]["DroppedArrays_RBV"]),
                "ratio_to_bare": ph["throughput_hz"] / bare if bare else float("nan")})
            print(f"  workers {n_workers} rate {rate or 'max'}: {ph['out']}/{scan.n_frames} out, "
                  f"{ph['throughput_hz']:.1f} frames/s", flush=True)
    finally:
        if outs is not None:
            outs.close()
        stop_consumers(consumers)
        ioc.stop()
        clog.close()
    return {"workers": n_workers, "rows": rows}


def baseline_per_frame(args, tmp: Path, scan, det: DetectorProcess, model_file: Path) -> dict:
    """The published consumer (UserDataProcessor, onnxruntime per frame) fed by our detector."""
    prefix = "BASE:"
    clog = open(tmp / "baseline.log", "w")
    consumers = start_consumers(
        ["--input-channel", det.pv,
         "--output-channel", prefix + "out:*", "--status-channel", prefix + "status:*",
         "--processor-file", str(HERE), "--processor-class", "PerFrameOnnxProcessor",
         "--processor-args", json.dumps({"modelFile": str(model_file)}),
         "--server-queue-size", str(args.frames + 64)], tmp, clog)
    # the same downstream as the workers' rows: the IOC gathers and stitches its outputs (they
    # carry no positions: the plan gives them by uniqueId)
    ioc = IOCProcess(prefix, ["--stitch-input", prefix + "out:1"], tmp, "ioc-baseline",
                     args.device)
    outs = None
    try:
        from ptychostream.ioc import client

        wait_pv([prefix + "out:1"])
        ioc.wait_ready(model=False)
        client.put(prefix, "Stitch:UpdatePeriod", 1.0)
        client.put(prefix, "Stitch:PixelSize", scan.object_pixel_size_m * 1e9)
        client.put_positions(prefix, scan.positions_m, unique_ids=np.arange(1, scan.n_frames + 1))
        outs = Arrivals([prefix + "out:1"])
        connected(prefix, 1, "the published consumer")
        time.sleep(1.0)
        ioc.snapshot()
        det.run(0)
        settle(lambda: len(outs.arrivals), scan.n_frames, 4.0)
        time.sleep(1.0)
        snap = ioc.snapshot()
        got = outs.take()
        uids = list(range(1, scan.n_frames + 1))
        sent = {u: ts for u, (_, ts) in got.items()}
        for u in uids:
            sent.setdefault(u, min(sent.values()) if sent else time.time())
        ph = figures(uids, sent, {u: a for u, (a, _) in got.items()})
        st = figures(uids, sent, {u: t for u, t, _ in snap["stitched"]})
        return {"sent": scan.n_frames, **ph, "stitched": len(snap["stitched"]),
                "map_throughput_hz": st["throughput_hz"]}
    finally:
        if outs is not None:
            outs.close()
        ioc.stop()
        stop_consumers(consumers)
        clog.close()


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve-ioc":
        return serve_ioc(argv[1:])
    if argv and argv[0] == "--serve-detector":
        return serve_detector(argv[1:])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300, help="frames per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--engine-workers", type=int, default=0,
                   help="the IOC's inference workers (0: its default for the engine and device)")
    p.add_argument("--engine", default="onnxruntime", help="onnxruntime, torch or tensorrt")
    p.add_argument("--device", help="torch engine and map stage device, e.g. cuda")
    p.add_argument("--model", help="model file (default: a freshly initialised PtychoNN 2.0; "
                   "ONNX, or a state dict for --engine torch)")
    p.add_argument("--rates", default="50,100,150,200,300,0",
                   help="input rates (frames/s) of the IOC sweep; 0 = as fast as possible")
    p.add_argument("--sweep-queue", type=int, default=32,
                   help="IOC queue size during the sweep (small, so overload shows in drops)")
    p.add_argument("--workers", default="1,2,4", help="scale-out worker counts")
    p.add_argument("--worker-rates", default="0",
                   help="detector rates for the scale-out runs (0: as fast as possible)")
    p.add_argument("--sections", default="ioc,refine,workers,baseline",
                   help="which rows: ioc, refine, workers, baseline")
    p.add_argument("--repeats", type=int, default=2,
                   help="passes of the bare engine (before and after) and saturated runs; "
                        "best of each is compared")
    p.add_argument("--monitor-queue", type=int, default=4096,
                   help="what-if row: the saturated run again with the IOC's input monitor "
                   "asking for this queueSize (the IOC asks for 64); 0: no such row")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--out", help="folder for results.json, table.txt and every process's log")
    args = p.parse_args(argv)
    isolate()
    from ptychostream import setup_logging

    setup_logging("WARNING")
    sections = set(args.sections.split(","))
    tmp = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    tmp.mkdir(parents=True, exist_ok=True)

    import torch

    from ptychostream.ioc.sim_detector import FramePublisher, SimDetector
    from ptychostream.model import PtychoNN2, export_onnx, state_dict_bytes
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    if args.model:
        model = Path(args.model).read_bytes()
    else:
        torch.manual_seed(0)
        net = PtychoNN2()
        model = state_dict_bytes(net) if args.engine == "torch" else export_onnx(net)
    model_file = tmp / ("model.pt" if args.engine == "torch" and not args.model else "model.onnx")
    model_file.write_bytes(model)
    onnx_file = tmp / "model-baseline.onnx"
    if "baseline" in sections:
        torch.manual_seed(0)
        onnx_file.write_bytes(export_onnx(PtychoNN2()))
    scan = simulate_scan(n_positions=args.frames, step_m=100e-9, seed=0)
    scan_file = write_scan(tmp / "scan.h5", scan, compression=None)  # as --write-scan writes it
    ekw = {"device": args.device} if args.engine == "torch" and args.device else {}
    if args.engine == "onnxruntime":
        ekw["spinning"] = False  # as the IOC runs it
    load0 = cpu_load()
    from ptychostream.ioc.server import engine_workers_for

    bares = Bare(args.engine, model, scan.frames, args.batch_size,
                 engine_workers_for(args.engine, args.device, args.engine_workers), ekw)
    bares.measure(args.repeats)
    bare = bares.best
    results: dict = {"engine": args.engine, "device": args.device or "cpu",
                     "batch_size": args.batch_size, "frames": args.frames,
                     "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
                     "out_dir": str(tmp)}
    rates = [float(r) for r in args.rates.split(",") if r]
    ioc_common = ["--engine", args.engine, "--batch-size", str(args.batch_size),
                  "--model-file", str(model_file), "--engine-workers", str(args.engine_workers)]

    # ---- the IOC: saturated and swept
    if "ioc" in sections or "refine" in sections:
        ioc = IOCProcess("BENCH:", ["--input", "BENCH:det:Image", "--probe", str(scan_file),
                                    "--queue-size", str(args.frames + 64), *ioc_common],
                         tmp, "ioc", args.device)
        det = SimDetector("BENCH:det:Image", scan, publisher=FramePublisher("BENCH:det:Image"))
        phases = None
        try:
            ioc.wait_ready()
            from ptychostream.ioc import client

            results["engine_described"] = client.get("BENCH:", "NN:Engine_RBV").raw["value"]
            client.put("BENCH:", "Stitch:UpdatePeriod", 1.0)
            phases = Arrivals(["BENCH:NN:Phase"])
            time.sleep(1.0)  # monitors connect (IOC -> detector, us -> IOC)
            uid = 1
            client.put("BENCH:", "Stitch:Refine", 0)
            ioc_run(ioc, det, phases, scan.subset(slice(0, 32)), 0, uid, args.frames + 64)
            uid += 32  # uniqueIds run on from run to run: a gap would count as missed
            if "ioc" in sections:
                sats, pairs = [], []
                b_after = bares.measure()
                for _ in range(args.repeats):  # each run between bare passes just before/after
                    b_before = b_after
                    sats.append(ioc_run(ioc, det, phases, scan, 0, uid, args.frames + 64))
                    b_after = bares.measure()
                    pairs.append(sats[-1]["throughput_hz"] / ((b_before + b_after) / 2))
                    uid += args.frames
                sat = max(sats, key=lambda r: r["throughput_hz"])
                results["pipeline"] = sat
                results["pipeline_runs_hz"] = [r["throughput_hz"] for r in sats]
                results["ratio_paired"] = pairs  # robust to a load that drifts during the run
                results["ratio_paired_median"] = float(np.median(pairs))
                bare = bares.best
                sweep = []
                for rate in rates:
                    sweep.append(ioc_run(ioc, det, phases, scan, rate, uid, args.sweep_queue))
                    uid += args.frames
                    print(f"  IOC rate {rate or 'max'}: {sweep[-1]['received']}/{args.frames} out",
                          flush=True)
                results["sweep"] = sweep
            if "refine" in sections:
                refine = {"off": [], "on": []}
                for _ in range(args.repeats):
                    for mode, value in (("off", 0), ("on", 1)):
                        client.put("BENCH:", "Stitch:Refine", value)
                        client.put("BENCH:", "Stitch:Reset", 1)
                        r = ioc_run(ioc, det, phases, scan, 0, uid, args.frames + 64,
                                    stage="map")
                        if value:  # a stage behind the stream refines what it kept afterwards
                            r["passes_at_end"] = float(client.get("BENCH:", "Stitch:Passes_RBV"))
                            t0 = time.time()
                            while (client.get("BENCH:", "Stitch:Passes_RBV") < 1.0
                                   and time.time() - t0 < 300):
                                time.sleep(0.1)
                            r["catch_up_s"] = time.time() - t0
                        refine[mode].append(r)
                        uid += args.frames
                best = {m: max(v, key=lambda r: r["map_throughput_hz"])
                        for m, v in refine.items()}
                results["refine"] = {
                    "off": best["off"], "on": best["on"],
                    "on_over_off": best["on"]["map_throughput_hz"]
                    / best["off"]["map_throughput_hz"],
                    "runs_hz": {m: [r["map_throughput_hz"] for r in v]
                                for m, v in refine.items()}}
                print(f"  refinement on/off: {results['refine']['on_over_off']:.2f}", flush=True)
        finally:
            if phases is not None:
                phases.close()
            det.close()
            ioc.stop()

    # ---- what-if: the same saturated run with a deep input monitor queue
    if "ioc" in sections and args.monitor_queue:
        ioc = IOCProcess("DEEP:", ["--input", "DEEP:det:Image",
                                   "--queue-size", str(args.frames + 64), *ioc_common],
                         tmp, "ioc-deep", args.device, monitor_queue=args.monitor_queue)
        det = SimDetector("DEEP:det:Image", scan, publisher=FramePublisher("DEEP:det:Image"))
        phases = None
        try:
            ioc.wait_ready()
            phases = Arrivals(["DEEP:NN:Phase"])
            time.sleep(1.0)
            ioc_run(ioc, det, phases, scan.subset(slice(0, 32)), 0, 1, args.frames + 64)
            uid, runs = 33, []
            for _ in range(args.repeats):
                runs.append(ioc_run(ioc, det, phases, scan, 0, uid, args.frames + 64))
                uid += args.frames
            results["pipeline_deep_monitor"] = {
                "monitor_queue": args.monitor_queue,
                **max(runs, key=lambda r: r["throughput_hz"])}
        finally:
            if phases is not None:
                phases.close()
            det.close()
            ioc.stop()

    # ---- scale-out and the published consumer
    if "workers" in sections or "baseline" in sections:
        pdet = DetectorProcess(tmp, scan_file, "SO:det:Image")
        try:
            if "workers" in sections:
                wr = [float(r) for r in args.worker_rates.split(",") if r]
                results["workers"] = [scale_out(args, tmp, scan, pdet, model_file, int(n), wr,
                                                bare) for n in args.workers.split(",") if n]
            if "baseline" in sections and args.engine == "onnxruntime":
                results["baseline_per_frame"] = baseline_per_frame(args, tmp, scan, pdet,
                                                                   onnx_file)
        finally:
            pdet.close()

    # the machine may be shared: measure the bare engine again after, compare best with best
    bares.measure(args.repeats)
    bare = bares.best
    results["bare_engine_hz"] = bare
    results["bare_engine_one_caller_hz"] = bares.one_caller
    results["bare_engine_workers"] = bares.workers
    results["bare_engine_cpu_us_per_frame"] = bares.least_cpu_us
    if "pipeline" in results and (args.device or "cpu") == "cpu":  # CPU time, not wall clock
        total = sum(results["pipeline"]["cpu_us_per_frame"].values())
        results["cpu_us_per_frame_total"] = total
        results["ratio_cpu"] = bares.least_cpu_us / total
    if bares.workers > 1:
        results["bare_engine_workers_hz"] = bares.with_workers
    results["load_average_end"] = os.getloadavg()
    if "pipeline" in results:
        results["ratio"] = results["pipeline"]["throughput_hz"] / bare
    if "sweep" in results:
        no_drop = [r["rate_in_hz"] for r in results["sweep"]
                   if r["received"] == r["sent"] and r["requested_rate_hz"]]
        results["max_rate_zero_drops_hz"] = max(no_drop) if no_drop else 0.0
    table = report(results, args, load0)
    print(table)
    if args.out:
        (tmp / "results.json").write_text(json.dumps(results, indent=1))
        (tmp / "table.txt").write_text(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def report(results: dict, args, load0: str) -> str:
    bare = results["bare_engine_hz"]
    lines = [f"\nptychostream pipeline benchmark: engine "
             f"{results.get('engine_described', results['engine'])}, batch {args.batch_size}, "
             f"{args.frames} frames of 128x128, {os.cpu_count()} CPUs",
             f"load average (1 min) at start {load0}, at end {cpu_load()}; "
             f"best of {args.repeats} runs each",
             f"{'bare engine, one caller':<40}{results['bare_engine_one_caller_hz']:10.1f} "
             "frames/s"]
    if "bare_engine_workers_hz" in results:
        lines.append(f"{'bare engine, ' + str(results['bare_engine_workers']) + ' workers (as the IOC)':<40}"
                     f"{results['bare_engine_workers_hz']:10.1f} frames/s")
    if "pipeline" in results:
        sat = results["pipeline"]
        lines += [
            f"{'IOC end to end (detector->NN:Phase)':<40}{sat['throughput_hz']:10.1f} frames/s"
            f"   ratio {results['ratio']:.2f} (best / best bare); each run / bare passes "
            f"beside it: {', '.join(f'{r:.2f}' for r in results['ratio_paired'])}, median "
            f"{results['ratio_paired_median']:.2f}",
            f"{'  saturated: latency frame->phase':<40}p50 {sat['latency_p50_ms']:.1f} ms, "
            f"p99 {sat['latency_p99_ms']:.1f} ms; out {sat['received']}/{sat['sent']} "
            f"(missed at the input monitor {sat['missed']}, dropped {sat['ioc_dropped']}, "
            f"not posted {sat['phase_skipped']}, "
            f"lost after posting {sat['lost_in_transit']})",
            f"{'  saturated: frame->map':<40}{sat['map_throughput_hz']:10.1f} frames/s, "
            f"p50 {sat['map_latency_p50_ms']:.1f} ms, p99 {sat['map_latency_p99_ms']:.1f} ms",
            f"  saturated: CPU per frame, µs (the bare engine, on all {os.cpu_count()} cores: "
            f"{os.cpu_count() * 1e6 / bare:.0f})"]
        lines += [f"    {k:<42}{v:8.0f}" for k, v in sat.get("cpu_us_per_frame", {}).items()]
        if "ratio_cpu" in results:
            lines.append(f"    {'all of it, beside the bare engine':<42}"
                         f"{results['cpu_us_per_frame_total']:8.0f}   bare (CPU measured) "
                         f"{results['bare_engine_cpu_us_per_frame']:.0f}: ratio by CPU "
                         f"{results['ratio_cpu']:.2f}")
    if "pipeline_deep_monitor" in results:
        d = results["pipeline_deep_monitor"]
        lines.append(f"{'  same, input monitor queueSize ' + str(d['monitor_queue']):<40}"
                     f"{d['throughput_hz']:10.1f} frames/s; out {d['received']}/{d['sent']}, "
                     f"missed {d['missed']} (64: {results['pipeline']['missed']})")
    if "sweep" in results:
        lines += [f"\nIOC input-rate sweep (queue {args.sweep_queue}):",
                  f"{'requested':>10}{'sent Hz':>9}{'out Hz':>9}{'sent':>6}{'out':>6}"
                  f"{'drops':>7}{'missed':>7}{'unposted':>9}{'p50 ms':>9}{'p99 ms':>9}"
                  f"{'map p99':>9}"]
        for r in results["sweep"]:
            req = f"{r['requested_rate_hz']:.0f}" if r["requested_rate_hz"] else "max"
            lines.append(f"{req:>10}{r['rate_in_hz']:9.1f}{r['throughput_hz']:9.1f}"
                         f"{r['sent']:6d}{r['received']:6d}{r['ioc_dropped']:7d}{r['missed']:7d}"
                         f"{r['phase_skipped']:9d}{r['latency_p50_ms']:9.1f}"
                         f"{r['latency_p99_ms']:9.1f}{r['map_latency_p99_ms']:9.1f}")
        z = results["max_rate_zero_drops_hz"]
        lines.append(f"highest swept rate with zero drops: {z:.0f} frames/s "
                     f"({z / bare:.2f} of the bare engine)")
    if "refine" in results:
        r = results["refine"]
        lines += ["\nrefinement (IOC --probe scan.h5), saturated, frames through the map stage:",
                  f"{'  Stitch:Refine 0':<40}{r['off']['map_throughput_hz']:10.1f} frames/s, "
                  f"map p99 {r['off']['map_latency_p99_ms']:.0f} ms",
                  f"{'  Stitch:Refine 1':<40}{r['on']['map_throughput_hz']:10.1f} frames/s, "
                  f"map p99 {r['on']['map_latency_p99_ms']:.0f} ms",
                  f"{'  on / off':<40}{r['on_over_off']:10.2f}"]
        if "passes_at_end" in r["on"]:
            lines.append(f"  refinement passes when the last frame was placed {r['on']['passes_at_end']:.2f}; "
                         f"every frame refined {r['on']['catch_up_s']:.1f} s later")
    if "workers" in results:
        lines += ["\nscale-out: sim detector (pvapy, distributor) -> N pvapy-hpc-consumer "
                  "workers -> IOC gather (--stitch-input):",
                  f"{'workers':>8}{'rate':>7}{'out':>6}{'out Hz':>9}{'x bare':>8}{'p50 ms':>9}"
                  f"{'p99 ms':>9}{'map Hz':>9}{'stitched':>9}{'missed':>7}{'gaps':>6}"
                  f"{'dups':>6}"]
        for w in results["workers"]:
            for r in w["rows"]:
                req = f"{r['requested_rate_hz']:.0f}" if r["requested_rate_hz"] else "max"
                lines.append(f"{r['workers']:>8}{req:>7}{r['out']:6d}{r['throughput_hz']:9.1f}"
                             f"{r['ratio_to_bare']:8.2f}{r['latency_p50_ms']:9.1f}"
                             f"{r['latency_p99_ms']:9.1f}{r['map_throughput_hz']:9.1f}"
                             f"{r['stitched']:9d}{r['consumer_missed']:7d}"
                             f"{r['gather'].get('gaps', 0):6d}"
                             f"{r['gather'].get('duplicates', 0):6d}")
    if "baseline_per_frame" in results:
        b = results["baseline_per_frame"]
        lines += ["\npublished consumer (pvapy UserDataProcessor, onnxruntime per frame), "
                  "its outputs stitched by the IOC as the workers' are:",
                  f"{'  detector at max rate':<40}{b['throughput_hz']:10.1f} frames/s "
                  f"({b['throughput_hz'] / bare:.2f} of bare), out {b['out']}/{b['sent']}, "
                  f"p50 {b['latency_p50_ms']:.0f} ms, p99 {b['latency_p99_ms']:.0f} ms; "
                  f"map {b['map_throughput_hz']:.1f} frames/s, stitched {b['stitched']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
