"""The IOC's PV groups: each PV's behaviour declared beside it (see :class:`PVGroup`).

* :class:`PluginPVs`: the areaDetector NDPluginDriver PVs every plugin carries.
* :class:`InferencePVs` (``NN:``): model deployment, batching, NN:Phase publishing.
* :class:`StitchPVs` (``Stitch:``): the live map, its planned positions, refinement, probe.
* :class:`QAPVs` (``QA:``): what the continual-learning loop reports.

The groups only translate PV writes into calls on the plugins and drivers and post what those
report; the data path itself (monitor -> inference -> map) does not pass through them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ptychostream.batch import FrameBatch
from ptychostream.ioc.pvtable import MAJOR, MINOR, OK, Alarm, PVGroup, in_range, pv
from ptychostream.modelfile import ModelError
from ptychostream.ntndarray import Frame

log = logging.getLogger(__name__)

#: priority step of the threads after inference (map stage, NN:Phase publisher): on a few
#: cores they take what inference leaves (measured in-process on 2 cores: IOC / bare engine
#: 0.76 -> 0.88 with the map stage and publisher at nice 10)
LATER_STAGE_NICE = 10
#: most frames one engine call may take (a batch of 4096 128x128 frames is 256 MB of float32)
MAX_BATCH = 1024


class PluginPVs(PVGroup):
    """EnableCallbacks, ArrayCounter, QueueSize, the counters and Status_RBV of one plugin."""

    enable_callbacks = pv("{plugin}:EnableCallbacks")
    array_counter = pv("{plugin}:ArrayCounter")
    queue_size = pv("{plugin}:QueueSize")
    status = pv("{plugin}:Status_RBV")

    def __init__(self, table, driver) -> None:
        self.driver = driver
        super().__init__(table)
        driver.on_stats = self.post_stats

    @enable_callbacks.put
    def enable_callbacks(self, value: int) -> int:
        self.driver.enabled = bool(int(value))
        return int(value)

    @array_counter.put
    def array_counter(self, value: int) -> int:
        in_range(int, "ArrayCounter", 0, 0)(value)  # areaDetector: write 0 to reset
        self.driver.reset_counters()
        self.post_stats(self.driver.stats())
        return 0

    @queue_size.put
    def queue_size(self, value: int) -> int:
        n = in_range(int, "QueueSize", 1, self.driver.max_queue)(value)
        self.driver.queue_size = n
        return n

    def post_stats(self, stats: dict) -> None:
        """The driver's counters on their PVs (called from the worker a few times a second)."""
        p = self.plugin
        for key, value in stats.items():
            if key == "Status_RBV":
                text, severity, kind = value
                self.table.set(f"{p}:Status_RBV", text, Alarm.of(severity, text, kind))
            elif f"{p}:{key}" in self.table.specs:
                self.table.set(f"{p}:{key}", value)


class PhasePublisher:
    """Posts every phase image on NN:Phase from a thread of its own, so publishing never holds
    inference back; ``min_period_s`` > 0 posts at most one image per period (displays).
    A batch that finds the publisher's queue full is not posted and is counted."""

    def __init__(self, table, suffix: str = "NN:Phase", depth: int = 64) -> None:
        self.table, self.suffix = table, suffix
        self.min_period_s = 0.0
        self.posted = 0
        self.skipped = 0
        self._last = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="nn-phase-publisher", daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def __call__(self, batch: FrameBatch) -> None:
        if batch.phase is None:
            return
        try:
            self._q.put_nowait(batch)
        except queue.Full:
            self.skipped += len(batch)

    def _run(self) -> None:
        from ptychostream.plugins.driver import lower_priority, name_os_thread

        name_os_thread()
        lower_priority(LATER_STAGE_NICE)
        while not self._stop.is_set():
            try:
                batch = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._post(batch)
            finally:
                self._q.task_done()

    def _post(self, batch: FrameBatch) -> None:
        for i in range(len(batch)):
            now = time.monotonic()
            if self.min_period_s > 0 and now - self._last < self.min_period_s:
                continue
            self._last = now
            try:
                self.table.post_frame(self.suffix, Frame(
                    batch.phase[i], int(batch.unique_ids[i]), float(batch.timestamps[i]),
                    batch.attributes(i)))
                self.posted += 1
            except Exception:
                log.exception("posting %s failed", self.suffix)

    def wait_empty(self, timeout: float = 10.0) -> bool:
        """True once every batch handed in has been posted (not merely taken off the queue)."""
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._q.unfinished_tasks

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


