"""Decoders for compressed NTNDArrays, as areaDetector's NDPluginCodec writes them.

Importing this module registers them in :data:`ptychostream.ntndarray.CODECS`. What a
compressed NTNDArray carries (ADCore ``ntndArrayConverter``, NDPluginPva):

* ``value``: the compressed bytes, as a ubyte array;
* ``codec.name``: ``lz4`` (one LZ4 block, no frame header: ``LZ4_compress_default``),
  ``blosc`` (a c-blosc 1 buffer, its own header), ``bslz4`` (bitshuffle + LZ4 as
  ``bshuf_compress_lz4`` writes it: per block a 4-byte big-endian length, no 12-byte HDF5
  header);
* ``codec.parameters``: an int, the pixel type before compression: pvData's ScalarType
  (NDPluginPva; 1 int8 ... 10 float64) or, from NDPluginPvxs, NDDataType_t (0 int8 ...
  9 float64): the uncompressed size tells the two apart;
* ``uncompressedSize``: bytes after decompression.

The libraries are those pvapy's AdImageUtility uses (lz4, blosc, bitshuffle), so the IOC and a
pvapy consumer read the same streams. Sizes are checked before anything is allocated, so a
lying header cannot make the IOC allocate more than one frame's worth (:data:`MAX_BYTES`).
"""

from __future__ import annotations

import numpy as np

from ptychostream.ntndarray import CODECS, DecodeError

#: largest decompressed frame accepted (a 4k x 4k float32 frame is 64 MiB)
MAX_BYTES = 64 * 2**20

#: pvData ScalarType -> numpy dtype (what NDPluginPva puts in codec.parameters)
SCALAR_TYPES = {1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "uint8", 6: "uint16",
                7: "uint32", 8: "uint64", 9: "float32", 10: "float64"}
#: areaDetector NDDataType_t -> numpy dtype (what NDPluginPvxs puts there)
ND_DATA_TYPES = {0: "int8", 1: "uint8", 2: "int16", 3: "uint16", 4: "int32", 5: "uint32",
                 6: "int64", 7: "uint64", 8: "float32", 9: "float64"}


def _field(value, key, default=None):
    try:
        v = value[key]
    except (KeyError, TypeError, AttributeError):
        return default
    return default if v is None else v


