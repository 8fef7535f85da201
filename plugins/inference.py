"""Inference plugin: a batch of diffraction frames in, PtychoNN 2.0 phase images out.

Each output keeps its source frame's uniqueId, timestamp and attributes (PosX/PosY, ...) and adds
the model's version and name. A new model is built and validated beside the serving one
(``load_model``) and swapped in by one reference assignment, so a batch runs wholly on the old
or wholly on the new model and no frame waits for the validation. With no model serving,
frames pass on to the map unprocessed (the map shows the sample from the first frame when it
can refine; see the stitching plugin).

Every frame is checked on the values the engine will see (counts times the intensity scale, in
float32): a frame that is not finite there or beyond a 32-bit counter is dropped alone, and a
non-finite output drops only its own frame.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import numpy as np

from ptychostream.batch import FrameBatch
from ptychostream.modelfile import FRAME_SIZE, ModelError, sniff_model

log = logging.getLogger(__name__)

#: largest count a frame may hold: a 32-bit detector counter (Eiger2, Medipix3)
MAX_COUNTS = 2.0 ** 32
#: smallest value: small negatives come from background subtraction, large ones are garbage
MIN_COUNTS = -1e3


@dataclass(frozen=True)
class ServingModel:
    """What serves now; replaced as a whole on a swap."""

    engine: object  # ptychostream.engines.InferenceEngine
    version: int
    name: str


def model_name_for(data: bytes, name: str = "") -> str:
    """The given name, or one derived from the content (sha256 prefix)."""
    return name or f"model-{hashlib.sha256(data).hexdigest()[:10]}"


class InferencePlugin:
    """PtychoNN 2.0 inference on batches of frames (host-agnostic: see PluginDriver, pvapy_adapter).

    ``engine``: onnxruntime, torch or tensorrt. ``intensity_scale`` multiplies the counts
    (low-dose frames). No model at start is fine: frames pass on unprocessed until one loads.
    """

    name = "NN"

    def __init__(self, engine: str = "onnxruntime", intensity_scale: float = 1.0,
                 engine_kwargs: dict | None = None) -> None:
        self.engine_name = engine
        self.engine_kwargs = dict(engine_kwargs or {})
        self.intensity_scale = float(intensity_scale)
        self._serving: ServingModel | None = None
        self._load_lock = threading.Lock()  # one validation at a time

    # ------------------------------------------------------------------ model
    @property
    def serving(self) -> ServingModel | None:
        return self._serving

    @property
    def model_version(self) -> int:
        return self._serving.version if self._serving else 0

    @property
    def model_name(self) -> str:
        return self._serving.name if self._serving else ""

    def load_model(self, data: bytes, name: str = "", version: int | None = None) -> ServingModel:
        """Build and validate ``data`` (ONNX or state dict), then swap it in.

        Raises ModelError with the reason when it cannot serve; the old model keeps serving.
        ``version`` defaults to the serving version + 1."""
        from ptychostream.engines import load_engine

        data = bytes(data)
        name = model_name_for(data, name)
        sniff_model(data)
        with self._load_lock:
            try:
                engine = load_engine(self.engine_name, data, **self.engine_kwargs)
            except ModelError as exc:  # keep the first line: torch appends pages of advice
                raise ModelError(str(exc).splitlines()[0][:300]) from exc
            new = ServingModel(engine, self.model_version + 1 if version is None else version,
                               name)
            self._serving = new  # the swap: batches started before it finish on the old model
        log.info("model %s (v%d) serving on %s", name, new.version, engine.describe())
        return new

    # ------------------------------------------------------------------ frames
    def check(self, batch: FrameBatch) -> FrameBatch:
        """Drop frames the engine cannot take: wrong size, or values that are not counts once
        scaled to float32 (1e300 becomes inf, 2**62 is no detector's count)."""
        if batch.data.shape[1:] != (FRAME_SIZE, FRAME_SIZE):
            return batch.drop(np.ones(len(batch), bool),
                              f"frame shape {batch.data.shape[1:]} is not "
                              f"({FRAME_SIZE}, {FRAME_SIZE})")
        x = batch.data
        with np.errstate(over="ignore", invalid="ignore"):
            flat = x.reshape(len(x), -1)
            finite = np.isfinite(flat).all(axis=1)
            hi = np.where(finite, flat.max(axis=1, initial=0.0), 0.0)
            lo = np.where(finite, flat.min(axis=1, initial=0.0), 0.0)
            scaled = hi * np.float32(self.intensity_scale)
        batch = batch.drop(~finite, "frame has non-finite values (as float32)")
        keep = (hi <= MAX_COUNTS) & (lo >= MIN_COUNTS) & np.isfinite(scaled)
        return batch.drop(~keep[finite], f"frame values outside [{MIN_COUNTS:g}, 2**32]")

    def process(self, batch: FrameBatch) -> FrameBatch:
        batch = self.check(batch)
        serving = self._serving  # read once: the whole batch runs on one model
        if serving is None or not len(batch):
            if len(batch):
                batch.skipped.append(("no model loaded", len(batch)))
            return batch
        phases = serving.engine.infer(batch.data, self.intensity_scale)
        ok = np.isfinite(phases.reshape(len(phases), -1)).all(axis=1)
        batch.phase = phases
        batch.model_version, batch.model_name = serving.version, serving.name
        return batch.drop(~ok, f"model {serving.name} gave a non-finite phase",
                          malformed=False)