class InferencePVs(PluginPVs):
    """``NN:`` — the inference plugin: model deployment (validated off the data path, swapped
    between batches), batching, intensity scale, and NN:Phase."""

    plugin = "NN"
    phase = pv("NN:Phase")
    model = pv("NN:Model")
    model_version = pv("NN:ModelVersion_RBV")
    model_name = pv("NN:ModelName_RBV")
    model_status = pv("NN:ModelStatus_RBV")
    engine = pv("NN:Engine_RBV")
    batch_size = pv("NN:BatchSize")
    intensity_scale = pv("NN:IntensityScale")
    min_callback_time = pv("NN:MinCallbackTime")
    model_select = pv("NN:ModelSelect")
    model_history = pv("NN:ModelHistory_RBV")

    def __init__(self, table, driver, plugin, store=None, store_required: bool = False) -> None:
        self.inference = plugin
        self.store = store
        self.store_required = bool(store_required and store is not None)
        self.input_connected = False  # set by the host's input monitor
        self.publisher = PhasePublisher(table)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        super().__init__(table, driver)

    @batch_size.put
    def batch_size(self, value: int) -> int:
        n = in_range(int, "BatchSize", 1, MAX_BATCH)(value)
        self.driver.batch_size = n
        return n

    @intensity_scale.put
    def intensity_scale(self, value: float) -> float:
        v = in_range(float, "IntensityScale", 1e-6, 1e6)(value)
        self.inference.intensity_scale = v
        return v

    @min_callback_time.put
    def min_callback_time(self, value: float) -> float:
        v = in_range(float, "MinCallbackTime", 0.0, 3600.0)(value)
        self.publisher.min_period_s = v
        return v

    @model.put_async
    def model(self, value, done) -> None:
        data, name = value
        self._loader.submit(self.deploy, data, name, done)

    @model_select.put_async
    def model_select(self, value, done) -> None:
        self._loader.submit(self.select, int(value), done)

    def post_stats(self, stats: dict) -> None:
        super().post_stats(stats)
        self.table.set("NN:InputConnected_RBV", int(self.input_connected))
        if self.publisher.skipped:  # the map got every frame; NN:Phase subscribers did not
            self.driver.set_condition(
                "publisher", MINOR, f"NN:Phase fell behind: {self.publisher.skipped} phase "
                "images not posted (NN:MinCallbackTime > 0 posts fewer, for displays)")

    # ------------------------------------------------------------------ models
    def _next_version(self) -> int:
        """Above everything served or ever stored: versions never repeat."""
        return max(self.inference.model_version, self.store.highest() if self.store else 0) + 1

    def deploy(self, data: bytes, name: str = "", done=None, version: int | None = None,
               save: bool = True, note: str = "", degraded: bool = False) -> bool:
        """Validate, store and swap in a model (loader thread). ``done(error)`` completes a PV
        put. A model the store cannot keep serves with a MAJOR alarm, or is refused when the
        store is required (``model_store_required``). ``note`` is added to the status, with a
        MINOR alarm when ``degraded`` (a start-up that had to skip stored models)."""
        from ptychostream.plugins.inference import model_name_for

        name = model_name_for(data, name)
        self.model_status.set(f"Validating {name}", OK)
        try:
            new = self.inference.prepare_model(data, name, version or self._next_version())
        except ModelError as exc:
            return self._refuse(f"Refused {name}: {exc}", done)
        engine_note = new.engine.note()  # e.g. a half-precision engine's distance from fp32
        status = f"Serving {name} (v{new.version})" + (f"; {engine_note}" if engine_note else "")
        status, alarm = status + note, OK
        if degraded:
            alarm = Alarm.of(MINOR, status)
        if self.store is not None and save:
            try:
                self.store.save(data, name, new.version)
            except OSError as exc:
                why = exc.strerror or str(exc)
                if self.store_required:
                    return self._refuse(f"Refused {name}: the model store cannot keep it "
                                        f"({why}) and is required", done)
                status = f"{status}; NOT SAVED, a restart will not serve it: {why}"
                alarm = Alarm.of(MAJOR, status)
                log.error(status)
        self.inference.swap(new)
        self.model_version.set(new.version)
        self.model_name.set(name)
        workers = self.driver.workers
        self.engine.set(new.engine.describe() + (f", {workers} workers" if workers > 1 else ""))
        self.model_status.set(status, alarm)
        self.driver.clear_condition("model")
        self.post_history()
        if done:
            done(None)
        return True

    def _refuse(self, msg: str, done=None) -> bool:
        """A refused deploy or rollback: said on ModelStatus_RBV (MAJOR) and to the writer;
        the serving model is untouched."""
        log.warning(msg)
        self._restore_status(Alarm.of(MAJOR, msg))
        if done:
            done(msg)
        return False

    def select(self, version: int, done=None) -> bool:
        """Serve stored ``version`` again (NN:ModelSelect: a rollback), after verifying and
        validating it as any deploy; it keeps its version number."""
        if self.store is None:
            return self._refuse(f"Refused rollback to v{version}: this IOC has no model "
                                "store (start it with --model-store)", done)
        entry = self.store.get(version)
        if entry is None:
            return self._refuse(f"Refused rollback to v{version}: not stored (stored: "
                                f"{self.store.history()})", done)
        try:
            data = self.store.read(entry)
        except OSError as exc:
            return self._refuse(f"Refused rollback: {exc}", done)
        if not self.deploy(data, entry.name, done, version=entry.version, save=False,
                           note=" (rolled back)"):
            return False
        try:
            self.store.select(entry.version)
        except OSError as exc:
            log.error("rollback to v%d serves, but the store could not record it: %s",
                      entry.version, exc)
        self.model_select.set(entry.version)
        self.post_history()
        log.info("rolled back to %s (v%d)", entry.name, entry.version)
        return True

    def post_history(self) -> None:
        if self.store is not None:
            self.model_history.set(self.store.history(self.inference.model_version))

    def _restore_status(self, alarm: Alarm) -> None:
        self.model_status.set(alarm.message, alarm)

    def load_startup_model(self, model_file: Path | None) -> None:
        """The newest good stored model (the current one first), else ``model_file``, else
        none; whatever was skipped on the way is said on ModelStatus_RBV (MINOR) and logged."""
        candidates = self.store.candidates() if self.store else []
        skipped: list[str] = list(self.store.problems) if self.store else []
        for entry in candidates:
            try:
                data = self.store.read(entry)
            except OSError as exc:
                skipped.append(str(exc))
                log.warning("model store: %s", exc)
                continue
            log.info("serving stored model %s (v%d) from %s", entry.name, entry.version,
                     entry.file)
            note = f"; skipped: {'; '.join(skipped)}" if skipped else ""
            if self.deploy(data, entry.name, version=entry.version, save=False,
                           note=note and f" from the store{note}", degraded=bool(skipped)):
                if skipped:
                    self.store.select(entry.version)  # current.json names what serves
                return
            skipped.append(f"v{entry.version} refused: "
                           f"{self.model_status.get().split(': ', 1)[-1]}")
        if model_file is not None:
            try:
                data = Path(model_file).read_bytes()
            except OSError as exc:
                msg = f"Cannot read model file {model_file}: {exc}"
                log.error(msg)
                self.model_status.set(msg, Alarm.of(MAJOR, msg))
                self.driver.set_condition("model", MINOR, "No model loaded")
                return
            if self.deploy(data, Path(model_file).stem):
                return
        if skipped and self.inference.serving is None:
            msg = f"No model loaded: the store has none that serves ({'; '.join(skipped)})"
            log.error(msg)
            self.model_status.set(msg[:250], Alarm.of(MAJOR, msg[:250]))
        if self.inference.serving is None:
            self.no_model()
        self.post_history()

    def no_model(self) -> None:
        msg = "No model loaded"
        if self.model_status.get().startswith(("Refused", "Cannot read", "No model loaded: ")):
            self.driver.set_condition("model", MINOR, msg)
            return
        self.model_status.set(msg, Alarm.of(MINOR, msg, "undefined"))
        self.driver.set_condition("model", MINOR, f"{msg}: frames go to the map unprocessed")

    def submit(self, fn, *args):
        return self._loader.submit(fn, *args)

    def stop(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self.publisher.stop()


class StitchPVs(PluginPVs):
    """``Stitch:`` — the live map: planned positions, reset, pixel size, weighting and offset
    registration, refinement and its probe; Stitch:Image (and Amplitude, Probe_RBV) posted by
    the map stage itself at most every UpdatePeriod."""

    plugin = "Stitch"
    image = pv("Stitch:Image")
    amplitude = pv("Stitch:Amplitude")
    positions = pv("Stitch:Positions")
    reset = pv("Stitch:Reset")
    pixel_size = pv("Stitch:PixelSize")
    num_frames = pv("Stitch:NumFrames_RBV")
    update_period = pv("Stitch:UpdatePeriod")
    refine = pv("Stitch:Refine")
    refine_alpha = pv("Stitch:RefineAlpha")
    probe_step = pv("Stitch:ProbeStep")
    seed_mode = pv("Stitch:SeedMode")
    probe = pv("Stitch:Probe")
    probe_rbv = pv("Stitch:Probe_RBV")
    probe_status = pv("Stitch:ProbeStatus_RBV")
    passes = pv("Stitch:Passes_RBV")
    max_passes = pv("Stitch:MaxPasses")
    weighting = pv("Stitch:Weighting")
    crop = pv("Stitch:Crop")
    beam_size = pv("Stitch:BeamSize")
    register_offsets = pv("Stitch:RegisterOffsets")
    save_file = pv("Stitch:SaveFile")

    SEED_MODES = ("new", "blend", "none")
    WEIGHTINGS = ("probe", "crop", "uniform")

    def __init__(self, table, driver, plugin, map_dir: Path | None = None) -> None:
        self.stitching = plugin
        self.map_dir = Path(map_dir) if map_dir else None
        self._posted = (-1, 0.0)
        self._probe_posted = None
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="probe-loader")
        super().__init__(table, driver)
        driver.on_tick = self.tick
        self.post_settings()

    def post_settings(self) -> None:
        """The plugin's settings on their PVs (start-up)."""
        s = self.stitching
        self.refine.set(int(s.refine))
        self.refine_alpha.set(float(s.alpha))
        self.probe_step.set(float(s.probe_step))
        self.max_passes.set(float(s.max_passes))
        self.seed_mode.set(self.SEED_MODES.index(s.seed))
        self.weighting.set(self.WEIGHTINGS.index(s.weighting))
        self.crop.set(int(s.crop or 0))
        self.beam_size.set(float(s.beam_fwhm_m) * 1e9)
        self.register_offsets.set(int(s.register_offsets))
        self.pixel_size.set(float(s.pixel_m) * 1e9)
        self.probe_status.set(s.probe_status(), OK if s._probe is not None else
                              Alarm.of(MINOR, s.probe_status(), "undefined"))

    # ------------------------------------------------------------------ writes
    @reset.put
    def reset(self, value: int) -> int:
        """Write 1 to start a new map; the PV reads back 0 (done), as areaDetector's resets do."""
        if int(value):
            self.stitching.reset()
            self.num_frames.set(0)
        return 0

    @positions.put
    def positions(self, cols: dict) -> dict:
        x, y, uid = cols["x"], cols["y"], cols["uniqueId"]
        if len(x) != len(y):
            raise ValueError(f"Stitch:Positions: {len(x)} x but {len(y)} y values")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("Stitch:Positions: positions must be finite")
        self.stitching.set_positions(np.stack([x, y], axis=1), uid if len(uid) else None)
        self.num_frames.set(0)
        return cols

    @pixel_size.put
    def pixel_size(self, value: float) -> float:
        nm = in_range(float, "PixelSize (nm)", 0.0, 1e5)(value)
        if 0 < nm < 0.01:
            raise ValueError(f"PixelSize is in nm: {nm:g} nm looks like a value in metres")
        self.stitching.pixel_m = nm * 1e-9
        return nm

    @update_period.put
    def update_period(self, value: float) -> float:
        return in_range(float, "UpdatePeriod", 0.0, 3600.0)(value)

    @refine.put
    def refine(self, value: int) -> int:
        self.stitching.configure(refine=bool(int(value)))
        self.probe_status.set(self.stitching.probe_status())
        return int(value)

    @refine_alpha.put
    def refine_alpha(self, value: float) -> float:
        v = in_range(float, "RefineAlpha", 1e-4, 1.0)(value)
        self.stitching.configure(alpha=v)
        return v

    @probe_step.put
    def probe_step(self, value: float) -> float:
        v = in_range(float, "ProbeStep", 0.0, 2.0)(value)
        self.stitching.configure(probe_step=v)
        return v

    @max_passes.put
    def max_passes(self, value: float) -> float:
        v = in_range(float, "MaxPasses", 1.0, 1000.0)(value)
        self.stitching.max_passes = v
        return v

    @seed_mode.put
    def seed_mode(self, value: int) -> int:
        i = in_range(int, "SeedMode", 0, len(self.SEED_MODES) - 1)(value)
        self.stitching.configure(seed=self.SEED_MODES[i])
        return i

    @weighting.put
    def weighting(self, value: int) -> int:
        i = in_range(int, "Weighting", 0, len(self.WEIGHTINGS) - 1)(value)
        self.stitching.configure(weighting=self.WEIGHTINGS[i])
        return i

    @crop.put
    def crop(self, value: int) -> int:
        n = in_range(int, "Crop", 0, 4096)(value)
        self.stitching.configure(crop=n or None)
        return n

    @beam_size.put
    def beam_size(self, value: float) -> float:
        nm = in_range(float, "BeamSize (nm)", 1.0, 1e6)(value)
        self.stitching.configure(beam_fwhm_m=nm * 1e-9)
        return nm

    @register_offsets.put
    def register_offsets(self, value: int) -> int:
        self.stitching.configure(register_offsets=bool(int(value)))
        return int(value)

    @save_file.put
    def save_file(self, value: str) -> str:
        name = str(value).strip()
        if not name:
            return ""
        if self.map_dir is None:
            raise ValueError("this IOC has no map folder (start it with --map-dir)")
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"SaveFile takes a file name inside the map folder, not {name!r}")
        path = self.map_dir / (name if name.endswith((".h5", ".hdf5")) else f"{name}.h5")
        self.map_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.stitching.save(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot save the map to {path}: {exc}") from exc
        log.info("map saved to %s", path)
        return name

    @probe.put_async
    def probe(self, value, done) -> None:
        data, name = value
        self._loader.submit(self.load_probe, data, name, done)

    def load_probe(self, data, name: str = "", done=None) -> bool:
        """Validate and use a probe (file bytes, a path or an array); a refused one leaves the
        old probe in use, with the reason on ProbeStatus_RBV and a MAJOR alarm."""
        from ptychostream.refine import ProbeError, load_probe

        label = name or (str(data) if isinstance(data, str | Path) else "probe")
        try:
            probe, source = load_probe(data)
            self.stitching.set_probe(probe, f"{name} ({source})" if name else source)
        except (ProbeError, ValueError) as exc:
            msg = f"Refused {label}: {exc}"
            log.warning(msg)
            self.probe_status.set(msg, Alarm.of(MAJOR, msg))
            if done:
                done(msg)
            return False
        self.probe_status.set(self.stitching.probe_status(), OK)
        log.info("probe %s in use (%d modes)", name or source, probe.shape[0])
        if done:
            done(None)
        return True

    # ------------------------------------------------------------------ publishing
    def tick(self) -> None:
        """Post the maps when they changed and UpdatePeriod has passed (the map stage's worker
        calls this after every batch and idle step, so the stitcher owns its period)."""
        s = self.stitching
        version, last = self._posted
        now = time.monotonic()
        if s.version == version or now - last < float(self.update_period.get()):
            return
        self.publish(now)

    def publish(self, now: float | None = None) -> None:
        s = self.stitching
        version = s.version
        frame = s.image()
        self.image.post(frame or Frame(np.zeros((0, 0), np.float32), attributes={"NumFrames": 0}))
        amp = s.amplitude()
        if amp is not None:
            self.amplitude.post(amp)
        self.num_frames.set(int(s.n_frames))
        self.passes.set(round(float(s.passes), 3))
        status = s.probe_status()
        if not self.probe_status.get().startswith("Refused"):
            self.probe_status.set(status)
        probe = s.probe_image()
        if probe is not None and (s.version != self._probe_posted):
            self.probe_rbv.post(probe)
            self._probe_posted = s.version
        self._posted = (version, time.monotonic() if now is None else now)

    def stop(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)


class QAPVs(PVGroup):
    """``QA:`` — what the continual-learning loop reports (written by the loop's identity)."""

    ssim = pv("QA:SSIM")
    decision = pv("QA:Decision")

    @ssim.put
    def ssim(self, value: float) -> float:
        return in_range(float, "QA:SSIM", -1.0, 1.0)(value)