def original_layout(value) -> tuple[np.dtype, int]:
    """(dtype, number of pixels) the compressed frame had, from codec.parameters,
    uncompressedSize and the dimensions; DecodeError when they do not agree."""
    code = _field(value, "codec.parameters")
    try:
        code = int(code)
    except (TypeError, ValueError):
        raise DecodeError(f"codec.parameters {code!r} does not give the pixel type") from None
    try:
        n = int(np.prod([int(d["size"]) for d in value["dimension"]]))
        size = int(_field(value, "uncompressedSize", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"compressed array without dimensions or size ({exc})") from exc
    if n <= 0:
        raise DecodeError("compressed array with no pixels")
    candidates = [np.dtype(t[code]) for t in (SCALAR_TYPES, ND_DATA_TYPES) if code in t]
    if size:
        candidates = [d for d in candidates if d.itemsize * n == size]
    if not candidates:
        raise DecodeError(f"codec.parameters {code} and uncompressedSize {size} do not fit "
                          f"{n} pixels")
    dtype = candidates[0]
    if dtype.itemsize * n > MAX_BYTES:
        raise DecodeError(f"frame of {dtype.itemsize * n} bytes uncompressed is larger than "
                          f"{MAX_BYTES} bytes")
    return dtype, n


def _payload(arr: np.ndarray) -> bytes:
    if arr.dtype != np.uint8:
        raise DecodeError(f"compressed data must be a ubyte array, got {arr.dtype}")
    return arr.tobytes()


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DecodeError(f"decoding needs the {module.split('.')[0]} package "
                          "(pip install 'ptychostream[ioc]')") from None


def decode_lz4(value, arr: np.ndarray) -> np.ndarray:
    """One LZ4 block (NDPluginCodec ``compressLZ4``)."""
    block = _need("lz4.block")
    dtype, n = original_layout(value)
    out = block.decompress(_payload(arr), uncompressed_size=dtype.itemsize * n)
    if len(out) != dtype.itemsize * n:
        raise DecodeError(f"lz4 gave {len(out)} bytes, expected {dtype.itemsize * n}")
    return np.frombuffer(out, dtype)


def decode_blosc(value, arr: np.ndarray) -> np.ndarray:
    """A c-blosc 1 buffer (NDPluginCodec ``compressBlosc``, any of its compressors)."""
    blosc = _need("blosc")
    dtype, n = original_layout(value)
    data = _payload(arr)
    nbytes, cbytes, _ = blosc.get_cbuffer_sizes(data)
    if nbytes != dtype.itemsize * n or cbytes != len(data):
        raise DecodeError(f"blosc header says {nbytes} bytes from {cbytes}, expected "
                          f"{dtype.itemsize * n} from {len(data)}")
    return np.frombuffer(blosc.decompress(data), dtype)


def decode_bslz4(value, arr: np.ndarray) -> np.ndarray:
    """Bitshuffle + LZ4 (NDPluginCodec ``compressBSLZ4``: ``bshuf_compress_lz4``, block 0)."""
    bitshuffle = _need("bitshuffle")
    dtype, n = original_layout(value)
    if arr.dtype != np.uint8:
        raise DecodeError(f"compressed data must be a ubyte array, got {arr.dtype}")
    return np.asarray(bitshuffle.decompress_lz4(np.ascontiguousarray(arr), (n,), dtype, 0))


def register() -> None:
    """Put the decoders in ``ptychostream.ntndarray.CODECS`` (done on import)."""
    CODECS.update({"lz4": decode_lz4, "blosc": decode_blosc, "bslz4": decode_bslz4})


# --------------------------------------------------------------------------- encoding (tests,
# benchmarks, a simulated detector with compression on)
#: numpy dtype name -> pvData ScalarType, what NDPluginPva writes
SCALAR_CODES = {v: k for k, v in SCALAR_TYPES.items()}


def compress(image: np.ndarray, codec: str) -> bytes:
    """``image``'s bytes compressed as NDPluginCodec would (lz4, blosc or bslz4)."""
    image = np.ascontiguousarray(image)
    if codec == "lz4":
        return _need("lz4.block").compress(image.tobytes(), store_size=False)
    if codec == "blosc":
        return _need("blosc").compress(image.tobytes(), typesize=image.dtype.itemsize)
    if codec == "bslz4":
        return _need("bitshuffle").compress_lz4(image.reshape(-1), 0).tobytes()
    raise ValueError(f"unknown codec {codec!r}")


def compressed_value(image: np.ndarray, codec: str, unique_id: int = 1,
                     attributes: dict | None = None, parameters: int | None = None):
    """A p4p NTNDArray Value holding ``image`` compressed with ``codec`` (as NDPluginPva
    sends it); ``parameters`` overrides codec.parameters (to send a wrong one)."""
    from ptychostream.ntndarray import Frame, to_value

    image = np.asarray(image)
    data = compress(image, codec) if codec in ("lz4", "blosc", "bslz4") else image.tobytes()
    v = to_value(Frame(np.frombuffer(data, np.uint8), unique_id, 0.0, dict(attributes or {})))
    v["dimension"] = [{"size": image.shape[1], "offset": 0, "fullSize": image.shape[1],
                       "binning": 1, "reverse": False},
                      {"size": image.shape[0], "offset": 0, "fullSize": image.shape[0],
                       "binning": 1, "reverse": False}]
    v["codec.name"] = codec
    v["codec.parameters"] = SCALAR_CODES[image.dtype.name] if parameters is None else parameters
    v["compressedSize"] = len(data)
    v["uncompressedSize"] = image.nbytes
    return v


register()
