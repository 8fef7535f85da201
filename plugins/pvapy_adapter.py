"""pvapy hosting of the inference plugin, for scale-out under pvapy's streaming framework.

The same InferencePlugin and PluginDriver the IOC uses (batching, flush of partial batches,
counters) behind pvapy's ``AdImageProcessor`` interface. Several consumers share one detector
stream through pvDatabase's data distributor, which the detector's server provides (an
areaDetector PVA plugin, ``pvapy-ad-sim-server``, ``ptychostream-sim-detector``); the IOC's
stitcher gathers all their outputs in uniqueId order
(``ptychostream-ioc --stitch-input pvapy:phase:1 --stitch-input pvapy:phase:2``)::

    pvapy-hpc-consumer --input-channel 13SIM1:Pva1:Image --n-consumers 2 \\
        --distributor-updates 1 --output-channel pvapy:phase:* \\
        --processor-class ptychostream.plugins.pvapy_adapter.InferenceProcessor \\
        --processor-args '{"modelFile": "model.onnx", "batchSize": 8, "engine": "onnxruntime"}'

Each output keeps its frame's uniqueId, timestamps and attributes (PosX/PosY, PixelSize, ...),
so the IOC places it without a positions table. processor args: modelFile (required to produce
output), engine, batchSize, intensityScale, flushSeconds, queueSize, threads (engine threads
per consumer; 0: the engine's default), spinning (onnxruntime threads spin while idle; default
false, as the consumers share the cores).

With ``--n-consumers`` > 1 the consumers are child processes of ``pvapy-hpc-consumer``. SIGINT
to the parent stops them through pvapy's own stop command; if the parent ends any other way
(SIGTERM, SIGKILL, a crash), each child is told by the kernel (``PR_SET_PDEATHSIG``, else a
watchdog thread), finishes the frames it holds and exits, so no consumer outlives its parent.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time

import numpy as np
import pvaccess as pva
from pvapy.hpc.adImageProcessor import AdImageProcessor

from ptychostream.batch import FrameBatch, batch_from_frames
from ptychostream.ntndarray import Frame
from ptychostream.plugins.driver import PluginDriver
from ptychostream.plugins.inference import InferencePlugin

log = logging.getLogger(__name__)

# onnxruntime >= 1.29 sends usage telemetry from Linux too (DNS lookups of
# mobile.events.data.microsoft.com seen from every consumer, ~15 s after start); a beamline
# consumer must not phone home. Read once, before onnxruntime initialises; a user's setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_PVA_SCALAR = {float: pva.PvDouble, int: pva.PvLong, str: pva.PvString, bool: pva.PvBoolean}
#: a child whose parent has gone flushes its queue for at most this long, then exits
ORPHAN_FLUSH_S = 5.0


def frame_from_pvobject(pv_object) -> Frame:
    """pvapy NtNdArray -> Frame (uniqueId, dataTimeStamp, named attributes)."""
    unique_id, image = AdImageProcessor.reshapeNtNdArray(pv_object)[:2]
    ts = pv_object["dataTimeStamp"]
    attrs = {}
    for a in pv_object["attribute"]:
        value = a["value"]
        if isinstance(value, tuple):  # a variant union reads as ({'value': v}, {'value': type})
            value = value[0].get("value")
        attrs[a["name"]] = value
    return Frame(np.array(image, copy=True), int(unique_id),
                 ts["secondsPastEpoch"] + ts["nanoseconds"] * 1e-9, attrs)


def pvobject_from_frame(frame: Frame):
    """Frame -> pvapy NtNdArray, keeping uniqueId, timestamps and attributes."""
    out = AdImageProcessor.generateNtNdArray2D(frame.unique_id, np.ascontiguousarray(frame.data))
    stamp = pva.PvTimeStamp(frame.timestamp or time.time())
    out["dataTimeStamp"] = stamp
    out["timeStamp"] = stamp
    attrs = [pva.NtAttribute("ColorMode", pva.PvInt(0))]
    for name, value in frame.attributes.items():
        if name == "ColorMode":
            continue
        if isinstance(value, np.generic):
            value = value.item()
        make = _PVA_SCALAR.get(type(value))
        if make is not None:
            attrs.append(pva.NtAttribute(name, make(value)))
    out["attribute"] = attrs
    return out


class InferenceProcessor(AdImageProcessor):
    """PtychoNN 2.0 inference as a pvapy-hpc-consumer processor (one per consumer / GPU)."""

    def __init__(self, configDict: dict | None = None) -> None:  # noqa: N803 (pvapy's API)
        configDict = dict(configDict or {})
        super().__init__(configDict)
        engine = configDict.get("engine", "onnxruntime")
        engine_kwargs = {}
        if engine == "onnxruntime":
            engine_kwargs["spinning"] = bool(configDict.get("spinning", False))
            if int(configDict.get("threads", 0)):
                engine_kwargs["threads"] = int(configDict["threads"])
        self.plugin = InferencePlugin(engine, float(configDict.get("intensityScale", 1.0)),
                                      engine_kwargs)
        model_file = configDict.get("modelFile")
        if model_file:
            with open(model_file, "rb") as fh:
                self.plugin.load_model(fh.read(), configDict.get("modelName", ""))
        # uniqueId gaps are not counted here: with the distributor each consumer sees every
        # N-th frame by design, and pvapy counts the frames really missed (processorStats)
        self.driver = PluginDriver(
            self.plugin, sinks=[self._publish], decode=batch_from_frames,
            queue_size=int(configDict.get("queueSize", 256)),
            batch_size=int(configDict.get("batchSize", 8)),
            flush_s=float(configDict.get("flushSeconds", 0.02)))
        self.n_published = 0
        # outputs are posted from a thread of their own, while the engine runs the next batch
        # (it releases the GIL); a bounded queue: a slow server holds inference back, never
        # loses an image
        self._out: queue.Queue = queue.Queue(maxsize=int(configDict.get("publishQueue", 64)))
        self._publisher = threading.Thread(target=self._post_loop, name="consumer-publish",
                                           daemon=True)
        self._publisher.start()
        self._exiting = threading.Event()
        _stop_with_parent(self._parent_gone)

    def start(self) -> None:
        # pvapy creates the output record on the first input frame, so monitors that connect
        # then miss the first outputs; serve it from the start instead (see _publish).
        if self.pvaServer is not None and self.outputChannel:
            self.pvaServer.addRecord(self.outputChannel, pva.NtNdArray(), None)
        self.driver.start()

    def getOutputPvObjectType(self, pvObject):  # noqa: N802, N803
        """None: we serve the output record ourselves (created in ``start``)."""
        return None

    def stop(self) -> None:
        self.driver.wait_idle(10.0)  # finish what is queued before the consumer exits
        self.driver.stop()
        self._flush_outputs(10.0)

    def _flush_outputs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._out.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _parent_gone(self) -> None:
        """The consumer's parent has gone: finish the frames held, then end this process."""
        if self._exiting.is_set():
            return
        self._exiting.set()
        log.warning("consumer %s: pvapy-hpc-consumer (the parent) has gone; finishing %d "
                    "queued frames and exiting", getattr(self, "processorId", "?"),
                    self.driver.queue_size - self.driver.queue_free)
        try:
            self.driver.wait_idle(ORPHAN_FLUSH_S)
            self.driver.stop(1.0)
            self._flush_outputs(1.0)
        finally:
            logging.shutdown()
            os._exit(0)  # pvapy's threads wait for a stop command that cannot come now

    def configure(self, configDict: dict) -> None:  # noqa: N803
        """Runtime changes from the consumer's control channel: batchSize, intensityScale,
        modelFile (validated, swapped in between batches)."""
        if "batchSize" in configDict:
            self.driver.batch_size = max(1, int(configDict["batchSize"]))
        if "intensityScale" in configDict:
            self.plugin.intensity_scale = float(configDict["intensityScale"])
        if "modelFile" in configDict:
            with open(configDict["modelFile"], "rb") as fh:
                self.plugin.load_model(fh.read(), configDict.get("modelName", ""))

    def process(self, pvObject):  # noqa: N803
        """Queue the frame; the driver's worker batches, infers and publishes.

        pvapy reuses the PvObject for the next update, so the frame is copied out here."""
        try:
            frame = frame_from_pvobject(pvObject)
        except Exception as exc:  # malformed input: counted like the IOC counts it
            self.driver.reject(str(exc))
            return pvObject
        self.driver.push(frame)
        return pvObject

    def _publish(self, batch: FrameBatch) -> None:
        if batch.phase is None:  # no model: nothing to publish (counted as dropped)
            return
        self._out.put(batch)  # blocks only when the server is 64 batches behind

    def _post_loop(self) -> None:
        while True:
            batch = self._out.get()
            try:
                self._post(batch)
            except Exception:
                log.exception("publishing %d phase images failed", len(batch))
            finally:
                self._out.task_done()

    def _post(self, batch: FrameBatch) -> None:
        for i in range(len(batch)):
            f = Frame(batch.phase[i], int(batch.unique_ids[i]), float(batch.timestamps[i]),
                      batch.attributes(i))
            if self.pvaServer is not None and self.outputChannel:
                self.pvaServer.update(self.outputChannel, pvobject_from_frame(f))
            self.n_published += 1

    def resetStats(self) -> None:  # noqa: N802
        self.driver.reset_counters()

    def getStats(self) -> dict:  # noqa: N802
        s = self.driver.stats()
        return {"nProcessed": s["ArrayCounter_RBV"], "nDropped": s["DroppedArrays_RBV"],
                "nBad": s["BadArrays_RBV"], "nPublished": self.n_published,
                "executionTimeMs": float(s["ExecutionTime_RBV"]),
                "modelVersion": self.plugin.model_version}

    def getStatsPvaTypes(self) -> dict:  # noqa: N802
        return {"nProcessed": pva.UINT, "nDropped": pva.UINT, "nBad": pva.UINT,
                "nPublished": pva.UINT, "executionTimeMs": pva.DOUBLE,
                "modelVersion": pva.UINT}


# ---------------------------------------------------------------------- life with the parent
def _stop_with_parent(on_gone) -> None:
    """In a multiprocessing child (pvapy-hpc-consumer --n-consumers > 1), call ``on_gone`` once
    the parent process has gone, whatever ended it. Nothing is done in a process of its own
    (--n-consumers 1: it is the consumer itself, stopped by its own signals)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent_pid = parent.pid
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0:
                signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
                    target=on_gone, name="consumer-exit", daemon=True).start())
        except (OSError, AttributeError, ValueError) as exc:
            log.debug("PR_SET_PDEATHSIG unavailable (%s): the watchdog thread alone", exc)

    def watch() -> None:  # also covers a parent gone before prctl, and non-Linux hosts
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        on_gone()

    threading.Thread(target=watch, name="consumer-parent-watch", daemon=True).start()
