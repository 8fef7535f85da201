"""pvapy hosting of the inference plugin, for scale-out under pvapy's streaming framework.

The same InferencePlugin and PluginDriver the IOC uses (batching, flush of partial batches,
counters) behind pvapy's ``AdImageProcessor`` interface. Several consumers share one detector
stream through the pvDatabase distributor; the IOC's stitcher takes all their outputs
(``ptychostream-ioc --stitch-input pvapy:phase:1 --stitch-input pvapy:phase:2``)::

    pvapy-hpc-consumer --input-channel 13SIM1:Pva1:Image --n-consumers 2 \\
        --distributor-updates 1 --output-channel pvapy:phase:* \\
        --processor-file $(python -c 'import ptychostream.plugins.pvapy_adapter as m; print(m.__file__)') \\
        --processor-class InferenceProcessor \\
        --processor-args '{"modelFile": "model.onnx", "batchSize": 8, "engine": "onnxruntime"}'

processor args: modelFile (required to produce output), engine, batchSize, intensityScale,
flushSeconds, queueSize.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pvaccess as pva
from pvapy.hpc.adImageProcessor import AdImageProcessor

from ptychostream.batch import FrameBatch, batch_from_frames
from ptychostream.ntndarray import Frame
from ptychostream.plugins.driver import PluginDriver
from ptychostream.plugins.inference import InferencePlugin

log = logging.getLogger(__name__)

_PVA_SCALAR = {float: pva.PvDouble, int: pva.PvLong, str: pva.PvString, bool: pva.PvBoolean}


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
        self.plugin = InferencePlugin(configDict.get("engine", "onnxruntime"),
                                      float(configDict.get("intensityScale", 1.0)))
        model_file = configDict.get("modelFile")
        if model_file:
            with open(model_file, "rb") as fh:
                self.plugin.load_model(fh.read(), configDict.get("modelName", ""))
        self.driver = PluginDriver(
            self.plugin, sinks=[self._publish], decode=batch_from_frames,
            queue_size=int(configDict.get("queueSize", 256)),
            batch_size=int(configDict.get("batchSize", 8)),
            flush_s=float(configDict.get("flushSeconds", 0.02)))
        self.n_published = 0

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
        self.driver.push(frame, unique_id=frame.unique_id)
        return pvObject

    def _publish(self, batch: FrameBatch) -> None:
        if batch.phase is None:  # no model: nothing to publish (counted as dropped)
            return
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
                "nBad": s["BadArrays_RBV"], "nMissed": self.driver.missed,
                "executionTimeMs": float(s["ExecutionTime_RBV"]),
                "modelVersion": self.plugin.model_version}

    def getStatsPvaTypes(self) -> dict:  # noqa: N802
        return {"nProcessed": pva.UINT, "nDropped": pva.UINT, "nBad": pva.UINT,
                "nMissed": pva.UINT, "executionTimeMs": pva.DOUBLE, "modelVersion": pva.UINT}
