"""Iterative reconstruction of a finished scan (REFERENCE.md, workflow step 2).

``reconstruct(scan_path, out_path)`` runs rPIE with pty-chi (default; CPU or GPU) or Tike
(GPU only, the original workflow's engine) and writes one HDF5 file: the complex object on a
regular grid in the geometry convention of :mod:`ptychostream.geometry`, its aligned phase,
the probe, the illumination map and the metadata labels and validation need.
Heavy libraries are imported inside the functions so the module imports cheaply on any
Globus Compute endpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptychostream.geometry import frame_corner_px, map_geometry, move_ramp_to_probe

log = logging.getLogger(__name__)

ENGINES = ("ptychi", "tike")
#: options each engine understands (anything else is refused, not silently ignored)
OPTIONS = {
    "ptychi": {"batch_size", "num_batch", "batching", "object_step", "probe_step", "object_alpha",
               "probe_alpha", "probe_start", "update_probe", "seed", "threads", "data_on_device",
               "preset"},
    "tike": {"num_batch", "batch_method", "alpha", "update_probe", "threads"},
}
#: pty-chi settings per device (``preset`` option; None picks by device). Why two: on a CPU the
#: arithmetic dominates and small minibatches converge fastest per second; on a GPU every
#: minibatch costs a few ms of Python and kernel launches whatever its size, so a GPU wants few,
#: large minibatches (Tike's num_batch, the original workflow's setting), spread over the scan
#: (uniform batching), with the frames resident on the device and one host sync per epoch.
PTYCHI_PRESETS = {
    "cpu": {"batch_size": None, "num_batch": None, "batching": "random", "data_on_device": False},
    "gpu": {"batch_size": None, "num_batch": 2, "batching": "uniform", "data_on_device": True},
}
#: rPIE object step (pty-chi SGD step size) at or below the overlap-limited batch size
OBJECT_STEP = 0.2
#: pixels of empty object around the outermost frames; a few are enough for sub-pixel shifts
MARGIN_PX = 4
#: a pixel of the object is "well illuminated" above this fraction of the maximum illumination
ILLUMINATION_THRESHOLD = 0.1
RECON_FORMAT = 1


class ReconstructionError(RuntimeError):
    """The reconstruction could not run or diverged: says why."""


@dataclass
class Reconstruction:
    """A reconstruction file in memory (see :func:`read_reconstruction`)."""

    object: np.ndarray  # (H, W) complex64
    phase: np.ndarray  # (H, W) float32, ramp, sign and offset fixed, see labels.align_phase
    probe: np.ndarray  # (modes, 128, 128) complex64
    illumination: np.ndarray  # (H, W) float32, sum over positions of |probe|^2
    positions_m: np.ndarray  # (N, 2) x, y used by the reconstruction
    pixel_size_m: float
    origin_m: tuple[float, float]  # (x0, y0) of pixel [0, 0], ptychostream.geometry convention
    iterations: int
    engine: str
    seconds: float
    recon_id: str
    scan_id: str
    scan_path: str = ""
    attrs: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """Well-illuminated pixels: the only part of the reconstruction that means anything."""
        return self.illumination >= ILLUMINATION_THRESHOLD * float(self.illumination.max())

    @property
    def frame_size(self) -> int:
        return int(self.probe.shape[-1])


def illumination_map(
    probe: np.ndarray, positions_m: np.ndarray, origin_m, pixel_m: float, shape: tuple[int, int]
) -> np.ndarray:
    """Sum of the incoherent probe intensity placed at every beam position (nearest pixel:
    a weight map for masking, sub-pixel accuracy is not needed)."""
    intensity = np.sum(np.abs(np.asarray(probe).reshape(-1, *probe.shape[-2:])) ** 2, axis=0)
    n = intensity.shape[-1]
    out = np.zeros(shape, np.float64)
    for p in np.asarray(positions_m, float):
        r0, c0 = (int(round(v)) for v in frame_corner_px(p, origin_m, pixel_m, n))
        rs, cs = slice(max(r0, 0), min(r0 + n, shape[0])), slice(max(c0, 0), min(c0 + n, shape[1]))
        out[rs, cs] += intensity[rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0]
    return out.astype(np.float32)


def initial_probe(scan, modes: int, engine: str = "ptychi") -> np.ndarray:
    """(modes, N, N) complex64 initial probe: the file's probe if it has one, else a defocused
    zone-plate probe of the scan's beam size (ptychostream.simulation.make_probe); extra modes
    are weak orthogonal Hermite modes, from the engine's own generator (pty-chi needs numpy 2
    and Tike numpy 1, so neither can rely on the other being installed)."""
    n = scan.frame_size
    if scan.probe is not None:
        p0 = np.asarray(scan.probe, np.complex64).reshape(-1, n, n)[0]
    else:
        from ptychostream.simulation import make_probe

        log.info("scan has no probe: starting from a %.0f nm zone-plate probe", scan.beam_fwhm_m * 1e9)
        p0 = make_probe(n, scan.object_pixel_size_m, scan.energy_ev, scan.beam_fwhm_m)
    probe = np.zeros((1, modes, n, n), np.complex64)
    probe[0, 0] = p0
    if modes > 1 and engine == "tike":
        from tike.ptycho.probe import add_modes_cartesian_hermite

        return np.asarray(add_modes_cartesian_hermite(probe[:, :1], modes), np.complex64)[0]
    if modes > 1:
        import torch
        from ptychi.utils import orthogonalize_initial_probe

        probe = orthogonalize_initial_probe(torch.from_numpy(probe)).numpy()
    return probe[0]


def auto_batch_size(positions_m: np.ndarray, beam_m: float, overlaps: float = 3.0) -> int:
    """Minibatch size for batched rPIE: updates of positions in one batch add up where their
    probes overlap, so a batch may hold only ~``overlaps`` positions per probe footprint or rPIE
    overshoots and diverges (measured here: batch 32 diverged on 60 positions at 100 nm step,
    batch 8 and 12 converged). With k the mean number of positions within half a beam width
    of a position, batch = overlaps * N / k, at most 32."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions_m, float)
    k = np.mean([len(nb) for nb in cKDTree(pos).query_ball_point(pos, r=beam_m / 2)])
    return int(np.clip(overlaps * len(pos) / max(k, 1.0), 1, 32))


