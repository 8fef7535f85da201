"""Client helpers for the edge IOC over pvAccess (p4p): deploy a model, steer the stitcher.

Used by the Bluesky plans, the continual-learning loop, the tests and operators' scripts::

    from ptychostream.ioc.client import deploy_model
    version = deploy_model("PTYCHO:", Path("best.onnx").read_bytes(), name="scan-42")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ptychostream.modelfile import ModelError
from ptychostream.pvnames import pvname

log = logging.getLogger(__name__)

#: Stitch:Image attributes that place the map on the sample
ORIGIN_X, ORIGIN_Y, PIXEL_SIZE, NUM_FRAMES = "OriginX", "OriginY", "PixelSize", "NumFrames"


def _context():
    """A pvAccess client context on the host's EPICS environment (EPICS_PVA_*)."""
    from p4p.client.thread import Context

    return Context("pva", nt=False)


def model_put_value(data: bytes, name: str = "") -> dict:
    """What a put to ``$(P)NN:Model`` carries: the bytes as a ubyte array and the model's name."""
    return {"value": np.frombuffer(bytes(data), np.uint8), "name": name}


def _put_bytes(prefix: str, suffix: str, readback: str, data: bytes, name: str,
               timeout: float, error: type[Exception]):
    """Put file bytes to a validated write PV (NN:Model, Stitch:Probe), wait for the IOC's
    verdict (the put completes only after validation) and read back what now serves; a refusal
    raises ``error`` with the IOC's reason."""
    from p4p.client.thread import RemoteError

    with _context() as ctx:
        try:
            ctx.put(pvname(prefix, suffix), model_put_value(data, name), timeout=timeout,
                    wait=True)
        except RemoteError as exc:
            raise error(str(exc)) from exc
        return ctx.get(pvname(prefix, readback), timeout=timeout).value


def deploy_model(prefix: str, data: bytes, name: str = "", timeout: float = 30.0) -> int:
    """Put model bytes (ONNX or PyTorch state dict) to ``$(P)NN:Model`` and wait for the verdict.

    Returns the new ``ModelVersion_RBV``; raises :class:`~ptychostream.model.ModelError` with
    the IOC's reason when the model is refused (the old model keeps serving), TimeoutError when
    the IOC does not answer in ``timeout`` s."""
    if not data:
        raise ModelError("empty model")
    version = int(_put_bytes(prefix, "NN:Model", "NN:ModelVersion_RBV", data, name, timeout,
                             ModelError))
    log.info("deployed model %r as version %d on %s", name, version, prefix)
    return version


def deploy_probe(prefix: str, data: bytes, name: str = "", timeout: float = 30.0) -> str:
    """Put a probe (.npy bytes, or an HDF5 reconstruction/scan file's bytes) to
    ``$(P)Stitch:Probe`` and wait for the verdict. Returns ``Stitch:ProbeStatus_RBV``; raises
    :class:`~ptychostream.refine.ProbeError` with the IOC's reason when it is refused."""
    from ptychostream.refine import ProbeError

    return str(_put_bytes(prefix, "Stitch:Probe", "Stitch:ProbeStatus_RBV", data, name, timeout,
                          ProbeError))


def put_positions(prefix: str, positions_m: np.ndarray | Sequence[Sequence[float]],
                  unique_ids: Sequence[int] | None = None, timeout: float = 5.0) -> None:
    """Write planned beam positions (N, 2) x, y in metres to ``$(P)Stitch:Positions``.

    Writing them starts a new map sized for the whole scan. Frames without PosX/PosY take their
    position from this table: by ``unique_ids`` when given, else by arrival order."""
    pos = np.asarray(positions_m, np.float64).reshape(-1, 2)
    value = {"value": {"x": pos[:, 0], "y": pos[:, 1],
                       "uniqueId": np.asarray(unique_ids if unique_ids is not None else [],
                                              np.int32)}}
    with _context() as ctx:
        ctx.put(pvname(prefix, "Stitch:Positions"), value, timeout=timeout, wait=True)


def reset_stitch(prefix: str, timeout: float = 5.0) -> None:
    """Start a new stitched map (keeps the planned positions, if any)."""
    with _context() as ctx:
        ctx.put(pvname(prefix, "Stitch:Reset"), 1, timeout=timeout, wait=True)


def get_stitched(prefix: str, timeout: float = 5.0) -> np.ndarray:
    """The live stitched map (float32, NaN where nothing was stitched).

    The returned array is p4p's ``ntndarray`` (an ndarray subclass); its ``.attrib`` dict holds
    ``OriginX``/``OriginY`` (m, centre of pixel [0, 0]), ``PixelSize`` (m) and ``NumFrames``."""
    from p4p.client.thread import Context

    with Context("pva") as ctx:
        return ctx.get(pvname(prefix, "Stitch:Image"), timeout=timeout)


def stitched_geometry(image: np.ndarray) -> tuple[tuple[float, float], float]:
    """(origin (x0, y0) m, pixel size m) of a map returned by :func:`get_stitched`."""
    a = getattr(image, "attrib", {}) or {}
    return (float(a[ORIGIN_X]), float(a[ORIGIN_Y])), float(a[PIXEL_SIZE])


def get(prefix: str, suffix: str, timeout: float = 5.0):
    """Value of one PV of the table: p4p's augmented int/float/str/ndarray, which also carries
    ``.severity`` and ``.timestamp`` (``.raw`` is the full Value)."""
    from p4p.client.thread import Context

    with Context("pva") as ctx:
        return ctx.get(pvname(prefix, suffix), timeout=timeout)


def put(prefix: str, suffix: str, value, timeout: float = 5.0) -> None:
    """Write one PV of the table and wait for completion."""
    with _context() as ctx:
        ctx.put(pvname(prefix, suffix), value, timeout=timeout, wait=True)
