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
    """Frame -> p4p Value of type epics:nt/NTNDArray:1.0, the Value p4p's ``NTNDArray.wrap``
    builds, in one ``Value(type, dict)`` call: about half the CPU of wrap's general path
    (41 against 78 µs a 128x128 frame on 2 cores; bench_pva_post.py), and NN:Phase and the
    detector encode every frame."""
    data = np.ascontiguousarray(frame.data)
    if data.ndim != 2:  # colour images: wrap deduces their ColorMode from the shape
        return _wrapped(frame, data)
    from p4p import Value

    nt = _nt()
    stamp = _stamp(frame)
    attrib = [{"name": k, "value": _plain(v)} for k, v in frame.attributes.items()]
    if "ColorMode" not in frame.attributes:
        attrib.append({"name": "ColorMode", "value": 0})  # gray, as wrap adds it
    rows, cols = data.shape
    return Value(nt.type, {
        "value": (nt._code2u[data.dtype.char], data.ravel()),
        "compressedSize": data.nbytes, "uncompressedSize": data.nbytes,
        "uniqueId": int(frame.unique_id) & 0x7FFFFFFF,
        "attribute": attrib,
        "dimension": [_dimension(cols), _dimension(rows)],  # inner-most first
        "timeStamp": stamp, "dataTimeStamp": stamp,
    })


def _dimension(n: int) -> dict:
    return {"size": n, "offset": 0, "fullSize": n, "binning": 1, "reverse": False}


def _stamp(frame: Frame) -> dict:
    """The frame's time (now if it has none) as an NT timeStamp."""
    ts = frame.timestamp or time.time()
    sec = int(ts)
    return {"secondsPastEpoch": sec, "nanoseconds": int((ts - sec) * 1e9)}


def _wrapped(frame: Frame, data: np.ndarray):
    """The same Value through p4p's NTNDArray.wrap (any number of dimensions)."""
    stamp = _stamp(frame)
    attrib = {k: _plain(v) for k, v in frame.attributes.items()}
    value = _nt().wrap(data, attrib=attrib,
                       timestamp=(stamp["secondsPastEpoch"], stamp["nanoseconds"]))
    value["uniqueId"] = int(frame.unique_id) & 0x7FFFFFFF
    value["dataTimeStamp"] = stamp
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


# --------------------------------------------------------------------------- fast batch decode
class DecodeError(ValueError):
    """An update that is not a usable NTNDArray frame (missing fields, bad dims, codec)."""


#: codec name (areaDetector NDPluginCodec) -> function(bytes, dtype, n_elements) -> 1-D array
CODECS: dict = {}


def _raw_array(value) -> np.ndarray:
    """The flat pixel array of an NTNDArray Value, decompressed when a codec says so."""
    if not CODECS:
        import ptychostream.codecs  # noqa: F401  (registers areaDetector's codecs)
    try:
        codec = value["codec.name"] or ""
    except (KeyError, TypeError, AttributeError):
        codec = ""
    arr = value["value"]
    if arr is None:
        raise DecodeError("no value")
    arr = np.asarray(arr)
    if codec:
        fn = CODECS.get(codec)
        if fn is None:
            known = ", ".join(sorted(CODECS)) or "none"
            raise DecodeError(f"codec {codec!r} is not supported (known: {known})")
        try:
            arr = fn(value, arr)
        except DecodeError:
            raise
        except Exception as exc:  # whatever the library raises on corrupt data
            raise DecodeError(f"codec {codec!r}: {exc.__class__.__name__}: {exc}") from exc
    return arr


def decode(value) -> tuple[np.ndarray, int, float, dict]:
    """(image (rows, cols), uniqueId, timestamp, attributes) of a p4p NTNDArray Value, cheaply
    (about 10 us); raises DecodeError saying what is wrong with a malformed update."""
    try:
        uid = int(value["uniqueId"])
        dims = [int(d["size"]) for d in value["dimension"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"not an NTNDArray ({exc.__class__.__name__}: {exc})") from exc
    arr = _raw_array(value)
    if arr.dtype.kind not in "uif":
        raise DecodeError(f"pixel type {arr.dtype} is not numeric")
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 2 or arr.size != dims[0] * dims[1]:
        raise DecodeError(f"dimensions {dims} do not describe a 2-D image of {arr.size} pixels")
    image = arr.reshape(dims[1], dims[0])  # dimension[0] is x, the fastest axis
    try:
        ts = value["dataTimeStamp.secondsPastEpoch"] + value["dataTimeStamp.nanoseconds"] * 1e-9
        attrs = {a["name"]: a["value"] for a in value["attribute"]}
    except (KeyError, TypeError, AttributeError):
        ts, attrs = 0.0, {}
    return image, uid, float(ts), attrs


def is_placeholder(value) -> bool:
    """The empty array a detector PV holds before its first frame (uniqueId 0, no pixels)."""
    try:
        return int(value["uniqueId"]) == 0 and not any(d["size"] for d in value["dimension"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def batch_from_values(values: list, out: np.ndarray | None = None):
    """Decode p4p NTNDArray Values into one FrameBatch; malformed ones are dropped with their
    reason (see FrameBatch.problems). ``out``: a preallocated (>= len, H, W) float32 buffer the
    pixels are copied into (pinned memory for a GPU engine); the batch's ``data`` is a view."""
    from ptychostream.batch import FrameBatch

    images, uids, ts, pos, pix, extra, problems = [], [], [], [], [], [], []
    for v in values:
        try:
            image, uid, t, attrs = decode(v)
        except DecodeError as exc:
            problems.append((f"bad array: {exc}", 1, True))
            continue
        if images and image.shape != images[0].shape:
            problems.append((f"bad array: shape {image.shape} differs from the batch's "
                             f"{images[0].shape} (uniqueId {uid})", 1, True))
            continue
        images.append(image)
        uids.append(uid)
        ts.append(t)
        pos.append((_number(attrs.pop("PosX", np.nan)), _number(attrs.pop("PosY", np.nan))))
        pix.append(_number(attrs.pop("PixelSize", 0.0)))
        extra.append(attrs)
    n = len(images)
    if not n:
        b = FrameBatch.empty()
        b.problems = problems
        return b
    shape = images[0].shape
    if out is not None and out.shape[0] >= n and out.shape[1:] == shape:
        data = out[:n]
    else:
        data = np.empty((n, *shape), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, image in enumerate(images):
            np.copyto(data[i], image, casting="unsafe")
    pix_arr = np.nan_to_num(np.asarray(pix, np.float64), nan=0.0)
    return FrameBatch(data, np.asarray(uids, np.int64), np.asarray(ts, np.float64),
                      np.asarray(pos, np.float64).reshape(n, 2), pix_arr, extra,
                      problems=problems)
