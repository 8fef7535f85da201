"""NTNDArray in and out (p4p), as the areaDetector PVA plugin writes it.

One place for the conversion, used by the simulated detector, the IOC, the
ophyd devices and the tests: uniqueId, timeStamp/dataTimeStamp and named
attributes (PosX, PosY in metres, ModelVersion, ...) are always filled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    """An image with the NTNDArray metadata that travels with it."""

    data: np.ndarray
    unique_id: int = 0
    timestamp: float = 0.0
    attributes: dict = field(default_factory=dict)

    @property
    def position(self) -> tuple[float, float] | None:
        """Beam position (x, y) in metres from PosX/PosY attributes, or None."""
        a = self.attributes
        if "PosX" in a and "PosY" in a:
            return float(a["PosX"]), float(a["PosY"])
        return None


_NT = None


def _nt():
    global _NT
    if _NT is None:
        from p4p.nt import NTNDArray

        _NT = NTNDArray()
    return _NT


def ntndarray_type():
    return _nt().type


def to_value(frame: Frame):
    """Frame -> p4p Value of type epics:nt/NTNDArray:1.0."""
    ts = frame.timestamp or time.time()
    sec = int(ts)
    nsec = int((ts - sec) * 1e9)
    attrib = {k: _plain(v) for k, v in frame.attributes.items()}
    value = _nt().wrap(np.ascontiguousarray(frame.data), attrib=attrib, timestamp=ts)
    value["uniqueId"] = int(frame.unique_id) & 0x7FFFFFFF
    value["dataTimeStamp.secondsPastEpoch"] = sec
    value["dataTimeStamp.nanoseconds"] = nsec
    return value


def _plain(v):
    """NTAttribute values must be plain scalars or strings."""
    if isinstance(v, np.generic):
        return v.item()
    return v


def from_value(value) -> Frame:
    """p4p Value (or the unwrapped ntndarray a p4p monitor delivers) -> Frame."""
    from p4p.nt import NTNDArray

    arr = value if isinstance(value, np.ndarray) else NTNDArray.unwrap(value)
    raw = getattr(arr, "raw", value)
    attrs = dict(getattr(arr, "attrib", {}) or {})
    ts = raw["dataTimeStamp.secondsPastEpoch"] + raw["dataTimeStamp.nanoseconds"] * 1e-9
    if not ts:
        ts = getattr(arr, "timestamp", 0.0) or 0.0
    return Frame(np.asarray(arr), int(raw["uniqueId"]), float(ts), attrs)
