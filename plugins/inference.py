"""Inference plugin: diffraction frames in, PtychoNN 2.0 phase images out, one per frame.

Each output keeps its source frame's uniqueId, timestamp and attributes (PosX/PosY, ...) and adds
ModelVersion and ModelName. A new model is built and validated beside the serving one
(``load_model``) and swapped in by one reference assignment, so a batch runs wholly on the old
or wholly on the new model and no frame waits for the validation.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import numpy as np

from ptychostream.engines import InferenceEngine, load_engine
from ptychostream.model import FRAME_SIZE, ModelError, is_onnx
from ptychostream.ntndarray import Frame
from ptychostream.plugins.driver import FrameError, NotReady

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModel:
    """What serves now; replaced as a whole on a swap."""

    engine: InferenceEngine
    version: int
    name: str


def model_name_for(data: bytes, name: str = "") -> str:
    """The given name, or one derived from the content (sha256 prefix)."""
    return name or f"model-{hashlib.sha256(data).hexdigest()[:10]}"


def sniff_model(data: bytes) -> None:
    """Refuse early, with a clear reason, bytes that are neither ONNX nor a PyTorch file.

    PyTorch files are zip archives (``PK``) or legacy pickles (``0x80``); ONNX is protobuf,
    checked by parsing it."""
    if not data:
        raise ModelError("empty model")
    if data[:2] == b"PK" or data[:1] == b"\x80" or is_onnx(data):
        return
    raise ModelError(f"neither ONNX nor a PyTorch state dict ({len(data)} bytes starting "
                     f"{data[:8]!r})")


class InferencePlugin:
    """PtychoNN 2.0 inference on batches of frames (host-agnostic: see PluginDriver, pvapy_adapter).

    ``engine``: onnxruntime, torch or tensorrt. ``intensity_scale`` multiplies the counts
    (low-dose frames). No model at start is fine: ``process`` raises NotReady until one loads.
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
    def check(self, frame: Frame) -> Frame:
        data = np.asarray(frame.data)
        if data.ndim == 3 and data.shape[0] == 1:
            data = data[0]
        if data.shape != (FRAME_SIZE, FRAME_SIZE):
            raise FrameError(f"frame shape {data.shape} is not ({FRAME_SIZE}, {FRAME_SIZE})")
        if data.dtype.kind not in "uif":
            raise FrameError(f"frame dtype {data.dtype} is not numeric")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise FrameError("frame has non-finite values")
        if data is not frame.data:
            frame = Frame(data, frame.unique_id, frame.timestamp, frame.attributes)
        return frame

    def process(self, frames: list[Frame]) -> list[Frame]:
        serving = self._serving  # read once: the whole batch runs on one model
        if serving is None:
            raise NotReady("No model loaded")
        phases = serving.engine.infer(np.stack([f.data for f in frames]), self.intensity_scale)
        if not np.isfinite(phases).all():
            raise ModelError(f"model {serving.name} gave non-finite phase")
        return [
            Frame(phase, f.unique_id, f.timestamp,
                  {**f.attributes, "ModelVersion": serving.version, "ModelName": serving.name})
            for f, phase in zip(frames, phases, strict=True)
        ]
