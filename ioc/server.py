"""The edge IOC: a p4p server for the PV table, hosting the inference and map plugins.

Data flows one way, batch by batch: detector NTNDArray monitor -> PluginDriver(InferencePlugin)
-> PluginDriver(StitchingPlugin) -> ``$(P)Stitch:Image``; the inference stage also hands each
batch to the NN:Phase publisher. The map stage refines the map against the frames when a probe
is known (``--probe``, or a write to ``$(P)Stitch:Probe``), so the sample shows before any
model serves. A model written to ``$(P)NN:Model`` is validated on a loader thread and swapped
in between batches; accepted models go to the model store, which a restart serves.

The IOC follows the host's EPICS environment (EPICS_PVA_*, EPICS_CA_*), as any IOC does;
``--loopback`` keeps it on 127.0.0.1 for a try-out on one machine.

    ptychostream-ioc --prefix PTYCHO: --input 13SIM1:Pva1:Image --model-store ~/models --ca
    ptychostream-ioc --config ioc.toml
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from ptychostream.pvnames import DEFAULT_PREFIX

log = logging.getLogger(__name__)

#: pvAccess monitor queue (frames the client library holds for our callback): our callback only
#: enqueues, so this absorbs bursts; at 64, bursts at 4 kHz were squashed before the IOC saw
#: them (counted as missed). 1024 uint32 128x128 frames are 64 MB at most
MONITOR_REQUEST = "record[queueSize=1024]"
#: a missing input PV is reported once after this many seconds (it keeps being searched for)
INPUT_WARN_S = 10.0
#: what one queued input frame may hold: a 128x128 frame of float64 (the largest the network
#: takes); QueueSize x this must fit in ``queue_memory_mb``
FRAME_BYTES = 128 * 128 * 8


MINOR_ALARM = 1


def _rss_mb() -> float:
    """This process's resident memory (MiB), from /proc (Linux); 0 where there is none."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _trim_heap() -> None:
    """Give freed memory back to the system (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: inference workers on the CPU (onnxruntime), when not set: one per core up to this many,
#: each engine call on cores of its own, which keeps the cores busier than one call spread
#: over all of them (2 cores, bench_pipeline.py: see README "Benchmarks")
MAX_AUTO_WORKERS = 4


def engine_workers_for(engine: str, device: str | None, workers: int = 0) -> int:
    """Inference workers (threads taking batches in turn, outputs kept in order): ``workers``
    if set; else, for onnxruntime on the CPU, one per usable core up to MAX_AUTO_WORKERS; else
    one (a GPU engine's captured graphs and pinned buffer serve one caller)."""
    if workers:
        return int(workers)
    if engine == "onnxruntime" and (device or "cpu") == "cpu":
        return max(1, min(MAX_AUTO_WORKERS, usable_cores()))
    return 1


def worker_engine_kwargs(engine: str, workers: int, kwargs: dict | None = None) -> dict:
    """Engine options for ``workers`` inference workers: onnxruntime's calls split the cores
    between them (``threads``), unless the caller chose; other engines unchanged."""
    out = dict(kwargs or {})
    if engine == "onnxruntime" and workers > 1:
        out.setdefault("threads", max(1, usable_cores() // workers))
    return out


def max_queue_for(queue_memory_mb: float) -> int:
    """The longest input queue (frames) that ``queue_memory_mb`` MiB can hold."""
    return max(1, int(queue_memory_mb * 2**20 // FRAME_BYTES))


class EdgeIOC:
    """Serves the PV table under ``prefix`` and runs the plugins; ``start()``/``stop()``.

    Starts with no model if none is stored or given (ModelStatus_RBV says so); a model write
    changes it without a restart. ``model_store`` wins over ``model_file`` on start, so a
    restarted IOC serves the last good model. ``probe``: a probe file (scan, reconstruction or
    .npy) or array to refine the map with from the first frame."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, input_pv: str | None = None,
                 engine: str = "onnxruntime", batch_size: int = 8,
                 model_file: str | Path | None = None, model_store: str | Path | None = None,
                 ca_mirror: bool = False, queue_size: int = 256, intensity_scale: float = 1.0,
                 stitch_inputs: tuple[str, ...] | list[str] = (), stitch_pixel_m: float = 0.0,
                 flush_s: float = 0.02, probe=None, refine: bool = True,
                 map_dir: str | Path | None = None, access=None, device: str | None = None,
                 engine_kwargs: dict | None = None, refine_threads: int | None = 1,
                 stats_period_s: float = 0.25, model_store_required: bool = False,
                 queue_memory_mb: float = 2048.0, memory_headroom_mb: float = 2048.0,
                 engine_workers: int = 0) -> None:
        from ptychostream import codecs  # noqa: F401  (registers the NTNDArray decoders)
        from ptychostream.ioc.groups import LATER_STAGE_NICE, InferencePVs, QAPVs, StitchPVs
        from ptychostream.ioc.model_store import ModelStore
        from ptychostream.ioc.pvtable import PVTable
        from ptychostream.ntndarray import batch_from_values
        from ptychostream.plugins.driver import PluginDriver
        from ptychostream.plugins.inference import InferencePlugin
        from ptychostream.plugins.stitching import StitchingPlugin

        self.prefix, self.input_pv = prefix, input_pv
        self.stitch_inputs = list(stitch_inputs)
        self.model_file = Path(model_file) if model_file else None
        self.store = ModelStore(model_store) if model_store else None
        self.refine_threads = refine_threads
        self.table = PVTable(prefix, initial={
            "NN:BatchSize": batch_size, "NN:IntensityScale": intensity_scale,
            "NN:Engine_RBV": engine, "NN:QueueSize": queue_size, "NN:QueueFree_RBV": queue_size,
        }, access=access)
        self.engine_workers = engine_workers_for(engine, device, engine_workers)
        engine_kwargs = worker_engine_kwargs(engine, self.engine_workers, engine_kwargs)
        if engine == "onnxruntime":  # the engine shares the cores with the server's threads
            engine_kwargs.setdefault("spinning", False)
        self.device = device or "cpu"
        self.inference = InferencePlugin(engine, intensity_scale, engine_kwargs)
        self.stitching = StitchingPlugin(stitch_pixel_m, refine=refine, device=self.device,
                                         idle_gate=lambda: self.nn.idle(),
                                         backlog=lambda: self.nn.queued)
        # the chain, built from its end: map stage, then inference feeding it
        self.stitch = PluginDriver(self.stitching, queue_size=4096, flush_s=0.0,
                                   stats_period_s=stats_period_s,
                                   max_queue=max(4096, max_queue_for(queue_memory_mb)),
                                   nice=LATER_STAGE_NICE)
        self.nn = PluginDriver(self.inference, queue_size=queue_size, batch_size=batch_size,
                               flush_s=flush_s, decode=batch_from_values,
                               stats_period_s=stats_period_s,
                               max_queue=max_queue_for(queue_memory_mb),
                               workers=self.engine_workers)
        self.access = access
        self.nn_pvs = InferencePVs(self.table, self.nn, self.inference, self.store,
                                   store_required=model_store_required)
        self.stitch_pvs = StitchPVs(self.table, self.stitch, self.stitching, map_dir)
        self.qa_pvs = QAPVs(self.table)
        self.nn.sinks = [self.stitch.push_batch, self.nn_pvs.publisher]
        self.ca = None
        if ca_mirror:
            from ptychostream.ioc.ca_mirror import CAMirror

            self.ca = CAMirror(self.table)
        self._initial_probe = probe
        self.memory_headroom_mb = float(memory_headroom_mb)
        self.memory_resets = 0  # times the guard found memory over the headroom
        self.peers_dropped = 0  # client connections it dropped for not reading
        self.memory_base_mb = 0.0  # RSS the guard measures growth from (set at start)
        self.gather = None  # scale-out: consumers' phases in uniqueId order (start, stitch inputs)
        self._startup_load = None
        self._stop = threading.Event()
        self.input_connected = threading.Event()  # set while the input monitor has a channel
        self._server = self._ctx = self._queue = None
        self._subs: list = []
        self._input_timer: threading.Timer | None = None
        self._ever_connected = False

    # ------------------------------------------------------------------ data path
    def _on_frame(self, value) -> None:
        """Input monitor callback: never blocks and never raises (p4p closes a subscription
        whose callback raises): a full queue or a malformed update is counted, that is all."""
        from ptychostream.ntndarray import is_placeholder
        from ptychostream.plugins.driver import MINOR

        try:
            if isinstance(value, Exception):
                self.input_connected.clear()
                self.nn_pvs.input_connected = False
                if not self._ever_connected:
                    what = f"Waiting for input PV {self.input_pv}"
                elif type(value).__name__ == "Disconnected":
                    what = f"input {self.input_pv}: Disconnected (reconnects when it returns)"
                else:
                    what = f"input {self.input_pv}: {value.__class__.__name__}: {value}"
                self.nn.set_condition("input", MINOR, what, kind="driver")
                if self._ever_connected:
                    log.warning(what)
                return
            if not self.input_connected.is_set():
                self.input_connected.set()
                self.nn_pvs.input_connected = True
                self._ever_connected = True
                self.nn.clear_condition("input")
                log.info("input %s connected", self.input_pv)
            if is_placeholder(value):
                return  # the empty array a detector PV holds before its first frame
            try:
                uid = int(value["uniqueId"])
            except Exception:
                uid = None
            self.nn.push(value, unique_id=uid)
        except Exception as exc:
            self.nn.reject(f"{exc.__class__.__name__}: {exc}")

    def _on_external_phase(self, value) -> None:
        """Scale-out: a consumer's phase image goes to the gather, which hands the images of all
        consumers to the map stage in uniqueId order (see ptychostream.plugins.gather)."""
        from ptychostream.ntndarray import batch_from_values, is_placeholder

        try:
            if isinstance(value, Exception) or is_placeholder(value):
                return
            batch = batch_from_values([value])
            batch.phase, batch.frames = batch.data, False
            if batch.extra and "ModelVersion" in batch.extra[0]:
                batch.model_version = int(batch.extra[0].pop("ModelVersion") or 0)
                batch.model_name = str(batch.extra[0].pop("ModelName", ""))
            if len(batch):
                self.gather.push(batch)
            else:
                self.stitch.reject(batch.problems[0][0] if batch.problems
                                   else "empty phase image")
        except Exception as exc:
            self.stitch.reject(f"phase image: {exc.__class__.__name__}: {exc}")

    def _count_gaps(self, n: int) -> None:
        """uniqueIds no consumer delivered within the gather's timeout: missed by the map."""
        self.stitch.missed += n

    # ------------------------------------------------------------------ models and probes
    def wait_model(self, timeout: float = 60.0) -> int:
        """Wait for the start-up model and probe loads; returns the serving version (0: none)."""
        if self._startup_load is not None:
            self._startup_load.result(timeout)
        return self.inference.model_version

    def _startup(self) -> None:
        self.nn_pvs.load_startup_model(self.model_file)
        if self._initial_probe is not None:
            p = self._initial_probe
            self.stitch_pvs.load_probe(p)  # named by where it came from (scan file ...)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> EdgeIOC:
        from p4p.client.thread import Context
        from p4p.server import Server
        from p4p.util import ThreadedWorkQueue

        from ptychostream.epics_env import pva_server_conf

        if self.refine_threads and self.device == "cpu":
            import torch  # the map stage shares the cores with the engine: one thread is its share

            torch.set_num_threads(int(self.refine_threads))
        self._server = Server(providers=[self.table.provider()], conf=pva_server_conf(),
                              useenv=True)
        if self.ca is not None:
            self.ca.start()
        self.stitch.start()
        self.nn.start()
        if self.store is None:
            log.warning("no model store: deployed models are not kept across restarts")
        if self.access is None:
            log.warning("access security off: any host and user may write every PV "
                        "(add an [access] section to the config; see docs/ioc.md)")
        else:
            log.info("access security: %s", getattr(self.access, "describe", repr)())
        self._startup_load = self.nn_pvs.submit(self._startup)
        self._ctx = Context("pva", nt=False)
        self._ever_connected = False
        if self.input_pv:
            from ptychostream.plugins.driver import MINOR

            self.nn.set_condition("input", MINOR, f"Waiting for input PV {self.input_pv}",
                                  kind="driver")
            # a work queue of its own: no other PV's callback ever delays the frames
            self._queue = ThreadedWorkQueue(name="ioc-input", maxsize=0, daemon=True).start()
            self._subs.append(self._ctx.monitor(self.input_pv, self._on_frame,
                                                request=MONITOR_REQUEST, notify_disconnect=True,
                                                queue=self._queue))
            self._input_timer = threading.Timer(INPUT_WARN_S, self._warn_no_input)
            self._input_timer.daemon = True
            self._input_timer.start()
        else:
            log.info("no --input: only --stitch-input phases (if any) reach the map")
        if self.stitch_inputs and self.gather is None:
            from ptychostream.plugins.gather import Gather

            self.gather = Gather(self.stitch.push_batch, on_gaps=self._count_gaps,
                                 name="Stitch gather")
            tick = self.stitch.on_tick  # the map stage's tick also releases what waited too long

            def on_tick() -> None:
                self.gather.poll()
                if tick is not None:
                    tick()

            self.stitch.on_tick = on_tick
        for pv in self.stitch_inputs:
            # deep: a worker posts a whole batch at once, and what its server squashes is lost
            self._subs.append(self._ctx.monitor(pv, self._on_external_phase,
                                                request="record[queueSize=1024]"))
        self._stop.clear()
        if self.memory_headroom_mb > 0:
            threading.Thread(target=self._guard_memory, name="ioc-memory-guard",
                             daemon=True).start()
        log.info("edge IOC %s serving %d PVs; input %s", self.prefix, len(self.table.pvs),
                 self.input_pv or "(none)")
        return self

    def _guard_memory(self, period_s: float = 1.0) -> None:
        """Bound the IOC's memory under any client: pvxs keeps as many updates for a
        subscriber as its pvRequest asks (``record[queueSize=100000]``, no server-side cap) and
        p4p cannot refuse it, so a client that stops reading grows the IOC by one image per
        frame. Past ``memory_headroom_mb`` above the RSS at start, the connections whose send
        queue has stayed full (:mod:`ptychostream.ioc.peers`) are dropped: pvxs frees what it
        queued for them, every other client goes on untouched, and the dropped one reconnects
        when it reads again."""
        from ptychostream.ioc.peers import StallWatch, drop
        from ptychostream.plugins.driver import name_os_thread

        name_os_thread()
        try:  # the size at start: with the start-up model loaded
            self._startup_load.result(120)
        except Exception:
            pass
        self.memory_base_mb = _rss_mb()
        try:
            port = int(self._server.conf()["EPICS_PVAS_SERVER_PORT"])
        except (KeyError, ValueError, AttributeError):
            port = 0
        watch = StallWatch(port)
        while not self._stop.wait(period_s):
            stalled = watch.sample() if port else []
            rss, base = _rss_mb(), self.memory_base_mb
            if rss - base <= self.memory_headroom_mb:
                continue
            for peer in stalled:
                try:
                    drop(peer)
                    self.peers_dropped += 1
                except OSError as exc:  # gone meanwhile
                    log.debug("dropping %s: %r", peer.address, exc)
            self._stop.wait(0.2)  # pvxs frees the connection on its own thread
            _trim_heap()
            after = _rss_mb()
            who = ", ".join(p.address for p in stalled) or "no client holding it"
            msg = (f"memory {rss - base:.0f} MB above start, over the "
                   f"{self.memory_headroom_mb:.0f} MB headroom: dropped {len(stalled)} client(s) "
                   f"that stopped reading ({who}), {rss - after:.0f} MB freed")
            self.memory_resets += 1
            log.warning(msg)
            self.nn.set_error(msg, MINOR_ALARM, kind="record")
            if after - base > self.memory_headroom_mb / 2:  # not client queues: do not thrash
                self.memory_base_mb = after

    def _warn_no_input(self) -> None:
        if not self._ever_connected and not self._stop.is_set():
            log.warning("input PV %s not found after %.0f s: check --input and the detector's "
                        "PVA plugin (still searching)", self.input_pv, INPUT_WARN_S)

    def stop(self) -> None:
        self._stop.set()
        if self._input_timer is not None:
            self._input_timer.cancel()
        for sub in self._subs:
            sub.close()
        self._subs.clear()
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._queue is not None:
            self._queue.stop()
            self._queue = None
        self.nn.stop()
        if self.gather is not None:
            self.gather.flush()  # consumers' phases still waiting for a gap go to the map
        self.stitch.stop()
        self.nn_pvs.stop()
        self.stitch_pvs.stop()
        if self.ca is not None:
            self.ca.stop()
        if self._server is not None:
            self._server.stop()
            self._server = None
        log.info("edge IOC %s stopped", self.prefix)

    def __enter__(self) -> EdgeIOC:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- CLI
OPTIONS = ("prefix", "input", "engine", "batch_size", "model_file", "model_store", "ca",
           "queue_size", "intensity_scale", "stitch_input", "stitch_pixel", "probe", "refine",
           "map_dir", "log_level", "loopback", "model_store_required", "queue_memory_mb",
           "memory_headroom_mb", "engine_workers")
DEFAULTS = {"prefix": DEFAULT_PREFIX, "input": None, "engine": "onnxruntime", "batch_size": 8,
            "model_file": None, "model_store": None, "ca": False, "queue_size": 256,
            "intensity_scale": 1.0, "stitch_input": [], "stitch_pixel": 0.0, "probe": None,
            "refine": True, "map_dir": None, "log_level": "INFO", "loopback": False,
            "model_store_required": False, "queue_memory_mb": 2048.0,
            "memory_headroom_mb": 2048.0, "engine_workers": 0, "access": None}
ENGINES = ("onnxruntime", "torch", "tensorrt")


class ConfigError(ValueError):
    """A configuration mistake, said in one line."""


def _check(merged: dict) -> dict:
    """Types and ranges of every option; raises ConfigError naming the option."""
    out = dict(merged)

    def number(key, kind, lo, hi):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ConfigError(f"{key} must be a number, got {v!r}")
        try:
            v = kind(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a{'n integer' if kind is int else ' number'}, "
                              f"got {out[key]!r}") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ConfigError(f"{key} must be in [{lo:g}, {hi:g}], got {v!r}")
        out[key] = v

    number("batch_size", int, 1, 1024)
    number("engine_workers", int, 0, 64)
    number("queue_memory_mb", float, 1.0, 1024.0 * 1024)
    number("memory_headroom_mb", float, 0.0, 1024.0 * 1024)
    number("queue_size", int, 1, max_queue_for(out["queue_memory_mb"]))
    number("intensity_scale", float, 1e-6, 1e6)
    number("stitch_pixel", float, 0.0, 1e-3)
    if out["engine"] not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {out['engine']!r}")
    for key in ("prefix", "input", "model_file", "model_store", "probe", "map_dir"):
        if out[key] is not None and not isinstance(out[key], str):
            raise ConfigError(f"{key} must be a string, got {out[key]!r}")
    for key in ("ca", "refine", "loopback", "model_store_required"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"{key} must be true or false, got {out[key]!r}")
    if isinstance(out["stitch_input"], str):
        out["stitch_input"] = [out["stitch_input"]]
    if out["model_file"]:
        from ptychostream.basemodel import resolve_model
        from ptychostream.modelfile import ModelError

        try:
            out["model_file"] = str(resolve_model(out["model_file"]))  # 'builtin' or a file
        except ModelError as exc:
            raise ConfigError(f"model: {exc}") from None
    if out["probe"] and not Path(out["probe"]).is_file():
        raise ConfigError(f"probe {out['probe']} does not exist or is not a file")
    for key in ("model_store", "map_dir"):
        if out[key]:
            d = Path(out[key]).expanduser()
            if d.exists() and not d.is_dir():
                raise ConfigError(f"{key} {d} is a file, not a folder")
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{key} {d} cannot be created: {exc.strerror or exc}") from exc
            if not os.access(d, os.W_OK | os.X_OK):
                raise ConfigError(f"{key} {d} is not writable by this user")
    if out["model_store_required"] and not out["model_store"]:
        raise ConfigError("model_store_required needs a model_store")
    if isinstance(out["log_level"], str):
        out["log_level"] = out["log_level"].upper()
    if out["log_level"] not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got "
                          f"{out['log_level']!r}")
    if out["access"] is not None and not callable(out["access"]):
        from ptychostream.ioc.access import AccessConfigError, AccessPolicy

        try:
            out["access"] = AccessPolicy.from_config(out["access"])
        except AccessConfigError as exc:
            raise ConfigError(str(exc)) from None
    return out


def _engine_available(name: str) -> str | None:
    """Why engine ``name`` cannot run here, or None."""
    import importlib.util

    module = {"onnxruntime": "onnxruntime", "torch": "torch", "tensorrt": "tensorrt"}[name]
    if importlib.util.find_spec(module) is None:
        return f"engine {name} needs the {module} package, which is not installed"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over config file over defaults; a mistake is one line and exit status 2."""
    p = argparse.ArgumentParser(prog="ptychostream-ioc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with any of the options below (key = long "
                   "option with '_', e.g. batch_size = 8), top level or under [ioc]")
    p.add_argument("--prefix", help=f"PV prefix $(P) (default {DEFAULT_PREFIX})")
    p.add_argument("--input", help="detector NTNDArray PV to monitor, e.g. 13SIM1:Pva1:Image")
    p.add_argument("--engine", help="onnxruntime (default), torch or tensorrt")
    p.add_argument("--batch-size", type=int, help="frames per engine call (default 8)")
    p.add_argument("--engine-workers", type=int,
                   help="inference workers taking batches in turn, outputs kept in order "
                   f"(default 0: onnxruntime on the CPU one per core, up to {MAX_AUTO_WORKERS}; "
                   "other engines 1)")
    p.add_argument("--model", "--model-file", dest="model_file",
                   help="model to serve when the store has none: ONNX or a state dict, or "
                   "'builtin' for the shipped base model")
    p.add_argument("--model-store", help="folder keeping accepted models; restart serves the last")
    p.add_argument("--probe", help="probe to refine the map with from the first frame: a scan "
                   "file, a reconstruction file (ptychostream.hpc) or .npy")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="refine the map against the frames when a probe is known (default on)")
    p.add_argument("--map-dir", help="folder where Stitch:SaveFile writes maps")
    p.add_argument("--ca", action=argparse.BooleanOptionalAction, default=None,
                   help="Channel Access mirror of the scalar PVs (default off)")
    p.add_argument("--queue-size", type=int, help="input queue length (default 256)")
    p.add_argument("--queue-memory-mb", type=float,
                   help="memory the input queue may hold, MiB (default 2048): QueueSize times "
                   "128 KiB (a float64 128x128 frame) must fit")
    p.add_argument("--memory-headroom-mb", type=float,
                   help="memory the IOC may grow above its start (MiB, default 2048; 0: no "
                   "guard): past it, clients that stopped reading are dropped, freeing what "
                   "pvAccess queued for them")
    p.add_argument("--model-store-required", action=argparse.BooleanOptionalAction,
                   default=None, help="refuse a model the store cannot keep, instead of "
                   "serving it unsaved with a MAJOR alarm (default off)")
    p.add_argument("--intensity-scale", type=float, help="multiply frames before inference")
    p.add_argument("--stitch-input", action="append",
                   help="extra phase NTNDArray PV to stitch (scale-out consumers); repeatable")
    p.add_argument("--stitch-pixel", type=float,
                   help="map pixel size (m) for frames without a PixelSize attribute")
    p.add_argument("--loopback", action=argparse.BooleanOptionalAction, default=None,
                   help="serve and search on 127.0.0.1 only (a try-out on one machine); "
                   "default: the host's EPICS_* environment")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    args = p.parse_args(argv)
    merged = dict(DEFAULTS)
    if args.config:
        import tomllib

        try:
            with open(args.config, "rb") as fh:
                conf = tomllib.load(fh)
        except FileNotFoundError:
            p.error(f"config file {args.config} does not exist")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            p.error(f"config file {args.config} is not valid TOML: {exc}")
        except OSError as exc:
            p.error(f"config file {args.config}: {exc}")
        access = conf.get("access")
        conf = conf.get("ioc", conf)
        access = conf.get("access", access)
        unknown = set(conf) - set(OPTIONS) - {"access", "ioc"}
        if unknown:
            p.error(f"unknown keys in {args.config}: {', '.join(sorted(unknown))}")
        merged.update({k: v for k, v in conf.items() if k != "access"})
        merged["access"] = access
    merged.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    try:
        merged = _check(merged)
    except ConfigError as exc:
        p.error(str(exc))
    why = _engine_available(merged["engine"])
    if why:
        p.error(why)
    return argparse.Namespace(**merged)


def tune_process() -> None:
    """Process settings of a serving IOC (``main`` and the benchmarks' IOC alike): threads hand
    the GIL over after 1 ms rather than 5, since inference returning from onnxruntime waits
    that long for the publisher or the map stage (in-process, 2 cores: 0.70 -> 0.82 of the
    bare engine)."""
    sys.setswitchinterval(0.001)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tune_process()
    if a.loopback:  # the user's explicit choice; without it the host's EPICS_* environment
        from ptychostream.epics_env import configure

        configure(loopback=True)
    from ptychostream import setup_logging

    setup_logging(a.log_level)
    try:
        ioc = _make_ioc(a)
    except OSError as exc:  # e.g. the model store vanished or became unreadable since the check
        log.error("cannot start: %s", exc)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    ioc.start()
    try:
        done.wait()
    finally:
        ioc.stop()
    return 0


def _make_ioc(a: argparse.Namespace) -> EdgeIOC:
    return EdgeIOC(prefix=a.prefix, input_pv=a.input, engine=a.engine, batch_size=a.batch_size,
                  model_file=a.model_file, model_store=a.model_store, ca_mirror=a.ca,
                  queue_size=a.queue_size, intensity_scale=a.intensity_scale,
                  stitch_inputs=a.stitch_input, stitch_pixel_m=a.stitch_pixel, probe=a.probe,
                  refine=a.refine, map_dir=a.map_dir, access=a.access,
                  model_store_required=a.model_store_required,
                  queue_memory_mb=a.queue_memory_mb,
                  memory_headroom_mb=a.memory_headroom_mb, engine_workers=a.engine_workers)


if __name__ == "__main__":
    raise SystemExit(main())
