"""The edge IOC: a p4p server for the PV table, hosting the inference and stitching plugins.

Data path: detector NTNDArray monitor -> PluginDriver(InferencePlugin) -> ``$(P)NN:Phase`` and
-> PluginDriver(StitchingPlugin) -> ``$(P)Stitch:Image`` (republished at most every
``Stitch:UpdatePeriod`` s). Scale-out consumers' phase outputs can feed the stitcher too
(``--stitch-input``). A model written to ``$(P)NN:Model`` is validated on a loader thread and
swapped in between batches; accepted models go to the model store, which a restart serves.

    ptychostream-ioc --prefix PTYCHO: --input 13SIM1:Pva1:Image --model-store ~/models --ca
    ptychostream-ioc --config ioc.toml
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ptychostream.epics_env import use_loopback
from ptychostream.model import ModelError
from ptychostream.ntndarray import Frame, from_value
from ptychostream.plugins.driver import MAJOR, MINOR, NO_ALARM, PluginDriver
from ptychostream.plugins.inference import InferencePlugin, model_name_for
from ptychostream.plugins.stitching import StitchingPlugin
from ptychostream.pvnames import DEFAULT_PREFIX

log = logging.getLogger(__name__)

#: pvAccess monitor queue: our callbacks only enqueue, so this absorbs bursts, not slowness
MONITOR_REQUEST = "record[queueSize=64]"


def _empty(value) -> bool:
    """The placeholder an NTNDArray PV holds before its first array (uniqueId 0, no data)."""
    return value["uniqueId"] == 0 and not any(d["size"] for d in value["dimension"])


class EdgeIOC:
    """Serves the PV table under ``prefix`` and runs the plugins; ``start()``/``stop()``.

    Starts with no model if none is stored or given (ModelStatus_RBV says so); a model write
    changes it without a restart. ``model_store`` wins over ``model_file`` on start, so a
    restarted IOC serves the last good model."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, input_pv: str | None = None,
                 engine: str = "onnxruntime", batch_size: int = 8,
                 model_file: str | Path | None = None, model_store: str | Path | None = None,
                 ca_mirror: bool = False, queue_size: int = 256, intensity_scale: float = 1.0,
                 stitch_inputs: tuple[str, ...] | list[str] = (), stitch_pixel_m: float = 0.0,
                 flush_s: float = 0.02, stats_period_s: float = 0.25,
                 engine_kwargs: dict | None = None) -> None:
        use_loopback()
        from ptychostream.ioc.model_store import ModelStore
        from ptychostream.ioc.pvtable import PVTable

        self.prefix, self.input_pv = prefix, input_pv
        self.stitch_inputs = list(stitch_inputs)
        self.model_file = Path(model_file) if model_file else None
        self.store = ModelStore(model_store) if model_store else None
        self.stats_period_s = stats_period_s
        self.table = PVTable(prefix, initial={
            "NN:BatchSize": batch_size, "NN:IntensityScale": intensity_scale,
            "NN:Engine_RBV": engine, "NN:QueueSize": queue_size, "NN:QueueFree_RBV": queue_size,
            "Stitch:PixelSize": stitch_pixel_m,
        })
        engine_kwargs = dict(engine_kwargs or {})
        if engine == "onnxruntime":  # the engine shares the cores with the server's threads
            engine_kwargs.setdefault("spinning", False)
        self.inference = InferencePlugin(engine, intensity_scale, engine_kwargs)
        self.stitching = StitchingPlugin(stitch_pixel_m)
        self.stitch = PluginDriver(self.stitching, queue_size=1024, batch_size=32, flush_s=0.0)
        self.nn = PluginDriver(self.inference, sink=self._on_phase, queue_size=queue_size,
                               batch_size=batch_size, flush_s=flush_s, decode=from_value)
        self.ca = None
        if ca_mirror:
            from ptychostream.ioc.ca_mirror import CAMirror

            self.ca = CAMirror(self.table)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._startup_load = None
        self._stop = threading.Event()
        self.input_connected = threading.Event()  # set while the input monitor has a channel
        self._server = self._ctx = None
        self._subs: list = []
        self._stats_thread: threading.Thread | None = None
        self._stitch_posted = (-1, 0.0)
        self._connect_hooks()

    # ------------------------------------------------------------------ PV writes
    def _connect_hooks(self) -> None:
        t = self.table

        def in_range(kind, name, lo=None, hi=None):
            def check(v):
                v = kind(v)
                if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
                    raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
                return v
            return check

        def setter(check, apply):
            def hook(v):
                v = check(v)
                apply(v)
                return v
            return hook

        for plugin, drv in (("NN", self.nn), ("Stitch", self.stitch)):
            t.on_put(f"{plugin}:EnableCallbacks",
                     setter(int, lambda v, d=drv: setattr(d, "enabled", bool(v))))
            t.on_put(f"{plugin}:QueueSize", setter(in_range(int, "QueueSize", 1, 100000),
                                                   lambda v, d=drv: setattr(d, "queue_size", v)))
            t.on_put(f"{plugin}:ArrayCounter", setter(in_range(int, "ArrayCounter", 0, 0),
                                                      lambda v, d=drv: d.reset_counters()))
        t.on_put("NN:BatchSize", setter(in_range(int, "BatchSize", 1, 4096),
                                        lambda v: setattr(self.nn, "batch_size", v)))
        t.on_put("NN:IntensityScale", setter(in_range(float, "IntensityScale", 1e-9, 1e9),
                                             lambda v: setattr(self.inference, "intensity_scale", v)))
        t.on_put("Stitch:PixelSize", setter(in_range(float, "PixelSize", 0.0, 1e-3),
                                            lambda v: setattr(self.stitching, "pixel_m", v)))
        t.on_put("Stitch:UpdatePeriod", setter(in_range(float, "UpdatePeriod", 0.0, 3600.0),
                                               lambda v: None))
        t.on_put("Stitch:Reset", self._on_reset)
        t.on_put("Stitch:Positions", self._on_positions)
        t.on_put_async("NN:Model", lambda v, done: self._loader.submit(self._deploy, *v, done))

    def _on_reset(self, value) -> int:
        """Write 1 to start a new map; the PV reads back 0 (done), as areaDetector's resets do."""
        if int(value):
            self.stitching.reset()
            self.table.set("Stitch:NumFrames_RBV", 0)
        return 0

    def _on_positions(self, cols: dict) -> dict:
        x, y, uid = cols["x"], cols["y"], cols["uniqueId"]
        if len(x) != len(y):
            raise ValueError(f"Stitch:Positions: {len(x)} x but {len(y)} y values")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("Stitch:Positions: positions must be finite")
        self.stitching.set_positions(np.stack([x, y], axis=1), uid if len(uid) else None)
        self.table.set("Stitch:NumFrames_RBV", 0)
        return cols

    # ------------------------------------------------------------------ models
    def _next_version(self) -> int:
        stored = self.store.current() if self.store else None
        return max(self.inference.model_version, stored.version if stored else 0) + 1

    def _deploy(self, data: bytes, name: str = "", done=None, version: int | None = None,
                save: bool = True) -> bool:
        """Validate and swap in a model (loader thread). ``done(error)`` completes a PV put."""
        t = self.table
        name = model_name_for(data, name)
        t.set("NN:ModelStatus_RBV", f"Validating {name}")
        try:
            serving = self.inference.load_model(data, name, version or self._next_version())
        except ModelError as exc:
            msg = f"Refused {name}: {exc}"
            log.warning(msg)
            t.set("NN:ModelStatus_RBV", msg, severity=MAJOR)
            if done:
                done(msg)
            return False
        status, severity = f"Serving {name} (v{serving.version})", NO_ALARM
        if self.store is not None and save:
            try:
                self.store.save(data, name, serving.version)
            except OSError as exc:
                status, severity = f"{status}; not saved: {exc}", MINOR
        t.set("NN:ModelVersion_RBV", serving.version)
        t.set("NN:ModelName_RBV", name)
        t.set("NN:Engine_RBV", serving.engine.describe())
        t.set("NN:ModelStatus_RBV", status, severity=severity)
        if done:
            done(None)
        return True

    def _load_startup_model(self) -> None:
        stored = self.store.current() if self.store else None
        if stored is not None:
            log.info("serving stored model %s (v%d) from %s", stored.name, stored.version,
                     stored.file)
            if self._deploy(stored.path.read_bytes(), stored.name, version=stored.version,
                            save=False):
                return
        if self.model_file is not None:
            try:
                data = self.model_file.read_bytes()
            except OSError as exc:
                self.table.set("NN:ModelStatus_RBV", f"Cannot read {self.model_file}: {exc}",
                               severity=MAJOR)
                return
            self._deploy(data, self.model_file.stem)
        elif stored is None:
            self.table.set("NN:ModelStatus_RBV", "No model loaded", severity=MINOR)

    def wait_model(self, timeout: float = 60.0) -> int:
        """Wait for the start-up model load; returns the serving version (0: none)."""
        if self._startup_load is not None:
            self._startup_load.result(timeout)
        return self.inference.model_version

    # ------------------------------------------------------------------ data path
    def _on_frame(self, value) -> None:
        """Input monitor callback: never blocks (a full queue counts a drop)."""
        if isinstance(value, Exception):
            self.input_connected.clear()
            self.nn.set_error(f"input {self.input_pv}: {value.__class__.__name__} {value}", MINOR)
            return
        self.input_connected.set()
        if _empty(value):
            return  # the empty array a detector PV holds before its first frame
        self.nn.push(value)

    def _on_phase(self, frames: list[Frame]) -> None:
        """Inference sink: publish each phase image, hand it to the stitcher."""
        for f in frames:
            self.table.post_frame("NN:Phase", f)
            self.stitch.push(f)

    def _on_external_phase(self, value) -> None:
        if isinstance(value, Exception) or _empty(value):
            return
        try:
            self.stitch.push(from_value(value))
        except Exception as exc:
            self.stitch.set_error(f"bad phase array: {exc}")

    def _stats_loop(self) -> None:
        while not self._stop.wait(self.stats_period_s):
            try:
                self._update_stats()
            except Exception:
                log.exception("stats update failed")

    def _update_stats(self) -> None:
        t = self.table
        for plugin, drv in (("NN", self.nn), ("Stitch", self.stitch)):
            for key, value in drv.stats().items():
                if key == "Status_RBV":
                    t.set(f"{plugin}:Status_RBV", value[0], severity=value[1])
                else:
                    t.set(f"{plugin}:{key}", value)
        self.publish_stitched()

    def publish_stitched(self, force: bool = False) -> bool:
        """Post Stitch:Image when the map changed and UpdatePeriod has passed since the last."""
        version, last = self._stitch_posted
        now = time.monotonic()
        if not force and (self.stitching.version == version or
                          now - last < float(self.table.get("Stitch:UpdatePeriod"))):
            return False
        version = self.stitching.version
        frame = self.stitching.image()
        self.table.post_frame("Stitch:Image", frame or Frame(np.zeros((0, 0), np.float32),
                                                             attributes={"NumFrames": 0}))
        self.table.set("Stitch:NumFrames_RBV", self.stitching.n_frames)
        self._stitch_posted = (version, now)
        return True

    # ------------------------------------------------------------------ life cycle
    def start(self) -> EdgeIOC:
        from p4p.client.thread import Context
        from p4p.server import Server

        self._server = Server(providers=[self.table.provider()])
        if self.ca is not None:
            self.ca.start()
        self.nn.start()
        self.stitch.start()
        if self.store is None:
            log.warning("no model store: deployed models are not kept across restarts")
        self._startup_load = self._loader.submit(self._load_startup_model)
        self._ctx = Context("pva", nt=False)
        if self.input_pv:
            self._subs.append(self._ctx.monitor(self.input_pv, self._on_frame,
                                                request=MONITOR_REQUEST, notify_disconnect=True))
        for pv in self.stitch_inputs:
            self._subs.append(self._ctx.monitor(pv, self._on_external_phase,
                                                request=MONITOR_REQUEST))
        self._stop.clear()
        self._stats_thread = threading.Thread(target=self._stats_loop, name="ioc-stats",
                                              daemon=True)
        self._stats_thread.start()
        log.info("edge IOC %s serving %d PVs; input %s", self.prefix, len(self.table.pvs),
                 self.input_pv or "(none)")
        return self

    def stop(self) -> None:
        self._stop.set()
        for sub in self._subs:
            sub.close()
        self._subs.clear()
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self.nn.stop()
        self.stitch.stop()
        self._loader.shutdown(wait=True, cancel_futures=True)
        if self._stats_thread is not None:
            self._stats_thread.join(5.0)
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
           "queue_size", "intensity_scale", "stitch_input", "stitch_pixel", "log_level")
