"""What a model file is, without importing torch: the frame size, the error every model path
raises, and telling ONNX from a PyTorch file. The IOC's start-up and ``--help`` stay fast."""

from __future__ import annotations

FRAME_SIZE = 128


class ModelError(ValueError):
    """A model file or byte string that cannot serve: says why."""


def is_onnx(data: bytes) -> bool:
    """ONNX files are protobuf ModelProto; torch files are zip (PK) or legacy pickle."""
    if data[:2] == b"PK" or data[:1] == b"\x80":
        return False
    try:
        import onnx

        onnx.load_model_from_string(data)
        return True
    except Exception:
        return False


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
