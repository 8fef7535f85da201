"""PtychoNN 2.0 and the inference engines (issue 2)."""

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ptychostream.engines import (
    OnnxRuntimeEngine,
    available_engines,
    load_engine,
    make_engine,
    preprocess,
)
from ptychostream.model import (
    ModelError,
    PtychoNN2,
    export_onnx,
    is_onnx,
    load_state_dict,
    n_parameters,
    state_dict_bytes,
)


def published_layout(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict written from REFERENCE.md's description alone (not from our class):
    encoder blocks 16,32,64,128 and decoder2 blocks 128,64,32,16 + final conv 16->1."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, c_in: int, c_out: int) -> None:
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.05
        sd[f"{name}.bias"] = torch.zeros(c_out)

    c = 1
    for b, w in enumerate((16, 32, 64, 128)):  # Conv, ReLU, Conv, ReLU, MaxPool
        conv(f"encoder.{5 * b}", c, w)
        conv(f"encoder.{5 * b + 2}", w, w)
        c = w
    for b, w in enumerate((128, 64, 32, 16)):  # Conv, ReLU, Conv, ReLU, Upsample
        conv(f"decoder2.{5 * b}", c, w)
        conv(f"decoder2.{5 * b + 2}", w, w)
        c = w
    conv("decoder2.20", 16, 1)  # then Tanh
    return sd


def test_shape_and_parameter_count():
    m = PtychoNN2()
    out = m(torch.zeros(3, 1, 128, 128))
    assert out.shape == (3, 1, 128, 128)
    assert 0.65e6 < n_parameters(m) < 0.75e6  # "~0.7M parameters"
    assert n_parameters(m) == 733_921


def test_output_range_is_pi_tanh():
    m = PtychoNN2()
    with torch.no_grad():
        out = m(torch.rand(2, 1, 128, 128) * 1e4)
    assert out.abs().max() <= np.pi + 1e-6


def test_published_state_dict_loads_unchanged(tmp_path):
    sd = published_layout()
    path = tmp_path / "best_model.pth"
    torch.save(sd, path)
    model = load_state_dict(path)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    # the wrappers people save too: training checkpoints and DataParallel prefixes
    wrapped = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in sd.items()}}
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    again = load_state_dict(buf.getvalue())
    assert torch.equal(again.state_dict()["decoder2.20.weight"], sd["decoder2.20.weight"])


def test_wrong_state_dicts_are_refused_with_a_reason():
    sd = published_layout()
    sd["encoder.0.weight"] = torch.zeros(32, 1, 3, 3)  # PtychoNN 1 width
    with pytest.raises(ModelError, match="does not fit PtychoNN 2.0"):
        load_state_dict(sd)
    with pytest.raises(ModelError, match="not a loadable PyTorch file"):
        load_state_dict(b"this is not a model")


def test_onnx_export_matches_torch(tmp_path):
    torch.manual_seed(0)
    m = PtychoNN2().eval()
    data = export_onnx(m, tmp_path / "m.onnx")
    assert is_onnx(data) and (tmp_path / "m.onnx").read_bytes() == data
    assert not is_onnx(state_dict_bytes(m))
    shape = onnx.load_model_from_string(data).graph.input[0].type.tensor_type.shape
    assert shape.dim[0].dim_param  # dynamic batch
    x = np.random.default_rng(0).poisson(30, (5, 128, 128)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(preprocess(x))).numpy()[:, 0]
    got = make_engine("onnxruntime", data).infer(x)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("n", [1, 5, 8, 13, 17])
def test_fixed_batch_onnx_serves_any_batch(n):
    torch.manual_seed(1)
    m = PtychoNN2().eval()
    fixed = make_engine("onnxruntime", export_onnx(m, batch_size=8))
    assert isinstance(fixed, OnnxRuntimeEngine) and fixed.fixed_batch == 8
    dynamic = make_engine("onnxruntime", export_onnx(m))
    x = np.random.default_rng(n).poisson(30, (n, 128, 128)).astype(np.float32)
    out = fixed.infer(x)
    assert out.shape == (n, 128, 128)
    np.testing.assert_allclose(out, dynamic.infer(x), atol=1e-5)


def test_engines_agree_and_state_dict_feeds_onnxruntime():
    torch.manual_seed(2)
    sd = state_dict_bytes(PtychoNN2())
    x = np.random.default_rng(0).poisson(30, (3, 128, 128)).astype(np.uint32)
    a = make_engine("torch", sd).infer(x)
    b = make_engine("onnxruntime", sd).infer(x)  # converted to ONNX on the way in
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert {"onnxruntime", "torch"} <= set(available_engines())


def test_intensity_scale_is_applied_once():
    x = np.full((1, 128, 128), 3, np.uint16)
    p = preprocess(x, 10.0)
    assert p.shape == (1, 1, 128, 128) and p.dtype == np.float32
    assert np.all(p == 30.0)
    torch.manual_seed(3)
    eng = make_engine("torch", state_dict_bytes(PtychoNN2()))
    np.testing.assert_allclose(eng.infer(x, intensity_scale=10.0), eng.infer(x * 10), atol=1e-6)


class _Half(nn.Module):
    def forward(self, x):
        return x[..., ::2, ::2]


def test_load_engine_refuses_wrong_shapes_and_junk():
    buf = io.BytesIO()
    torch.onnx.export(_Half(), (torch.zeros(1, 1, 128, 128),), buf, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}})
    with pytest.raises(ModelError, match="output shape"):
        load_engine("onnxruntime", buf.getvalue())
    with pytest.raises(ModelError):
        load_engine("onnxruntime", b"\x00\x01garbage")
    with pytest.raises(ModelError, match="empty"):
        load_engine("onnxruntime", b"")


def test_torch_engine_checks_reduced_precision_against_fp32():
    """bf16 (what the CPU has of half precision) is checked against fp32 on load: a model whose
    reduced-precision output drifts is refused with the drift in the reason, a normal one serves
    and says how close it is (the CUDA path adds fp16, channels_last and graphs the same way)."""
    import io

    import torch

    from ptychostream.engines import TorchEngine, reference_frames
    from ptychostream.model import ModelError, PtychoNN2, state_dict_bytes

    torch.manual_seed(0)
    net = PtychoNN2()
    plain = TorchEngine(state_dict_bytes(net), device="cpu", precision="bf16")
    assert 0 < plain.max_diff_rad <= 0.01 and "bf16" in plain.note()
    fp32 = TorchEngine(state_dict_bytes(net), device="cpu")
    assert fp32.precision == "fp32" and fp32.note() == "" and "fp32" in fp32.describe()
    x = reference_frames()
    np.testing.assert_allclose(plain.infer(x), fp32.infer(x), atol=0.01)

    # the same function computed as a small difference of large numbers: bf16 cannot hold it
    with torch.no_grad():
        net.decoder2[-5].bias += 1000.0  # the last ReLU'd activations: ~1000 larger
        net.decoder2[-2].bias -= 1000.0 * net.decoder2[-2].weight.sum()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    with pytest.raises(ModelError, match="differs from fp32 by"):
        TorchEngine(buf.getvalue(), device="cpu", precision="bf16")
    assert TorchEngine(buf.getvalue(), device="cpu").max_diff_rad == 0.0