DEFAULTS = {"prefix": DEFAULT_PREFIX, "input": None, "engine": "onnxruntime", "batch_size": 8,
            "model_file": None, "model_store": None, "ca": False, "queue_size": 256,
            "intensity_scale": 1.0, "stitch_input": [], "stitch_pixel": 0.0, "log_level": "INFO"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over config file over defaults."""
    p = argparse.ArgumentParser(prog="ptychostream-ioc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with any of the options below (key = long "
                   "option with '_', e.g. batch_size = 8), top level or under [ioc]")
    p.add_argument("--prefix", help=f"PV prefix $(P) (default {DEFAULT_PREFIX})")
    p.add_argument("--input", help="detector NTNDArray PV to monitor, e.g. 13SIM1:Pva1:Image")
    p.add_argument("--engine", help="onnxruntime (default), torch or tensorrt")
    p.add_argument("--batch-size", type=int, help="frames per engine call (default 8)")
    p.add_argument("--model-file", help="model to serve when the store has none (ONNX or .pt)")
    p.add_argument("--model-store", help="folder keeping accepted models; restart serves the last")
    p.add_argument("--ca", action=argparse.BooleanOptionalAction, default=None,
                   help="Channel Access mirror of the scalar PVs (default off)")
    p.add_argument("--queue-size", type=int, help="input queue length (default 256)")
    p.add_argument("--intensity-scale", type=float, help="multiply frames before inference")
    p.add_argument("--stitch-input", action="append",
                   help="extra phase NTNDArray PV to stitch (scale-out consumers); repeatable")
    p.add_argument("--stitch-pixel", type=float,
                   help="map pixel size (m) for frames without a PixelSize attribute")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    args = p.parse_args(argv)
    merged = dict(DEFAULTS)
    if args.config:
        import tomllib

        with open(args.config, "rb") as fh:
            conf = tomllib.load(fh)
        conf = conf.get("ioc", conf)
        unknown = set(conf) - set(OPTIONS)
        if unknown:
            p.error(f"unknown keys in {args.config}: {', '.join(sorted(unknown))}")
        merged.update(conf)
    merged.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    if isinstance(merged["stitch_input"], str):
        merged["stitch_input"] = [merged["stitch_input"]]
    return argparse.Namespace(**merged)


def main(argv: list[str] | None = None) -> int:
    use_loopback()
    from ptychostream import setup_logging

    a = parse_args(argv)
    setup_logging(a.log_level)
    ioc = EdgeIOC(prefix=a.prefix, input_pv=a.input, engine=a.engine, batch_size=a.batch_size,
                  model_file=a.model_file, model_store=a.model_store, ca_mirror=a.ca,
                  queue_size=a.queue_size, intensity_scale=a.intensity_scale,
                  stitch_inputs=a.stitch_input, stitch_pixel_m=a.stitch_pixel)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    ioc.start()
    try:
        done.wait()
    finally:
        ioc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
