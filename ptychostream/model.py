"""PtychoNN 2.0: PtychoNN's encoder-decoder without the amplitude branch, half the filters.

Module names (``encoder.N``, ``decoder2.N``) are those of the published
checkpoints, so their state dicts load unchanged. Input: 1x128x128 diffraction
intensity (after :func:`ptychostream.engines.preprocess`); output: 1x128x128
phase in (-pi, pi).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ptychostream.modelfile import FRAME_SIZE, WIDTHS, ModelError, is_onnx

log = logging.getLogger(__name__)



def _conv_pair(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=1, padding=(1, 1)),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, stride=1, padding=(1, 1)),
        nn.ReLU(),
    ]


class PtychoNN2(nn.Module):
    """Phase-only PtychoNN (~0.73M parameters)."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        enc: list[nn.Module] = []
        c = 1
        for w in widths:
            enc += [*_conv_pair(c, w), nn.MaxPool2d((2, 2))]
            c = w
        dec: list[nn.Module] = []
        for w in reversed(widths):
            dec += [*_conv_pair(c, w), nn.Upsample(scale_factor=2, mode="bilinear")]
            c = w
        dec += [nn.Conv2d(c, 1, 3, stride=1, padding=(1, 1)), nn.Tanh()]
        self.encoder = nn.Sequential(*enc)
        self.decoder2 = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder2(self.encoder(x)) * math.pi


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, a training checkpoint {'model_state_dict': ...} or
    {'state_dict': ...}, and DataParallel/DDP 'module.' prefixes."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("not a PyTorch state dict (expected a mapping of tensor names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict(source: str | Path | bytes | dict) -> PtychoNN2:
    """Build a PtychoNN2 from a state dict (path, bytes or dict), published layout."""
    if isinstance(source, dict):
        obj = source
    else:
        buf = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
        try:
            with warnings.catch_warnings():  # a bad file is refused with one line, not a warning
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(buf, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles/zips
            raise ModelError(f"not a loadable PyTorch file: {exc.__class__.__name__}: {exc}") from exc
    state = _unwrap_state_dict(obj)
    model = PtychoNN2()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"state dict does not fit PtychoNN 2.0: {str(exc).splitlines()[0]}") from exc
    return model.eval()


def state_dict_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def export_onnx(
    model: nn.Module, path: str | Path | None = None, batch_size: int | None = None, opset: int = 17
) -> bytes:
    """Export to ONNX with input ``diffraction`` and output ``phase``.

    ``batch_size=None`` gives a dynamic batch dimension; an int gives a fixed one (as in the
    published 8x1x128x128 files). Returns the ONNX bytes and writes them to ``path`` if given.
    """
    model = model.eval().cpu()
    dummy = torch.zeros(batch_size or 2, 1, FRAME_SIZE, FRAME_SIZE)
    buf = io.BytesIO()
    dynamic = None if batch_size else {"diffraction": {0: "batch"}, "phase": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            model, (dummy,), buf, input_names=["diffraction"], output_names=["phase"],
            dynamic_axes=dynamic, opset_version=opset, dynamo=False,
        )
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def to_onnx_bytes(data: bytes, batch_size: int | None = None) -> bytes:
    """Model bytes of either kind (ONNX or state dict) as ONNX bytes."""
    if is_onnx(data):
        return data
    return export_onnx(load_state_dict(data), batch_size=batch_size)
