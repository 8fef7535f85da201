"""Inference engines behind one interface: a batch of frames in, phase images out.

``make_engine(name, model_bytes)`` builds onnxruntime (CPU default), torch, or
TensorRT (where importable, with a CUDA GPU) from ONNX bytes or a PyTorch state
dict. Preprocessing (the intensity scale for low-dose data) lives once, in
:func:`preprocess`, and every engine and the training code use it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ptychostream.modelfile import FRAME_SIZE, WIDTHS, ModelError, is_onnx

log = logging.getLogger(__name__)

# onnxruntime looks up a vendor's telemetry host from every process unless told not to
# (disable_telemetry_events() does not stop the lookup); a user's own setting is kept
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

ENGINES = ("onnxruntime", "torch", "tensorrt")


def preprocess(frames: np.ndarray, intensity_scale: float = 1.0) -> np.ndarray:
    """Detector frames (N, H, W) or (N, 1, H, W), any dtype -> float32 (N, 1, H, W) network input.

    ``intensity_scale`` multiplies the counts, e.g. x10 for 0.5 ms low-dose frames fed to a network
    trained at higher dose (REFERENCE.md, low dose)."""
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"frames must be (N, H, W) or (N, 1, H, W), got {x.shape}")
    if intensity_scale != 1.0:
        x = x * np.float32(intensity_scale)
    return np.ascontiguousarray(x)


class InferenceEngine(ABC):
    """Runs PtychoNN 2.0. Subclasses implement ``_run`` on a preprocessed float32 batch."""

    def note(self) -> str:
        """Anything a user should know about how this engine serves (e.g. its precision)."""
        return ""

    name: str = "engine"
    #: fixed batch size the model requires (published fixed-batch ONNX), or None for any
    fixed_batch: int | None = None

    def infer(self, frames: np.ndarray, intensity_scale: float = 1.0) -> np.ndarray:
        """Frames (N, H, W) -> phase (N, 128, 128) float32, any N (fixed batches padded)."""
        x = preprocess(frames, intensity_scale)
        if x.shape[-2:] != (FRAME_SIZE, FRAME_SIZE):
            raise ValueError(f"frames must be {FRAME_SIZE}x{FRAME_SIZE}, got {x.shape[-2:]}")
        n = len(x)
        if self.fixed_batch is None:
            return self._run(x)[:, 0]
        b = self.fixed_batch
        out = np.empty((n, FRAME_SIZE, FRAME_SIZE), np.float32)
        for s in range(0, n, b):
            chunk = x[s : s + b]
            k = len(chunk)
            if k < b:  # pad the last partial batch with zeros, drop the padding afterwards
                chunk = np.concatenate([chunk, np.zeros((b - k, *chunk.shape[1:]), np.float32)])
            out[s : s + k] = self._run(chunk)[:k, 0]
        return out

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str:
        return self.name


class OnnxRuntimeEngine(InferenceEngine):
    name = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, providers: list[str] | None = None, threads: int = 0,
                 spinning: bool | None = None):
        import onnxruntime as ort

        ort.disable_telemetry_events()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if spinning is None:  # PTYCHOSTREAM_ORT_SPINNING=0: idle threads sleep instead of spinning
            spinning = os.environ.get("PTYCHOSTREAM_ORT_SPINNING", "1") != "0"
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                onnx_bytes, opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelError(f"expected one input, got {len(inputs)} inputs, {len(outputs)} outputs")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4 or list(shape[1:]) != [1, FRAME_SIZE, FRAME_SIZE]:
            raise ModelError(f"model input shape {shape} is not (batch, 1, 128, 128)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def describe(self) -> str:
        provider = self.session.get_providers()[0].removesuffix("ExecutionProvider")
        threads = self.session.get_session_options().intra_op_num_threads
        each = f"{threads} thread{'s' if threads > 1 else ''}" if threads else "all cores"
        return f"onnxruntime ({provider}, {each} a call)"


#: largest phase difference (rad) a reduced-precision engine may show against fp32 on load
PRECISION_TOLERANCE = 0.01
PRECISIONS = ("fp32", "fp16", "bf16")


class TorchEngine(InferenceEngine):
    """PtychoNN 2.0 in torch, near the hardware on a GPU: half precision (bf16 by default on
    CUDA: fp16 is a little faster but overflows at 65504, which a detector's raw counts pass),
    channels_last, and one captured CUDA graph per batch size (rounded up to a power of two,
    so partial batches replay a graph too), fed from a pinned buffer.

    On load it checks itself against fp32 on a reference batch and refuses to serve if the
    phase differs by more than ``tolerance`` rad; ``max_diff_rad`` says by how much it does.
    On the CPU it runs fp32 (or bf16 if asked), eagerly."""

    name = "torch"

    def __init__(self, state: bytes | dict, device: str | None = None,
                 precision: str | None = None, channels_last: bool | None = None,
                 cuda_graphs: bool | None = None, tolerance: float = PRECISION_TOLERANCE,
                 max_batch: int = 1024):
        import torch

        from ptychostream.model import load_state_dict

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        self.precision = precision or ("bf16" if cuda else "fp32")
        if self.precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not "
                             f"{self.precision!r}")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16,
                      "bf16": torch.bfloat16}[self.precision]
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        self.cuda_graphs = cuda if cuda_graphs is None else (bool(cuda_graphs) and cuda)
        self.max_batch = int(max_batch)
        fp32 = load_state_dict(state).to(self.device).eval()
        self.model = self._prepare(load_state_dict(state).to(self.device).eval())
        self._graphs: dict[int, tuple] = {}
        self._pinned = None
        self.max_diff_rad = 0.0
        if self.precision != "fp32":
            self.max_diff_rad = self._check_against(fp32, tolerance)
        del fp32

    def _prepare(self, model):
        torch = self.torch
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.dtype)

    def _check_against(self, fp32, tolerance: float) -> float:
        """Max |phase difference| against the fp32 model on the reference batch."""
        torch = self.torch
        frames, labels = reference_batch()  # the physical frames: on saturated ones (2**32
        keep = [i for i, lab in enumerate(labels) if "saturated" not in lab]  # counts) the
        x = preprocess(frames[keep])  # phase is meaningless and precision moot
        with torch.inference_mode():
            ref = fp32(torch.from_numpy(x).to(self.device)).float()
            got = self._eager(torch.from_numpy(x).to(self.device)).float()
        diff = float((got - ref).abs().max())
        if not np.isfinite(diff) or diff > tolerance:
            raise ModelError(f"{self.precision} output differs from fp32 by {diff:.3g} rad "
                             f"(limit {tolerance:g}): serve it with precision fp32")
        log.info("torch %s engine within %.2g rad of fp32", self.precision, diff)
        return diff

    def _eager(self, x):
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=self.torch.channels_last)
        return self.model(x)

    def _graph_for(self, b: int):
        """A CUDA graph for batch ``b`` (captured on first use) with its static buffers."""
        torch = self.torch
        g = self._graphs.get(b)
        if g is not None:
            return g
        static_in = torch.zeros((b, 1, FRAME_SIZE, FRAME_SIZE), device=self.device,
                                dtype=self.dtype)
        if self.channels_last:
            static_in = static_in.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up, as torch.cuda.graph asks
                self.model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.model(static_in)
        g = self._graphs[b] = (graph, static_in, static_out)
        log.debug("captured a CUDA graph for batch %d", b)
        return g

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        n = len(x)
        if not self.cuda_graphs or n > self.max_batch:
            if not x.flags.writeable:  # torch warns on read-only arrays (p4p's are); 64 KB a frame
                x = np.array(x)
            with torch.inference_mode():
                return self._eager(torch.from_numpy(x).to(self.device)).float().cpu().numpy()
        b = 1 << (n - 1).bit_length()  # next power of two: few graphs, partial batches padded
        if self._pinned is None or len(self._pinned) < b:
            self._pinned = torch.empty((max(b, 8), 1, FRAME_SIZE, FRAME_SIZE),
                                       dtype=torch.float32, pin_memory=True)
        host = self._pinned[:b]
        host[:n].copy_(torch.from_numpy(x))
        if n < b:
            host[n:].zero_()
        graph, static_in, static_out = self._graph_for(b)
        static_in.copy_(host.to(self.device, non_blocking=True))
        graph.replay()
        return static_out[:n].float().cpu().numpy()

    def describe(self) -> str:
        extra = [self.precision]
        if self.channels_last:
            extra.append("channels_last")
        if self.cuda_graphs:
            extra.append("CUDA graphs")
        return f"torch ({self.device.type}, {', '.join(extra)})"

    def note(self) -> str:
        if self.precision == "fp32":
            return ""
        return f"{self.precision} within {self.max_diff_rad:.2g} rad of fp32"


class TensorRTEngine(InferenceEngine):
    """TensorRT engine built from ONNX (FP16 by default) and cached on disk by content hash.

    Needs ``tensorrt`` and a CUDA GPU; torch CUDA tensors hold the I/O buffers."""

    name = "tensorrt"

    def __init__(self, onnx_bytes: bytes, fp16: bool = True, max_batch: int = 64,
                 cache_dir: str | Path | None = None):
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise ModelError("TensorRT needs a CUDA GPU and none is visible")
        self.torch, self.trt = torch, trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        cache_dir = Path(cache_dir or os.environ.get("PTYCHOSTREAM_TRT_CACHE", "~/.cache/ptychostream/trt")).expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(
            onnx_bytes + f"{trt.__version__}{torch.cuda.get_device_name()}{fp16}{max_batch}".encode()
        ).hexdigest()[:20]
        plan = cache_dir / f"ptychonn-{key}.engine"
        if plan.exists():
            serialized = plan.read_bytes()
            log.info("TensorRT engine from cache %s", plan)
        else:
            t0 = time.perf_counter()
            serialized = self._build(onnx_bytes, fp16, max_batch)
            plan.write_bytes(serialized)
            log.info("TensorRT engine built in %.1f s, cached at %s", time.perf_counter() - t0, plan)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        b = self.engine.get_tensor_shape(self.input_name)[0]
        self.fixed_batch = b if b > 0 else None
        self.stream = torch.cuda.Stream()

    def _build(self, onnx_bytes: bytes, fp16: bool, max_batch: int) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
            onnx_bytes = _onnx_to_fp16(onnx_bytes)  # TensorRT 11+: strongly typed, FP16 in the graph
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse the ONNX model: {errs}")
        config = builder.create_builder_config()
        if fp16 and hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 10: weakly typed, FP16 by flag
            config.set_flag(trt.BuilderFlag.FP16)
        inp = network.get_input(0)
        if inp.shape[0] == -1:
            profile = builder.create_optimization_profile()
            s = tuple(inp.shape[1:])
            profile.set_shape(inp.name, (1, *s), (8, *s), (max_batch, *s))
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError("TensorRT engine build failed")
        return bytes(serialized)

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        inp = torch.from_numpy(x).to("cuda", non_blocking=True)
        self.context.set_input_shape(self.input_name, tuple(inp.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda")
        self.context.set_tensor_address(self.input_name, inp.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        torch.cuda.current_stream().synchronize()
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return out.cpu().numpy()


def _onnx_to_fp16(onnx_bytes: bytes) -> bytes:
    """Cast an ONNX graph to float16 with float32 inputs/outputs (onnxconverter-common)."""
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError:
        log.warning("onnxconverter-common not installed: TensorRT engine stays FP32")
        return onnx_bytes
    model = float16.convert_float_to_float16(onnx.load_model_from_string(onnx_bytes), keep_io_types=True)
    return model.SerializeToString()


def available_engines() -> list[str]:
    """Engines that can run on this machine."""
    names = []
    try:
        import onnxruntime  # noqa: F401

        names.append("onnxruntime")
    except ImportError:
        pass
    try:
        import torch  # noqa: F401

        names.append("torch")
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            names.append("tensorrt")
    except ImportError:
        pass
    return names


def make_engine(name: str, model: bytes | str | Path, **kwargs) -> InferenceEngine:
    """Build engine ``name`` from model bytes or a file (ONNX or PyTorch state dict)."""
    from ptychostream.model import to_onnx_bytes

    data = Path(model).read_bytes() if isinstance(model, str | Path) else bytes(model)
    if not data:
        raise ModelError("empty model")
    if name == "onnxruntime":
        if not is_onnx(data):
            data = to_onnx_bytes(data)
        return OnnxRuntimeEngine(data, **kwargs)
    if name == "torch":
        if is_onnx(data):
            raise ModelError("the torch engine needs a PyTorch state dict, got an ONNX model")
        return TorchEngine(data, **kwargs)
    if name == "tensorrt":
        return TensorRTEngine(to_onnx_bytes(data), **kwargs)
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


#: a model whose name ends so (``NN:Model``'s name field) may be another architecture than
#: PtychoNN 2.0; it must still pass the reference batch
CUSTOM_SUFFIX = "@custom"
#: output beyond +-pi by more than this (rad) is not a phase
PHASE_TOLERANCE = 1e-3


def ptychonn2_conv_shapes(widths: tuple[int, ...] = WIDTHS) -> list[tuple[int, ...]]:
    """Conv weight shapes of PtychoNN 2.0 in graph order: its architecture's fingerprint."""
    shapes, c = [], 1
    for w in widths:
        shapes += [(w, c, 3, 3), (w, w, 3, 3)]
        c = w
    for w in reversed(widths):
        shapes += [(w, c, 3, 3), (w, w, 3, 3)]
        c = w
    return [*shapes, (1, c, 3, 3)]


def check_architecture(onnx_bytes: bytes) -> None:
    """Refuse an ONNX graph that is not PtychoNN 2.0: one input, one output and the conv
    layers of PtychoNN 2.0 (shapes, in order). Exported, fixed-batch and published files pass;
    a one-layer or two-headed network does not."""
    import onnx

    try:
        graph = onnx.ModelProto.FromString(onnx_bytes).graph  # external data never read
    except Exception as exc:
        raise ModelError(f"not a readable ONNX model: {exc.__class__.__name__}") from exc
    init = {i.name: tuple(i.dims) for i in graph.initializer}
    for node in graph.node:  # weights given as Constant nodes (some exporters do)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t is not None:
                    init.setdefault(node.output[0], tuple(a.t.dims))
    inputs = [i for i in graph.input if i.name not in init]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelError(f"not PtychoNN 2.0: {len(inputs)} inputs and {len(graph.output)} "
                         f"outputs, expected 1 and 1 (name it '...{CUSTOM_SUFFIX}' to allow "
                         "another architecture)")
    convs = [init.get(n.input[1]) if len(n.input) > 1 else None
             for n in graph.node if n.op_type == "Conv"]
    expected = ptychonn2_conv_shapes()
    if convs != expected:
        raise ModelError(f"not PtychoNN 2.0: {len(convs)} conv layers "
                         f"{'of other shapes ' if len(convs) == len(expected) else ''}"
                         f"where PtychoNN 2.0 has {len(expected)} (name it "
                         f"'...{CUSTOM_SUFFIX}' to allow another architecture)")


@functools.cache
def reference_batch() -> tuple[np.ndarray, tuple[str, ...]]:
    """The fixed batch every model must pass before it serves, and what each frame is:
    simulated diffraction frames (mostly zero pixels, as real ones), an all-zero frame, a frame
    saturated at a 16-bit full well and one at a 32-bit counter's maximum."""
    from ptychostream.simulation import simulate_scan

    sim = simulate_scan(n_positions=4, step_m=100e-9, seed=11).frames.astype(np.float32)
    shape = (1, FRAME_SIZE, FRAME_SIZE)
    frames = np.concatenate([sim, np.zeros(shape, np.float32),
                             np.full(shape, 65535.0, np.float32),
                             np.full(shape, 2.0**32 - 1, np.float32)])
    labels = (*(f"simulated frame {i + 1}" for i in range(len(sim))), "all-zero frame",
              "frame saturated at 65535", "frame saturated at 2**32-1")
    frames.setflags(write=False)
    return frames, labels


def validate_engine(engine: InferenceEngine, intensity_scale: float = 1.0) -> None:
    """Run the reference batch (:func:`reference_batch`) and refuse a model whose output on
    any of its frames is not a finite phase image of the right shape: within +-pi."""
    frames, labels = reference_batch()
    n = len(frames)
    try:
        out = np.asarray(engine.infer(frames, intensity_scale))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"reference batch failed: {exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0][:200]}") from exc
    if out.shape != (n, FRAME_SIZE, FRAME_SIZE):
        raise ModelError(f"output shape {out.shape} is not ({n}, 128, 128)")
    flat = out.reshape(n, -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        bad = [labels[i] for i in np.nonzero(~finite)[0]]
        raise ModelError(f"output is not finite on the {', '.join(bad)}")
    peak = np.abs(flat).max(axis=1)
    over = peak > np.pi + PHASE_TOLERANCE
    if over.any():
        i = int(np.argmax(peak))
        raise ModelError(f"output is not a phase: {peak[i]:.3g} rad on the {labels[i]} "
                         "(expected within +-pi)")


def load_engine(name: str, model: bytes | str | Path, allow_custom: bool = False,
                intensity_scale: float = 1.0, **kwargs) -> InferenceEngine:
    """The one way a model reaches service: PtychoNN 2.0 (unless ``allow_custom``), built by
    make_engine, and correct on the reference batch at ``intensity_scale``."""
    data = Path(model).read_bytes() if isinstance(model, str | Path) else bytes(model)
    if data and not allow_custom and is_onnx(data):
        check_architecture(data)
    try:
        engine = make_engine(name, data, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{exc.__class__.__name__}: {exc}") from exc
    validate_engine(engine, intensity_scale)
    return engine