def _check_scan(scan, probe_modes: int, iterations: int) -> None:
    if scan.n_frames < 2:
        raise ReconstructionError(f"scan {scan.scan_id} has {scan.n_frames} frames; need at least 2")
    if scan.frames.shape[-1] != scan.frames.shape[-2]:
        raise ReconstructionError(f"frames must be square, got {scan.frames.shape[-2:]}")
    if not 1 <= probe_modes <= 12:
        raise ValueError(f"probe_modes must be 1..12, got {probe_modes}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not np.all(np.isfinite(scan.positions_m)):
        raise ReconstructionError("scan positions contain NaN or inf")


def ptychi_settings(scan, device: str, options: dict) -> dict:
    """The pty-chi settings a run uses: the device's preset (PTYCHI_PRESETS), then the caller's
    options; batch size and object step resolved.

    Batch size: ``batch_size`` if given, else ``ceil(frames / num_batch)`` if ``num_batch``,
    else :func:`auto_batch_size`. Object step: ``object_step`` if given, else OBJECT_STEP scaled
    by ``auto_batch_size / batch_size`` when the batch is larger than the overlap allows: rPIE's
    updates of overlapping positions in one minibatch add up, so k times the positions per
    probe footprint needs 1/k of the step (the probe update is a batch mean and needs no scaling).
    """
    preset = options.get("preset") or ("cpu" if device == "cpu" else "gpu")
    if preset not in PTYCHI_PRESETS:
        raise ValueError(f"unknown pty-chi preset {preset!r}; choose from {sorted(PTYCHI_PRESETS)}")
    cfg = dict(PTYCHI_PRESETS[preset])
    cfg.update({k: options[k] for k in ("batch_size", "num_batch", "batching", "data_on_device")
                if options.get(k) is not None})
    if cfg["batching"] not in ("random", "uniform", "compact"):
        raise ValueError(f"batching must be random, uniform or compact, got {cfg['batching']!r}")
    auto = auto_batch_size(scan.positions_m, scan.beam_fwhm_m)
    if cfg["batch_size"]:
        batch = int(cfg["batch_size"])
    elif cfg["num_batch"]:
        batch = math.ceil(scan.n_frames / int(cfg["num_batch"]))
    else:
        batch = auto
    batch = max(1, min(batch, scan.n_frames))
    step = options.get("object_step")
    if step is None:
        step = OBJECT_STEP * min(1.0, auto / batch)
    return {"preset": preset, "batch_size": batch, "auto_batch_size": auto, "batching": cfg["batching"],
            "data_on_device": bool(cfg["data_on_device"]) and device != "cpu", "object_step": float(step)}


def _batch_fetching_loader(reconstructor) -> None:
    """Give pty-chi's reconstructor a loader that indexes the frames once per minibatch.

    Why: pty-chi's DataLoader fetches and collates frame by frame (963 Python calls and tensor
    copies per epoch of a 963-frame scan, ~half a million in 500 epochs: seconds of pure
    overhead on a GPU). Same sampler, same order, same (indices, patterns) batches."""
    import torch
    from torch.utils.data import DataLoader

    dataset = getattr(reconstructor, "dataset", None)
    loader = getattr(reconstructor, "dataloader", None)
    if dataset is None or loader is None or not hasattr(dataset, "patterns"):
        log.warning("pty-chi internals changed: keeping its frame-by-frame loader")
        return

    class _Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitems__(self, index):
            i = torch.as_tensor(index, dtype=torch.long, device="cpu")
            patterns = dataset.patterns
            return i, patterns[i.to(patterns.device)]

    reconstructor.dataloader = DataLoader(_Batches(), batch_sampler=loader.batch_sampler,
                                          generator=loader.generator, collate_fn=lambda batch: batch)


def _defer_loss_sync(reconstructor) -> None:
    """Keep pty-chi's displayed loss on the device until the end of each epoch.

    Why: its loss tracker copies each minibatch's loss to the host, a device synchronisation
    per minibatch that stops the CPU queueing the next minibatch's kernels while the GPU works."""
    import torch
    from ptychi.reconstructors.base import LossTracker

    old = getattr(reconstructor, "loss_tracker", None)
    if not isinstance(old, LossTracker):
        log.warning("pty-chi internals changed: keeping its per-minibatch loss")
        return

    class _DeferredLossTracker(LossTracker):
        def update_batch_loss_with_metric_function(self, y_pred, y_true) -> None:
            self.epoch_loss = self.epoch_loss + self.metric_function(y_pred, y_true).detach()
            self.accumulated_num_batches = self.accumulated_num_batches + 1

        def conclude_epoch(self, epoch=None) -> None:
            if torch.is_tensor(self.epoch_loss):
                self.epoch_loss = float(self.epoch_loss)
            super().conclude_epoch(epoch)

    reconstructor.loss_tracker = _DeferredLossTracker(
        metric_function=old.metric_function, always_compute_loss=old.always_compute_loss)


@contextlib.contextmanager
def _sync_free_patches():
    """pty-chi's integer patch extraction and placement without their bounds checks.

    Why: each call turns four GPU tensors into Python bools to decide whether to pad the object
    (``max(-sxs.min(), 0)`` ...): 12 host synchronisations per rPIE minibatch, each one stalling
    the CPU until the GPU has drained its queue. Used only when every probe window lies inside the
    object (checked on the host first: our grid has a margin around the outermost frames and the
    positions are fixed), where the padding branch never runs; the window corners are clamped to
    the object, so even a wrong check cannot index outside it. Same arithmetic otherwise."""
    import ptychi.image_proc as ip
    import torch

    names = ("extract_patches_integer", "place_patches_integer", "batch_slice", "batch_put")
    if not all(hasattr(ip, name) for name in names):
        log.warning("pty-chi internals changed: keeping its bounds-checked patch functions")
        yield
        return
    originals = ip.extract_patches_integer, ip.place_patches_integer

    def corners(positions, shape, image):
        sy = (positions[:, 0] - (shape[0] - 1.0) / 2.0).round().int()
        sx = (positions[:, 1] - (shape[1] - 1.0) / 2.0).round().int()
        sy = torch.clamp(sy, 0, image.shape[-2] - shape[0])
        sx = torch.clamp(sx, 0, image.shape[-1] - shape[1])
        return sy, sx

    def extract_patches_integer(image, positions, shape):
        sy, sx = corners(positions, shape, image)
        return ip.batch_slice(image, sy, sx, patch_size=shape, check_bounds=False)

    def place_patches_integer(image, positions, patches, op="add"):
        sy, sx = corners(positions, patches.shape[-2:], image)
        return ip.batch_put(image, patches, sy, sx, op=op, check_bounds=False)

    ip.extract_patches_integer, ip.place_patches_integer = extract_patches_integer, place_patches_integer
    try:
        yield
    finally:
        ip.extract_patches_integer, ip.place_patches_integer = originals


def _windows_inside(scan, shape, origin) -> bool:
    """Every frame's window (rounded as pty-chi rounds it) inside the object grid."""
    n = scan.frame_size
    c = np.array([frame_corner_px(p, origin, scan.object_pixel_size_m, n) for p in scan.positions_m])
    c = np.round(c)
    return bool(c.min() >= 1 and c[:, 0].max() + n <= shape[0] - 1 and c[:, 1].max() + n <= shape[1] - 1)


def _run_ptychi(scan, probe0, shape, origin, iterations, device, options) -> tuple[np.ndarray, np.ndarray, dict]:
    """rPIE with pty-chi; positions fixed (the geometry must stay the one labels use)."""
    import ptychi.api as api
    import torch
    from ptychi.api.task import PtychographyTask
    from ptychi.utils import rescale_probe

    dx = scan.object_pixel_size_m
    settings = ptychi_settings(scan, device, options)
    frames = np.asarray(scan.frames, np.float32)
    opt = api.RPIEOptions()
    opt.data_options.wavelength_m = 1.239841984e-6 / scan.energy_ev
    opt.data_options.fft_shift = True  # our frames have the zero frequency in the centre
    opt.data_options.save_data_on_device = settings["data_on_device"]
    obj_opt = opt.object_options
    obj_opt.pixel_size_m = dx
    obj_opt.optimizable = True
    obj_opt.optimizer = api.Optimizers.SGD
    obj_opt.step_size = settings["object_step"]
    obj_opt.alpha = float(options.get("object_alpha", 0.1))
    # pixel index = position_px + origin_coords (row, col): put the grid where map_geometry says
    obj_opt.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    obj_opt.position_origin_coords = [-origin[1] / dx, -origin[0] / dx]
    pr_opt = opt.probe_options
    pr_opt.optimizable = bool(options.get("update_probe", True))
    pr_opt.optimizer = api.Optimizers.SGD
    pr_opt.step_size = float(options.get("probe_step", 0.2))
    pr_opt.alpha = float(options.get("probe_alpha", 0.1))
    pr_opt.optimization_plan.start = int(options.get("probe_start", 1))
    opt.probe_position_options.optimizable = False
    rec = opt.reconstructor_options
    rec.num_epochs = int(iterations)
    rec.batch_size = settings["batch_size"]
    rec.batching_mode = api.BatchingModes(settings["batching"])
    rec.random_seed = int(options.get("seed", 0))
    rec.default_device = api.Devices.CPU if device == "cpu" else api.Devices.GPU

    probe = rescale_probe(probe0[None], frames)  # (1, modes, N, N), power matched to the data
    pos_px = np.asarray(scan.positions_m, np.float64) / dx
    obj = np.ones((1, *shape), np.complex64)
    # pty-chi sets a process-wide default device; put back what was there, which is usually
    # none at all: torch.set_default_device("cpu") would leave a function mode that costs every
    # later torch call a Python round trip (the refinement took 1.5x its time after a run).
    # torch.get_default_device() says "cpu" for none, so read the context torch keeps itself
    context = getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
    previous_device = None if context is None else context.device
    with warnings.catch_warnings():
        # pty-chi reads a scalar from a tensor that requires grad, once per run: harmless noise
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        try:
            if device.startswith("cuda:"):  # pty-chi runs on the current device
                torch.cuda.set_device(device)
            task = PtychographyTask(
                opt, diffraction_data=frames, object_data=obj, probe_data=probe,
                probe_position_x_px=pos_px[:, 0], probe_position_y_px=pos_px[:, 1],
            )
            _batch_fetching_loader(task.reconstructor)
            _defer_loss_sync(task.reconstructor)
            inside = _windows_inside(scan, shape, origin)
            settings["sync_free_patches"] = inside
            with _sync_free_patches() if inside else contextlib.nullcontext():
                task.run()
            result_obj = task.get_data_to_cpu("object", as_numpy=True)[0]
            result_probe = task.get_data_to_cpu("probe", as_numpy=True)[0]
            table = task.reconstructor.loss_tracker.table
            settings["final_loss"] = float(table["loss"].iloc[-1]) if len(table) else float("nan")
        finally:
            torch.set_default_device(previous_device)
    return result_obj, result_probe, settings


def _run_tike(scan, probe0, shape, origin, iterations, device, options) -> tuple[np.ndarray, np.ndarray, dict]:
    """rPIE with Tike (CUDA GPU and numpy<2: lives in the HPC endpoint's environment, see
    hpc/endpoint/). API of tike 0.26: ``psi`` is (depth, rows, cols), ``probe`` (1, 1, modes,
    N, N), ``scan`` the minimum corner of each probe window as (row, col) in object pixels,
    ``data`` with the zero frequency in the corner; probe updates only with ``probe_options``."""
    try:
        import tike.ptycho
    except ImportError as exc:
        raise ReconstructionError(
            "engine 'tike' needs the tike package, which needs numpy<2 and a CUDA GPU: build the "
            "HPC endpoint's environment with hpc/endpoint/build-env.sh and run there"
        ) from exc
    dx = scan.object_pixel_size_m
    n = scan.frame_size
    corners = np.array([frame_corner_px(p, origin, dx, n) for p in scan.positions_m], np.float32)
    data = np.fft.ifftshift(np.asarray(scan.frames, np.float32), axes=(-2, -1))
    probe = probe0[None, None].astype(np.complex64)  # (1, 1, modes, N, N)
    settings = {"num_batch": int(options.get("num_batch", 10)),
                "batch_method": str(options.get("batch_method", "wobbly_center")),
                "alpha": float(options.get("alpha", 0.05))}
    params = tike.ptycho.PtychoParameters(
        psi=np.ones((1, *shape), np.complex64),
        probe=probe,
        scan=corners,
        algorithm_options=tike.ptycho.RpieOptions(
            num_iter=int(iterations), num_batch=settings["num_batch"],
            batch_method=settings["batch_method"], alpha=settings["alpha"],
        ),
        probe_options=tike.ptycho.ProbeOptions() if options.get("update_probe", True) else None,
        object_options=tike.ptycho.ObjectOptions(),
    )
    gpu = 0 if device in (None, "cuda", "gpu") else int(str(device).split(":")[-1])
    result = tike.ptycho.reconstruct(data=data, parameters=params, num_gpu=(gpu,))
    psi = np.asarray(result.psi).reshape(-1, *shape)[0]
    probe_out = np.asarray(result.probe).reshape(-1, n, n)
    costs = result.algorithm_options.costs
    settings["final_loss"] = float(np.mean(costs[-1])) if costs else float("nan")
    return psi.astype(np.complex64), probe_out.astype(np.complex64), settings


def _default_device(device: str | None, engine: str) -> str:
    if device is not None:
        return device
    import torch

    if engine == "tike" or torch.cuda.is_available():
        return "cuda"
    return "cpu"


def reconstruct(
    scan_path: str,
    out_path: str,
    engine: str = "ptychi",
    iterations: int = 100,
    probe_modes: int = 1,
    device: str | None = None,
    **options,
) -> str:
    """Reconstruct one scan file with rPIE and write the reconstruction HDF5; returns its path.

    ``engine``: "ptychi" (CPU or GPU) or "tike" (GPU). ``iterations``: rPIE epochs (the paper
    ran 500 with Tike on GPUs; 20-100 suffice on CPU for the simulated scans at 100 nm step).
    ``device``: "cpu" / "cuda"; None picks a GPU when there is one. ``options`` (pty-chi):
    preset ("cpu" / "gpu", default by device: PTYCHI_PRESETS), batch_size or num_batch
    (minibatches per epoch), batching (random / uniform / compact), data_on_device,
    object_step (None: 0.2 scaled to the batch, see ptychi_settings), probe_step (0.2),
    object_alpha / probe_alpha (0.1), probe_start (1), update_probe (True), seed (0), threads
    (torch CPU threads); (Tike): num_batch (10), batch_method, alpha (0.05), update_probe.
    Positions are kept fixed so the geometry stays the one labels and stitching use. The
    settings used are in the file's ``settings`` attribute (JSON).
    """
    from ptychostream.scanfile import read_scan

    from .labels import align_phase

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    unknown = set(options) - OPTIONS[engine]
    if unknown:
        raise TypeError(f"unknown {engine} option(s) {sorted(unknown)}; known: {sorted(OPTIONS[engine])}")
    scan = read_scan(scan_path)
    _check_scan(scan, probe_modes, iterations)
    device = _default_device(device, engine)
    if options.get("threads"):
        import torch

        torch.set_num_threads(int(options["threads"]))
    n = scan.frame_size
    dx = scan.object_pixel_size_m
    shape, origin = map_geometry(scan.positions_m, dx, n, margin_px=MARGIN_PX)
    probe0 = initial_probe(scan, probe_modes, engine)
    log.info(
        "reconstructing %s: %d frames, object %dx%d, %s rPIE, %d iterations, %d probe mode(s), %s",
        scan.scan_id, scan.n_frames, *shape, engine, iterations, probe_modes, device,
    )
    t0 = time.perf_counter()
    run = _run_ptychi if engine == "ptychi" else _run_tike
    obj, probe, settings = run(scan, probe0, shape, origin, iterations, device, options)
    seconds = time.perf_counter() - t0
    if not (np.all(np.isfinite(obj)) and np.all(np.isfinite(probe))):
        raise ReconstructionError(
            f"{engine} rPIE diverged on {scan.scan_id} (NaN in the result); "
            "lower object_step / probe_step or batch_size"
        )
    illum = illumination_map(probe, scan.positions_m, origin, dx, shape)
    mask = illum >= ILLUMINATION_THRESHOLD * illum.max()
    amplitude = float(np.median(np.abs(obj[mask])))
    if not 0.02 < amplitude < 50.0:  # a transmission object has |O| ~ 1; far off means divergence
        raise ReconstructionError(
            f"{engine} rPIE diverged on {scan.scan_id} (median object amplitude {amplitude:.3g}); "
            "lower object_step or batch_size"
        )
    phase, alignment = align_phase(obj, mask)
    obj, probe = move_ramp_to_probe(obj, probe, alignment["ramp"])
    recon_id = f"{scan.scan_id}-{engine}-{uuid.uuid4().hex[:8]}"
    rate = scan.n_frames * iterations / seconds
    log.info("reconstructed %s in %.1f s (%.0f frame-iterations/s) -> %s", scan.scan_id, seconds, rate, recon_id)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    import h5py

    tmp = out.with_name(out.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({
            "ptychostream_recon_format": RECON_FORMAT, "recon_id": recon_id,
            "scan_id": scan.scan_id, "scan_path": str(scan_path), "engine": engine,
            "iterations": int(iterations), "probe_modes": int(probe_modes), "device": device,
            "seconds": float(seconds), "n_frames": int(scan.n_frames),
            "pixel_size_m": float(dx), "origin_m": np.asarray(origin, np.float64),
            "energy_ev": float(scan.energy_ev), "created": time.time(),
            # the ramp found in the object, moved into the probe (geometry.move_ramp_to_probe)
            "phase_offset_rad": alignment["offset"], "phase_ramp_rad_per_px": alignment["ramp"],
            "phase_sign": alignment["sign"], "phase_background": alignment["background"],
            "settings": json.dumps(settings),
        })
        f.create_dataset("object", data=obj.astype(np.complex64), compression="gzip")
        f.create_dataset("phase", data=phase.astype(np.float32), compression="gzip")
        f.create_dataset("probe", data=probe.astype(np.complex64))
        f.create_dataset("illumination", data=illum, compression="gzip")
        f.create_dataset("positions_m", data=np.asarray(scan.positions_m, np.float64))
    tmp.replace(out)  # readers never see a half-written file
    return str(out)


def read_reconstruction(path: str | Path) -> Reconstruction:
    """Read a file written by :func:`reconstruct`; raises ReconstructionError if it is not one."""
    from ptychostream.scanfile import open_hdf5

    path = Path(path)
    with open_hdf5(path, "reconstruction file", ReconstructionError) as f:
        missing = [k for k in ("object", "phase", "probe", "illumination", "positions_m") if k not in f]
        missing += [k for k in ("recon_id", "pixel_size_m", "origin_m") if k not in f.attrs]
        if missing:
            raise ReconstructionError(f"{path} is not a ptychostream reconstruction; lacks {missing}")
        a = dict(f.attrs)
        origin = np.asarray(a["origin_m"], float)
        return Reconstruction(
            object=f["object"][()], phase=f["phase"][()], probe=f["probe"][()],
            illumination=f["illumination"][()], positions_m=f["positions_m"][()],
            pixel_size_m=float(a["pixel_size_m"]), origin_m=(float(origin[0]), float(origin[1])),
            iterations=int(a.get("iterations", 0)), engine=str(a.get("engine", "")),
            seconds=float(a.get("seconds", 0.0)), recon_id=str(a["recon_id"]),
            scan_id=str(a.get("scan_id", "")), scan_path=str(a.get("scan_path", "")), attrs=a,
        )


def reconstruct_many(scan_paths: list[str], out_dir: str, workers: int = 2, **kwargs) -> list[str]:
    """Reconstruct several scans at once, one process each (``workers`` at a time), sharing a GPU.

    Why it raises throughput: pty-chi on a GPU is bound by the Python and kernel-launch work of its
    process (each minibatch is hundreds of small kernels and a dozen host synchronisations), so
    the GPU idles between them; several processes fill those gaps until the GPU itself is busy.
    With the CUDA MPS daemon running (``nvidia-cuda-mps-control -d``) their kernels also run side
    by side. Each worker holds its own CUDA context (~0.5 GB). On an endpoint the same pattern is
    ``max_workers_per_node: N`` with ``available_accelerators`` naming one GPU N times
    (docs/hpc.md). ``kwargs`` go to :func:`reconstruct`; returns the reconstruction paths in
    the order of ``scan_paths`` (``out_dir/<scan stem>.recon.h5``)."""
    import concurrent.futures
    import multiprocessing

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = [str(out / f"{Path(p).stem}.recon.h5") for p in scan_paths]
    if len(set(targets)) != len(targets):
        raise ValueError("scan files must have distinct names (their reconstructions share out_dir)")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited CUDA or threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        futures = [ex.submit(reconstruct, str(p), t, **kwargs) for p, t in zip(scan_paths, targets, strict=True)]
        return [f.result() for f in futures]
