"""Ophyd devices for streaming ptychography: a spiral stage, a simulated detector, the edge IOC.

* :class:`SimSpiralStage` / :class:`EpicsSpiralStage`: two axes ``x`` and ``y``. The simulated
  axes behave like ``EpicsMotor`` (``position``, ``limits``, ``check_value``, ``egu``), so a plan
  written for one runs on the other; real motors are chosen by PV name.
* :class:`SimPtychoDetector`: computes each frame from the stage position with the core forward
  model, publishes it over pvAccess as an NTNDArray (as an areaDetector PVA plugin does) and
  writes the scan file when unstaged.
* :class:`EdgeIOC`: the IOC's scalar PVs over Channel Access (built from the one PV table in
  :mod:`ptychostream.pvnames`) plus the pvAccess-only writes: model deployment and planned
  positions.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, EpicsMotor, EpicsSignal, EpicsSignalRO, Signal
from ophyd import FormattedComponent as FCpt
from ophyd.areadetector.base import EpicsSignalWithRBV
from ophyd.device import create_device_from_components
from ophyd.sim import SynAxis
from ophyd.status import DeviceStatus, Status
from ophyd.utils import LimitError

from ptychostream.geometry import crop_at, map_geometry
from ptychostream.pvnames import PVS, pvname
from ptychostream.scanfile import ScanData, median_step, write_scan
from ptychostream.simulation import (
    ExperimentConfig,
    frames_at,
    make_probe,
    make_sample,
    transmission,
)

log = logging.getLogger(__name__)

#: motor engineering units -> motor units per metre (plans think in metres, motors do not)
UNITS_PER_M = {"m": 1.0, "mm": 1e3, "um": 1e6, "µm": 1e6, "micron": 1e6, "nm": 1e9}


# --------------------------------------------------------------------------- stage
class SimMotor(SynAxis):
    """A simulated axis with soft limits, checked like an ``EpicsMotor``'s (``check_value``).

    ``limits`` are in the axis' own units ``egu``; ``precision`` (decimals) and ``egu`` reach
    the event descriptors, so the live table shows positions as an EPICS motor's would."""

    def __init__(self, *, name: str, limits: tuple[float, float] = (-20.0, 20.0),
                 egu: str = "um", precision: int = 3, **kwargs) -> None:
        super().__init__(name=name, egu=egu, precision=precision, **kwargs)
        self._limits = (float(limits[0]), float(limits[1]))

    def describe(self) -> dict:
        desc = super().describe()
        for key in desc:
            desc[key].setdefault("units", self.egu)
            desc[key].setdefault("precision", self.precision)
        return desc

    @property
    def limits(self) -> tuple[float, float]:
        return self._limits

    @property
    def low_limit(self) -> float:
        return self._limits[0]

    @property
    def high_limit(self) -> float:
        return self._limits[1]

    def check_value(self, value: float) -> None:
        """Raise LimitError for a target outside the soft limits (as EpicsMotor does)."""
        low, high = self._limits
        if value is None or not np.isfinite(value):
            raise ValueError(f"{self.name}: target {value!r} is not a number")
        if low < high and not (low <= value <= high):
            raise LimitError(f"{self.name}: {value:g} {self.egu} is outside the limits "
                             f"[{low:g}, {high:g}] {self.egu}")

    def set(self, value: float):  # noqa: A003  (ophyd's name)
        self.check_value(value)
        return super().set(value)


class _StageMixin:
    """What plans and the simulated detector need from any two-axis stage."""

    x: SimMotor | EpicsMotor
    y: SimMotor | EpicsMotor

    def units_per_m(self) -> float:
        """Motor units per metre, from the x axis' engineering units (cached)."""
        cached = getattr(self, "_units_per_m", None)
        if cached is None:
            egu = str(self.x.egu or "m").strip()
            if egu not in UNITS_PER_M:
                raise ValueError(f"{self.x.name}: unknown motor units {egu!r}; "
                                 f"expected one of {', '.join(UNITS_PER_M)}")
            cached = self._units_per_m = UNITS_PER_M[egu]
        return cached

    def position_m(self) -> tuple[float, float]:
        """Current beam position (x, y) in metres, from the axes' readbacks."""
        scale = self.units_per_m()
        return float(self.x.position) / scale, float(self.y.position) / scale


