"""Map plugin: phase images and frames placed at their beam positions on one live map.

Two maps on one grid (:class:`ptychostream.stitch.Canvas`):

* the network's phases stitched (:class:`ptychostream.stitch.Stitcher`, the class every offline
  stitch uses, so the live map equals an offline stitch of the same images), each image
  weighted by the region its frame informs and its constant offset registered to the map;
* when a probe is known, the complex object refined frame by frame against the measured
  intensities (:class:`ptychostream.refine.Refiner`), seeded by the network's phase where the
  map has not seen the sample yet, and re-visited when the stream leaves time: a few passes
  while frames still arrive, up to ``Stitch:MaxPasses`` once the stream pauses.

The map shown (``image()``) is the refined one when refinement runs, else the stitched one.
A frame's position comes from its PosX/PosY attributes; without them, from the planned
positions (``set_positions``): by uniqueId when the plan lists them, else by arrival order
counted from the map's first uniqueId, so a lost frame does not shift the rest. A frame far
outside the planned scan, or so far away that the map would pass its size bound, is refused
alone. The map pixel size comes from the frame's PixelSize attribute, else from ``pixel_m``.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ptychostream.batch import FrameBatch
from ptychostream.ntndarray import Frame
from ptychostream.stitch import (
    DEFAULT_REGISTER_OFFSETS,
    MAX_MAP_PX,
    WEIGHTINGS,
    Stitcher,
    frame_weights,
)

log = logging.getLogger(__name__)

#: frames may lie this many frame widths outside the planned scan's extent
PLAN_MARGIN_FRAMES = 1.0
#: frames whose pixel size differs from the map's by more than this fraction are refused
PIXEL_TOLERANCE = 0.01
#: frames waiting for inference past which the map stage defers refinement (seeds the map and
#: keeps the frames, refines them when inference has caught up): on 2 cores, refining every
#: frame of a saturated stream cost inference 18 % of its rate (bench_pipeline.py --sections
#: refine: on/off 0.82)
DEFER_BACKLOG = 32
#: the stream counts as paused (idle passes may go on to Stitch:MaxPasses, beyond
#: refine.LIVE_MAX_PASSES) as soon as every planned position has its frame, or once no frame
#: came for this many of its usual gaps between batches, and at least SETTLE_MIN_S; while a
#: planned scan is still short of frames, at least SETTLE_PLAN_S (a fly scan's turnaround is
#: no pause; a scan that lost frames or was stopped still settles)
SETTLE_GAPS = 4.0
SETTLE_MIN_S = 0.5
SETTLE_PLAN_S = 5.0


class StitchingPlugin:
    """The live map (see module docstring). ``process`` returns the frames it placed."""

    name = "Stitch"

    def __init__(self, pixel_m: float = 0.0, crop: int | None = None, weighting: str = "probe",
                 beam_fwhm_m: float = 800e-9, register_offsets: bool = DEFAULT_REGISTER_OFFSETS,
                 refine: bool = True, alpha: float | None = None,
                 probe_step: float | None = None, seed: str | None = None, device: str = "cpu",
                 history: int = 2048, max_passes: float | None = None, max_px: int = MAX_MAP_PX,
                 idle_gate=None, backlog=None) -> None:
        from ptychostream import refine as _refine

        self.pixel_m = float(pixel_m)
        self.crop = crop
        self.weighting = weighting if not crop or weighting != "probe" else "crop"
        self.beam_fwhm_m = float(beam_fwhm_m)
        self.register_offsets = bool(register_offsets)
        self.refine = bool(refine)
        self.alpha = _refine.DEFAULT_ALPHA if alpha is None else float(alpha)
        self.probe_step = _refine.DEFAULT_PROBE_STEP if probe_step is None else float(probe_step)
        self.seed = seed or _refine.DEFAULT_SEED
        self.device = device
        self.history = int(history)
        self.max_passes = _refine.DEFAULT_MAX_PASSES if max_passes is None else float(max_passes)
        self.max_px = int(max_px)
        self.idle_gate = idle_gate  # callable: may idle work run now (e.g. inference is idle)?
        self.backlog = backlog  # callable: frames waiting for inference (the stage before)
        self._lock = threading.RLock()
        self._planned: np.ndarray | None = None
        self._planned_index: dict[int, int] = {}
        self._plan_box: tuple[float, float, float, float] | None = None
        self._probe: np.ndarray | None = None
        self.probe_source = ""
        self._stitcher: Stitcher | None = None
        self._refiner = None
        self._first_uid: int | None = None
        self._order_rows = 0
        self.clock = time.monotonic  # for the stream's pauses (a test may move it on)
        self._last_batch: float | None = None  # clock() when the last frames were placed
        self._gap = 0.0  # running mean of the time between batches placed
        self.version = 0  # bumps at every change of the map, so hosts republish only when needed

    # ------------------------------------------------------------------ control
    def set_positions(self, positions_m: np.ndarray | None,
                      unique_ids: np.ndarray | None = None) -> None:
        """Plan a scan: the next map is sized for these (N, 2) x, y positions (m)."""
        with self._lock:
            if positions_m is None or len(positions_m) == 0:
                self._planned, self._planned_index, self._plan_box = None, {}, None
            else:
                pos = np.asarray(positions_m, np.float64).reshape(-1, 2)
                if not np.isfinite(pos).all():
                    raise ValueError("planned positions must be finite")
                if unique_ids is not None and len(unique_ids):
                    if len(unique_ids) != len(pos):
                        raise ValueError(f"{len(unique_ids)} uniqueIds for {len(pos)} positions")
                    self._planned_index = {int(u): i for i, u in enumerate(unique_ids)}
                else:
                    self._planned_index = {}
                self._planned = pos
                self._plan_box = (pos[:, 0].min(), pos[:, 0].max(), pos[:, 1].min(),
                                  pos[:, 1].max())
            self.reset()

    def reset(self) -> None:
        """Start a new map (keeps the plan and the probe, as learnt so far)."""
        with self._lock:
            if self._refiner is not None:
                self._probe = self._refiner.probe
            self._stitcher = None
            self._refiner = None
            self._first_uid = None
            self._order_rows = 0
            self._last_batch, self._gap = None, 0.0
            self.version += 1

    def set_probe(self, probe, source: str = "") -> np.ndarray:
        """A new probe for refinement (checked: raises ProbeError); the map starts anew."""
        from ptychostream.refine import check_probe

        p = check_probe(probe)
        with self._lock:
            pixel = self._stitcher.pixel_m if self._stitcher is not None else None
            if self._stitcher is not None and p.shape[-1] != self._stitcher.frame_size:
                raise ValueError(f"probe is {p.shape[-1]} px, frames are "
                                 f"{self._stitcher.frame_size} px")
            self._probe = p
            self.probe_source = source or "given"
            self._refiner = None
            if self._stitcher is not None and self.weighting == "probe":
                self._stitcher.set_weights(frame_weights(p.shape[-1], pixel, "probe",
                                                         probe=p))
            self.version += 1
        return p

    def configure(self, **settings) -> None:
        """Change settings (alpha, probe_step, seed, weighting, crop, beam_fwhm_m,
        register_offsets, refine); those that shape the map start a new one."""
        with self._lock:
            restart = False
            for key, value in settings.items():
                if not hasattr(self, key):
                    raise AttributeError(f"no setting {key!r}")
                if key == "weighting" and value not in WEIGHTINGS:
                    raise ValueError(f"weighting must be one of {WEIGHTINGS}")
                if getattr(self, key) != value:
                    restart |= key in ("weighting", "crop", "beam_fwhm_m", "refine",
                                       "register_offsets")
                    setattr(self, key, value)
            r = self._refiner
            if r is not None:
                r.alpha, r.probe_step = self.alpha, self.probe_step
                r.seed = self.seed
            if restart:
                self.reset()

    @property
    def refining(self) -> bool:
        return self.refine and self._probe is not None

    @property
    def n_frames(self) -> int:
        r, s = self._refiner, self._stitcher
        return max(r.n_frames if r is not None else 0, s.n_frames if s is not None else 0)

    @property
    def passes(self) -> float:
        r = self._refiner
        return r.passes if r is not None else 0.0

    def probe_status(self) -> str:
        """Which probe refines the map and where it came from."""
        if self._probe is None:
            return "No probe: the map shows the network's phases only"
        r = self._refiner
        probe = self._probe if r is None else r.probe
        modes = f"{probe.shape[0]} mode{'s' if probe.shape[0] > 1 else ''}"
        state = "refinement off" if not self.refine else (
            f"refined {r.probe_updates} times on this map" if r is not None and r.probe_updates
            else "as given")
        return f"Probe from {self.probe_source} ({modes}, {probe.shape[-1]} px), {state}"

    # ------------------------------------------------------------------ frames
    def _resolve(self, batch: FrameBatch) -> FrameBatch:
        """Fill in positions from the plan and pixel sizes; drop frames that have neither."""
        pos = batch.positions.copy()
        need = ~np.isfinite(pos).all(axis=1)
        if need.any():
            if self._planned is None:
                batch = batch.drop(need, "no PosX/PosY attributes and no Stitch:Positions table")
                pos, need = batch.positions.copy(), np.zeros(len(batch), bool)
            else:
                rows = np.full(len(batch), -1)
                for i in np.nonzero(need)[0]:
                    uid = int(batch.unique_ids[i])
                    if self._planned_index:
                        rows[i] = self._planned_index.get(uid, -1)
                    else:  # arrival order, counted from the map's first uniqueId: gaps skip rows
                        if self._first_uid is None or uid < self._first_uid:
                            self._first_uid = uid - self._order_rows
                        rows[i] = uid - self._first_uid
                        self._order_rows = max(self._order_rows, rows[i] + 1)
                bad = need & ((rows < 0) | (rows >= len(self._planned)))
                if bad.any():
                    why = ("uniqueId not in Stitch:Positions" if self._planned_index else
                           f"more frames than the {len(self._planned)} planned positions")
                    batch = batch.drop(bad, why)
                    rows, need, pos = rows[~bad], need[~bad], pos[~bad]
                pos[need] = self._planned[rows[need]]
        pix = np.where(batch.pixel_size > 0, batch.pixel_size, self.pixel_m)
        batch = FrameBatch(batch.data, batch.unique_ids, batch.timestamps, pos, pix,
                           batch.extra, batch.phase, batch.model_version, batch.model_name,
                           batch.problems, batch.skipped, batch.frames)
        batch = batch.drop(~(pix > 0), "no PixelSize attribute and Stitch:PixelSize is 0")
        if self._plan_box is not None and len(batch):
            x0, x1, y0, y1 = self._plan_box
            m = PLAN_MARGIN_FRAMES * batch.data.shape[-1] * batch.pixel_size
            p = batch.positions
            far = (p[:, 0] < x0 - m) | (p[:, 0] > x1 + m) | (p[:, 1] < y0 - m) | (p[:, 1] > y1 + m)
            batch = batch.drop(far, "position far outside the planned scan")
        return batch

    def _start_map(self, pixel: float, frame_size: int) -> None:
        """The first frame of a map fixes its pixel and frame size."""
        probe = self._probe if self._probe is not None and self._probe.shape[-1] == frame_size \
            else None
        self._stitcher = Stitcher(pixel, frame_size, crop=self.crop or None,
                                  positions_m=self._planned, weighting=self.weighting,
                                  probe=probe if self.weighting == "probe" else None,
                                  beam_fwhm_m=self.beam_fwhm_m,
                                  register_offsets=self.register_offsets, device=self.device,
                                  max_px=self.max_px)

    def _start_refiner(self) -> None:
        from ptychostream.refine import Refiner

        s = self._stitcher
        self._refiner = Refiner(self._probe, s.pixel_m, alpha=self.alpha,
                                probe_step=self.probe_step, seed=self.seed,
                                positions_m=self._planned, device=self.device,
                                history=self.history, max_px=self.max_px)

    def process(self, batch: FrameBatch) -> FrameBatch:
        out = self._process(batch)
        refused = len(batch) - len(out)
        if refused > 2 and 0 < self.n_frames - len(out) < 4 and not len(out):
            # a stray first frame anchored the map far from the scan: start again from this batch
            log.warning("%s: map restarted: its first frame lies far from the frames that follow",
                        self.name)
            self.reset()
            out = self._process(batch)
        return out

    def _process(self, batch: FrameBatch) -> FrameBatch:
        with self._lock:
            if batch.phase is None and not (self.refining and batch.frames):
                return batch.drop(np.ones(len(batch), bool),
                                  "no model serving and no probe to refine with",
                                  malformed=False)
            batch = self._resolve(batch)
            if not len(batch):
                return batch
            n = batch.data.shape[-1]
            if self._stitcher is None:
                self._start_map(float(batch.pixel_size[0]), n)
            s = self._stitcher
            if n != s.frame_size:
                return batch.drop(np.ones(len(batch), bool),
                                  f"frame size {n} differs from the map's {s.frame_size}")
            off = np.abs(batch.pixel_size - s.pixel_m) > PIXEL_TOLERANCE * s.pixel_m
            batch = batch.drop(off, f"pixel size differs from the map's {s.pixel_m * 1e9:.2f} nm")
            if not len(batch):
                return batch
            placed = np.zeros(len(batch), bool)
            why = "beyond the map's size bound"
            refine = self.refining and batch.frames and self._probe.shape[-1] == n
            if batch.phase is not None and not refine:
                # while the refined map is shown the network's phases only seed it: stitching
                # them too cost the map stage as much again (Refine off starts a stitched map)
                placed |= s.add_batch(batch.phase, batch.positions)
            if refine:
                if self._refiner is None:
                    self._start_refiner()
                seed = batch.phase if self.seed != "none" else None
                r = self._refiner
                dark, nonfinite = r.n_dark, r.n_nonfinite
                # inference behind the stream: seed and keep the frames, refine them when it has
                # caught up, so the map stage never holds inference back
                defer = self.backlog is not None and self.backlog() > DEFER_BACKLOG
                placed |= r.update(batch.data, batch.positions, seed_phase=seed, defer=defer)
                why = (f"not refined ({r.n_dark - dark} dark, {r.n_nonfinite - nonfinite} "
                       "non-finite update, the rest beyond the map's size bound)")
            if placed.any():
                now = self.clock()
                if self._last_batch is not None:
                    gap = now - self._last_batch
                    self._gap = gap if not self._gap else 0.8 * self._gap + 0.2 * gap
                self._last_batch = now
            self.version += 1
            return batch.drop(~placed, why)

    def stream_paused(self) -> bool:
        """Every planned position placed, or no frame for a while (SETTLE_*): idle passes may
        then go on to ``max_passes``; while frames arrive they stop at LIVE_MAX_PASSES."""
        if self._last_batch is None:
            return True
        wait = max(SETTLE_MIN_S, SETTLE_GAPS * self._gap)
        if self._planned is not None:
            if self.n_frames >= len(self._planned):
                return True
            wait = max(wait, SETTLE_PLAN_S)
        return self.clock() - self._last_batch >= wait

    def pass_limit(self) -> float:
        """Frame updates a frame the idle passes go up to now (see refine.LIVE_MAX_PASSES)."""
        from ptychostream.refine import LIVE_MAX_PASSES

        return self.max_passes if self.stream_paused() else min(self.max_passes, LIVE_MAX_PASSES)

    def idle(self) -> bool:
        """Further passes: re-visit stored frames while the stream leaves time, up to
        :meth:`pass_limit`."""
        r = self._refiner
        if r is None or not r.stored or r.passes >= self.pass_limit():
            return False
        if self.idle_gate is not None and not self.idle_gate():
            return False
        with self._lock:
            if self._refiner is not r:
                return False
            done = r.revisit()
            if done:
                self.version += 1
            return bool(done)

    # ------------------------------------------------------------------ outputs
    def _geometry(self, source) -> dict:
        origin = source.origin
        return {"OriginX": float(origin[0]), "OriginY": float(origin[1]),
                "PixelSize": float(source.pixel_m), "NumFrames": int(self.n_frames)}

    def image(self) -> Frame | None:
        """The map as a Frame whose attributes place it: OriginX/OriginY (m), PixelSize, NumFrames;
        Refined (1: refined against the frames, 0: network phases stitched), Passes."""
        with self._lock:
            r, s = self._refiner, self._stitcher
            if r is not None and r.n_frames and r.origin is not None:
                return Frame(r.phase_image(), self.n_frames, 0.0,
                             {**self._geometry(r), "Refined": 1, "Passes": float(r.passes)})
            if s is None or s.origin is None or not s.n_frames:
                return None
            return Frame(s.image(), self.n_frames, 0.0, {**self._geometry(s), "Refined": 0})

    def amplitude(self) -> Frame | None:
        with self._lock:
            r = self._refiner
            if r is None or not r.n_frames:
                return None
            return Frame(r.amplitude_image(), self.n_frames, 0.0, self._geometry(r))

    def probe_image(self) -> Frame | None:
        """The probe in use as float32 (modes, N, N, 2): real and imaginary parts."""
        with self._lock:
            p = self._refiner.probe if self._refiner is not None else self._probe
        if p is None:
            return None
        return Frame(np.stack([p.real, p.imag], -1).astype(np.float32), 0, 0.0,
                     {"Modes": int(p.shape[0]), "Source": self.probe_source})

    def save(self, path) -> str:
        """Write the map (complex object, phase, amplitude, stitched network phase) and the
        probe to an HDF5 file; returns the path."""
        import time

        import h5py

        with self._lock:
            r, s = self._refiner, self._stitcher
            if s is None and r is None:
                raise ValueError("there is no map to save yet")
            tmp = f"{path}.part"
            with h5py.File(tmp, "w") as f:
                f.attrs.update({"created": time.time(), "n_frames": self.n_frames,
                                "probe_source": self.probe_source})
                if r is not None:
                    f.create_dataset("object", data=r.complex_image(), compression="gzip")
                    f.create_dataset("phase", data=r.phase_image(), compression="gzip")
                    f.create_dataset("amplitude", data=r.amplitude_image(), compression="gzip")
                    f.create_dataset("probe", data=r.probe)
                    f.attrs.update({"origin_m": np.asarray(r.origin), "pixel_size_m": r.pixel_m,
                                    "passes": r.passes})
                if s is not None and s.n_frames:
                    g = f.create_group("stitched")
                    g.create_dataset("phase", data=s.image(), compression="gzip")
                    g.attrs.update({"origin_m": np.asarray(s.origin), "pixel_size_m": s.pixel_m,
                                    "weighting": s.weighting})
        import os

        os.replace(tmp, path)
        return str(path)