class SimSpiralStage(_StageMixin, Device):
    """Two simulated axes in micrometres (precision 1 nm), as a nanoprobe's piezo stage reads.

    ``limits`` (m, like every length a plan takes): +-20 um by default."""

    x = Cpt(SimMotor)
    y = Cpt(SimMotor)

    def __init__(self, *, name: str = "stage", limits: tuple[float, float] | None = None,
                 **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        if limits is not None:
            scale = self.units_per_m()
            self.x._limits = self.y._limits = (float(limits[0]) * scale,
                                               float(limits[1]) * scale)


class EpicsSpiralStage(_StageMixin, Device):
    """Two real EPICS motor records, e.g. ``EpicsSpiralStage("2IDD:m1", "2IDD:m2")``."""

    x = FCpt(EpicsMotor, "{x_pv}")
    y = FCpt(EpicsMotor, "{y_pv}")

    def __init__(self, x_pv: str, y_pv: str, *, name: str = "stage", **kwargs) -> None:
        self.x_pv, self.y_pv = x_pv, y_pv
        super().__init__("", name=name, **kwargs)


# --------------------------------------------------------------------------- detector
class SimPtychoDetector(Device):
    """Simulated ptychography detector: one diffraction frame per trigger at the stage position.

    Each frame is published on ``pv_name`` as an NTNDArray with attributes PosX, PosY (m) and
    PixelSize (object pixel, m), uniqueIds counting up across scans as an areaDetector's do.
    On unstage the frames, positions, metadata and the ground truth are written to
    ``file_path`` (HDF5, :mod:`ptychostream.scanfile`). ``det_total_counts`` is the hinted
    field: over a scan's two position axes the live plot is a transmission map. The sample (``sample_kind``,
    ``sample_seed``, ``sample_text``) is configuration, so a plan can move to unseen features.
    Features fill ``field_of_view_m`` square around the origin; size it to the scans.
    """

    unique_id = Cpt(Signal, value=0, kind="normal")
    total_counts = Cpt(Signal, value=0.0, kind="hinted")  # the live plot: a transmission map
    pos_x = Cpt(Signal, value=0.0, kind="normal")
    pos_y = Cpt(Signal, value=0.0, kind="normal")
    acquire_time = Cpt(Signal, value=0.4, kind="config")
    flux = Cpt(Signal, value=2.5e5, kind="config")
    sample_kind = Cpt(Signal, value="train", kind="config")
    sample_seed = Cpt(Signal, value=0, kind="config")
    sample_text = Cpt(Signal, value="", kind="config")  # 'test' samples: the letters ('' default)
    scan_id = Cpt(Signal, value="", kind="config")
    file_path = Cpt(Signal, value="", kind="config")
    pv_name = Cpt(Signal, value="", kind="config")

    def __init__(self, *, name: str = "det", stage: _StageMixin, pv_name: str,
                 write_dir: str | Path = ".", field_of_view_m: float = 3e-6,
                 config: ExperimentConfig | None = None, noise: bool = True, seed: int = 0,
                 **kwargs) -> None:
        if not field_of_view_m > 0:
            raise ValueError(f"field_of_view_m must be a positive length, got {field_of_view_m!r}")
        if not hasattr(stage, "position_m"):
            raise TypeError(f"stage {stage!r} has no position_m(): use SimSpiralStage or "
                            "EpicsSpiralStage")
        super().__init__(name=name, **kwargs)
        self.positioner = stage
        self.write_dir = Path(write_dir)
        self.field_of_view_m = float(field_of_view_m)
        self.cfg = config or ExperimentConfig()
        self.noise = noise
        self._rng = np.random.default_rng(seed)
        self.pv_name.put(pv_name)
        self.acquire_time.put(self.cfg.exposure_s)
        self.flux.put(self.cfg.flux_ph_per_s)
        self.sample_kind.put(self.cfg.sample_kind)
        self.sample_seed.put(self.cfg.seed)
        self.pixel_m = self.cfg.object_pixel_m
        self.probe = make_probe(self.cfg.frame_size, self.pixel_m, self.cfg.energy_ev,
                                self.cfg.beam_fwhm_m)
        self._publisher = None
        self._sample_key: tuple | None = None
        self._next_uid = 1
        self._frames: list[np.ndarray] = []
        self._positions: list[tuple[float, float]] = []
        self._uids: list[int] = []
        self.last_scan_path: Path | None = None

    # -- the sample
    def _ensure_sample(self) -> None:
        key = (self.sample_kind.get(), int(self.sample_seed.get()), self.field_of_view_m,
               str(self.sample_text.get()))
        if key == self._sample_key:
            return
        half = self.field_of_view_m / 2
        corners = np.array([[-half, -half], [half, half]])
        shape, self.origin_m = map_geometry(corners, self.pixel_m, self.cfg.frame_size, margin_px=8)
        log.info("%s: new %s sample (seed %d), %dx%d px", self.name, key[0], key[1], *shape)
        # features fill the field of view; around it (what only the frames' edges see) is flat
        n_in = int(round(self.field_of_view_m / self.pixel_m))
        r0 = int(round((-half - self.origin_m[1]) / self.pixel_m))
        c0 = int(round((-half - self.origin_m[0]) / self.pixel_m))
        self.phase = np.zeros(shape, np.float32)
        self.phase[r0:r0 + n_in, c0:c0 + n_in] = make_sample(
            (n_in, n_in), self.pixel_m, key[0], self.cfg.phase_max, self.cfg.feature_m,
            seed=key[1], **({"text": key[3]} if key[3] else {}))
        self._obj = transmission(self.phase, self.cfg.energy_ev)  # the film absorbs too
        self._sample_key = key

    def open(self) -> None:
        """Start serving the frame PV (empty until the first frame), so that monitors connect
        before the scan starts and miss nothing. stage() does it if nobody did."""
        if self._publisher is None:
            from ptychostream.ioc.sim_detector import FramePublisher

            self._publisher = FramePublisher(self.pv_name.get(), open_empty=True)

    def has_subscriber(self) -> bool:
        """Whether any client (the IOC) monitors the frame PV: frames sent before would be lost."""
        return self._publisher is not None and self._publisher.subscribed

    def next_unique_ids(self, n: int) -> np.ndarray:
        """The uniqueIds of the next ``n`` frames (planned positions are matched by them)."""
        return np.arange(self._next_uid, self._next_uid + int(n), dtype=np.int64)

    # -- ophyd protocol
    def stage(self):
        self._ensure_sample()
        self.open()
        self._frames, self._positions, self._uids = [], [], []
        return super().stage()

    def trigger(self) -> DeviceStatus:
        """Expose at the current stage position, publish the frame, store it for the file."""
        status = DeviceStatus(self)
        try:
            self._ensure_sample()
            pos = self.positioner.position_m()
            photons = float(self.flux.get()) * float(self.acquire_time.get())
            frame = frames_at(self._obj, self.origin_m, self.pixel_m, self.probe,
                              np.array([pos]), photons, self._rng if self.noise else None)[0]
            uid = self._next_uid
            self._next_uid += 1
            if self._publisher is not None:
                self._publisher.publish(frame, uid, {"PosX": pos[0], "PosY": pos[1],
                                                     "PixelSize": self.pixel_m,
                                                     "ScanId": str(self.scan_id.get())})
            self._frames.append(frame)
            self._positions.append(pos)
            self._uids.append(uid)
            self.unique_id.put(uid)
            self.total_counts.put(float(frame.sum()))
            self.pos_x.put(pos[0])
            self.pos_y.put(pos[1])
        except Exception as exc:  # a failed exposure fails the status, not the RunEngine thread
            status.set_exception(exc)
            return status
        status.set_finished()
        return status

    def unstage(self):
        result = super().unstage()
        if self._frames:
            self.last_scan_path = self.write_file()
        return result

    def write_file(self) -> Path:
        """Write the frames taken since stage() to ``file_path`` (default write_dir/scan_id.h5)."""
        scan_id = str(self.scan_id.get()) or f"scan-{self._uids[0]}"
        path = Path(self.file_path.get() or self.write_dir / f"{scan_id}.h5")
        positions = np.asarray(self._positions, np.float64)
        n = self.cfg.frame_size
        scan = ScanData(
            frames=np.stack(self._frames), positions_m=positions, energy_ev=self.cfg.energy_ev,
            detector_distance_m=self.cfg.detector_distance_m,
            detector_pixel_size_m=self.cfg.detector_pixel_m, object_pixel_size_m=self.pixel_m,
            step_m=median_step(positions), exposure_s=float(self.acquire_time.get()),
            scan_id=scan_id, beam_fwhm_m=self.cfg.beam_fwhm_m,
            unique_ids=np.asarray(self._uids, np.int64), probe=self.probe,
            truth_phase=self.phase, truth_origin_m=self.origin_m,
            truth_crops=crop_at(self.phase, positions, self.origin_m, self.pixel_m, n),
            metadata={"sample_kind": str(self.sample_kind.get()),
                      "sample_seed": int(self.sample_seed.get()),
                      "photons_per_frame": float(self.flux.get()) * float(self.acquire_time.get())},
        )
        return write_scan(path, scan)

    def close(self) -> None:
        """Stop publishing (the PV disconnects)."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None


# --------------------------------------------------------------------------- edge IOC
class ActionSignal(Signal):
    """A pvAccess-only write (model bytes, a position table) done by a method of the root device
    in a worker thread; ``set`` returns a Status, so plans wait on it as on a motor move."""

    def __init__(self, *, action: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._action = action

    def set(self, value, **kwargs) -> Status:  # noqa: A003  (ophyd's name)
        status = Status(self)

        def work() -> None:
            try:
                getattr(self.root, self._action)(value)
            except Exception as exc:
                log.error("%s failed: %s", self.name, exc)
                status.set_exception(exc)
            else:
                status.set_finished()

        threading.Thread(target=work, name=self.name, daemon=True).start()
        return status

    def put(self, value, **kwargs) -> None:
        self.set(value).wait()


def _snake(camel: str) -> str:
    """'ModelVersion' -> 'model_version', 'SSIM' -> 'ssim'."""
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", camel).lower()


#: readbacks shown in the live table and plots
_HINTED = {"NN:ModelVersion_RBV", "QA:SSIM"}


def _group_components(group: str) -> dict[str, Cpt]:
    """Channel Access components for every scalar PV of ``group`` in the PV table.

    areaDetector style: a setting X with a readback X_RBV becomes one EpicsSignalWithRBV."""
    comps: dict[str, Cpt] = {}
    for suffix, spec in PVS.items():
        g, _, tail = suffix.partition(":")
        if g != group or not spec.ca:
            continue
        base = tail.removesuffix("_RBV")
        attr = _snake(base)
        if attr in comps:
            continue
        string = spec.kind in ("str", "enum")
        kind = "hinted" if suffix in _HINTED else ("config" if spec.writable else "normal")
        setting, readback = f"{g}:{base}", f"{g}:{base}_RBV"
        # writes complete when the IOC has taken them (put callback), not when the readback
        # matches: a command such as Stitch:Reset reads back 0 after the reset is done
        if setting in PVS and readback in PVS:
            comps[attr] = Cpt(EpicsSignalWithRBV, base, string=string, kind="normal",
                              put_complete=True)
        elif spec.writable:
            comps[attr] = Cpt(EpicsSignal, tail, string=string, kind=kind, put_complete=True)
        else:
            comps[attr] = Cpt(EpicsSignalRO, tail, string=string, kind=kind)
    return comps


def _group_class(group: str, **extra: Cpt) -> type[Device]:
    return create_device_from_components(
        f"EdgeIOC{group}", docstring=f"The {group} PVs of the edge IOC (see pvnames.PVS).",
        **_group_components(group), **extra,
    )


NNGroup = _group_class("NN", model=Cpt(ActionSignal, action="_deploy", kind="omitted"))
StitchGroup = _group_class(
    "Stitch", positions=Cpt(ActionSignal, action="_put_positions", kind="omitted"),
    probe=Cpt(ActionSignal, action="_put_probe", kind="omitted"),
)
QAGroup = _group_class("QA")


class EdgeIOC(Device):
    """The edge IOC as an ophyd device: scalars over Channel Access, model and positions over
    pvAccess (``ioc.nn.model.set(path_or_bytes)``, ``ioc.stitch.positions.set(xy_m)``).

    Every PV name is the table's (:data:`ptychostream.pvnames.PVS`) under ``prefix``.
    """

    nn = Cpt(NNGroup, "NN:")
    stitch = Cpt(StitchGroup, "Stitch:")
    qa = Cpt(QAGroup, "QA:")

    def __init__(self, prefix: str, *, name: str = "ioc", deploy_timeout: float = 60.0,
                 **kwargs) -> None:
        super().__init__(prefix, name=name, **kwargs)
        self.deploy_timeout = deploy_timeout
        self.last_deployed: int | None = None

    # -- pvAccess actions (also usable directly from IPython)
    def deploy(self, model: str | Path | bytes, name: str = "") -> int:
        """Deploy a model file or bytes (ONNX or PyTorch state dict); returns the new version.

        Raises ``ptychostream.model.ModelError`` with the IOC's reason if it refuses the model."""
        from ptychostream.ioc.client import deploy_model

        if isinstance(model, str | Path):
            name = name or Path(model).name
            model = Path(model).read_bytes()
        self.last_deployed = deploy_model(self.prefix, bytes(model), name=name,
                                          timeout=self.deploy_timeout)
        return self.last_deployed

    def _deploy(self, value) -> None:
        if isinstance(value, tuple):  # (model, name)
            self.deploy(*value)
        else:
            self.deploy(value)

    def deploy_probe(self, probe, name: str = "") -> str:
        """Send a probe to the IOC's live refinement: a reconstruction or scan file, a ``.npy``
        or an array (read here; only the probe travels, as ``.npy`` bytes). Returns the IOC's
        ``Stitch:ProbeStatus_RBV``; raises ``ptychostream.refine.ProbeError`` if it refuses
        (the IOC validates it, and says why on its status PV)."""
        import io

        from ptychostream.ioc.client import deploy_probe
        from ptychostream.refine import read_probe

        array, source = read_probe(probe)
        buf = io.BytesIO()
        np.save(buf, array)
        return deploy_probe(self.prefix, buf.getvalue(), name=name or source,
                            timeout=self.deploy_timeout)

    def _put_probe(self, value) -> None:
        if isinstance(value, tuple):  # (probe, name)
            self.deploy_probe(*value)
        else:
            self.deploy_probe(value)

    def _put_positions(self, positions_m) -> None:
        from ptychostream.ioc.client import put_positions

        uids = getattr(positions_m, "unique_ids", None)  # plans.PositionTable carries them
        put_positions(self.prefix, np.asarray(positions_m, np.float64), unique_ids=uids)

    def stitched(self) -> np.ndarray:
        """The live stitched map (NaN where nothing was stitched); ``.attrib`` has its origin."""
        from ptychostream.ioc.client import get_stitched

        return get_stitched(self.prefix)

    def pv(self, suffix: str) -> str:
        """Full name of a PV of the table under this IOC's prefix."""
        return pvname(self.prefix, suffix)
