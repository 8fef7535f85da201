"""Stitching: phase images placed on one regular grid at their beam positions, overlaps averaged.

REFERENCE.md step 6. Each image is interpolated (bilinear) onto the map grid at its off-grid
beam position and weighted by the region its frame informs (``weighting``); the map is
sum(weight * phase) / sum(weight). A batch is added in one vectorised accumulate (torch, on the
CPU or the GPU that ran inference), so the live map costs a few array operations per batch, not
a Python loop per frame. The live stitching stage and every offline stitch (validation, the
benchmarks) use this one class, so they agree exactly.

``register_offsets``: one diffraction pattern does not fix a constant phase offset (REFERENCE.md,
"what the network can know"); each image's constant is matched to the map already built on
their overlap before it is added.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np

from ptychostream.geometry import map_geometry, place_on_grid, snap

log = logging.getLogger(__name__)

WEIGHTINGS = ("probe", "crop", "uniform")
#: a map pixel shows a value once its summed weight reaches this fraction of one frame's peak
MIN_WEIGHT = 0.1
#: default largest map side (pixels): 4096 x 12.9 nm = 53 um; bounds memory whatever the input
MAX_MAP_PX = 4096
#: a frame is registered against the map only where both are well lit (fraction of peak weight)
REGISTER_MIN_WEIGHT = 0.3
#: ... and only if that overlap covers this fraction of the frame's own weight
REGISTER_MIN_OVERLAP = 0.05
#: offset registration off by default (Stitch:RegisterOffsets): it lowered the stitched map's
#: correlation on every case for both of the demo's CPU networks measured (benchmarks/
#: bench_accuracy.py, probe weights without -> with, letters: overlap 0.9 0.68 -> 0.67 and
#: 0.66 -> 0.64, 0.6 0.62 -> 0.56, zero overlap 0.58 -> 0.36 and 0.54 -> 0.35), whose errors are
#: not constant offsets (per-frame MAE in the beam 0.477 rad, 0.468 with each offset removed).
#: A network that predicts a constant offset over flat ground (REFERENCE.md) wants it on:
#: the base-model recipe's benchmark prints both, so re-decide once it has run
DEFAULT_REGISTER_OFFSETS = False


class MapBoundsError(ValueError):
    """A frame lies so far from the map that taking it would exceed the map's size bound."""


def frame_weights(frame_size: int, pixel_m: float, weighting: str = "probe",
                  crop: int | None = None, probe: np.ndarray | None = None,
                  beam_fwhm_m: float = 800e-9) -> np.ndarray:
    """(N, N) float32 weights, peak 1, of the pixels one frame informs.

    ``probe``: the probe's intensity (summed over modes) when it is known; otherwise a disk of
    the beam FWHM with a soft edge stands in for it. ``crop``: the central crop x crop pixels
    (None: the beam's FWHM). ``uniform``: the whole frame (the paper's stitching)."""
    n = int(frame_size)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    if weighting == "uniform":
        return np.ones((n, n), np.float32)
    beam_px = float(beam_fwhm_m) / float(pixel_m)
    if weighting == "crop":
        c = int(crop) if crop else int(round(min(n, beam_px)))
        c = max(1, min(n, c))
        w = np.zeros((n, n), np.float32)
        lo = (n - c) // 2
        w[lo:lo + c, lo:lo + c] = 1.0
        return w
    if probe is not None:
        p = np.asarray(probe)
        inten = np.sum(np.abs(p.reshape(-1, *p.shape[-2:])) ** 2, axis=0).astype(np.float64)
        if inten.shape != (n, n) or not np.isfinite(inten).all() or inten.max() <= 0:
            raise ValueError(f"probe of shape {p.shape} cannot weight {n}x{n} frames")
        return (inten / inten.max()).astype(np.float32)
    # no probe: a disk of the beam FWHM, edge softened over a tenth of its radius
    k = np.arange(n) - (n - 1) / 2
    r = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    radius = max(beam_px / 2, 1.0)
    edge = max(radius / 10, 1.0)
    t = np.clip((r - radius) / edge + 0.5, 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


class Canvas:
    """Map geometry on the global lattice (see :mod:`ptychostream.geometry`), growing as frames
    arrive, with named torch layers that grow with it; bounded to ``max_px`` pixels a side.

    Shared by the phase stitcher and the refinement stage, so both maps lie on one grid."""

    def __init__(self, pixel_m: float, frame_size: int, layers: dict[str, tuple],
                 positions_m: np.ndarray | None = None, device: str = "cpu",
                 max_px: int = MAX_MAP_PX) -> None:
        import torch

        self.torch = torch
        self.pixel_m = float(pixel_m)
        self.frame_size = int(frame_size)
        self.device = torch.device(device)
        #: windows as one indexed kernel per batch (GPU) or a slice per frame (CPU); a test sets
        #: it on the CPU so the GPU's code runs where no GPU is
        self.index_windows = self.device.type != "cpu"
        self.max_px = int(max_px)
        self._layer_spec = dict(layers)  # name -> (torch dtype, fill value)
        self.origin: tuple[float, float] | None = None
        self.layers: dict[str, object] = {}
        if positions_m is not None and len(positions_m):
            shape, origin = map_geometry(np.asarray(positions_m, float), self.pixel_m,
                                         self.frame_size)
            if max(shape) > self.max_px:
                raise MapBoundsError(f"the planned scan needs a {shape[0]}x{shape[1]} px map; "
                                     f"the bound is {self.max_px} px a side")
            self._allocate(shape, origin)
        else:
            self._allocate((0, 0), None)

    def _allocate(self, shape, origin) -> None:
        self.origin = origin
        self.layers = {k: self.torch.full(shape, fill, dtype=dt, device=self.device)
                       for k, (dt, fill) in self._layer_spec.items()}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(next(iter(self.layers.values())).shape)

    def corners(self, positions_m: np.ndarray) -> np.ndarray:
        """(B, 2) fractional map index (row, col) of each frame's pixel [0, 0]."""
        pos = np.asarray(positions_m, np.float64).reshape(-1, 2)
        half = (self.frame_size - 1) / 2
        x0, y0 = self.origin
        return np.stack([(pos[:, 1] - y0) / self.pixel_m - half,
                         (pos[:, 0] - x0) / self.pixel_m - half], axis=1)

    def fit(self, positions_m: np.ndarray, extent: int | None = None) -> np.ndarray:
        """Grow the map so every frame at ``positions_m`` fits (``extent`` px from its corner);
        returns a (B,) bool mask: False for a non-finite position or a frame that would push
        the map past ``max_px`` a side (frames are taken in arrival order while they fit)."""
        pos = np.asarray(positions_m, np.float64).reshape(-1, 2)
        ext = int(extent or self.frame_size + 1)
        ok = np.isfinite(pos).all(axis=1)
        if not ok.any():
            return ok
        if self.origin is None:  # the first batch fixes the grid: its median, robust to a stray
            first = np.median(pos[ok], axis=0)
            half = (self.frame_size - 1) / 2 * self.pixel_m
            self.origin = (snap(first[0] - half, self.pixel_m), snap(first[1] - half, self.pixel_m))
        with np.errstate(invalid="ignore", over="ignore"):
            c = np.floor(self.corners(np.where(ok[:, None], pos, 0.0)))
        ok &= (np.abs(c) < 1e9).all(axis=1)  # absurd positions: refused before any arithmetic
        rows, cols = self.shape
        box = None if rows == 0 or cols == 0 else np.array([0.0, 0.0, rows, cols])

        def union(b, i):
            fr = np.array([c[i, 0], c[i, 1], c[i, 0] + ext, c[i, 1] + ext])
            if b is None:
                return fr
            return np.array([min(b[0], fr[0]), min(b[1], fr[1]), max(b[2], fr[2]),
                             max(b[3], fr[3])])

        def fits(b) -> bool:
            return b[2] - b[0] <= self.max_px and b[3] - b[1] <= self.max_px

        sel = np.nonzero(ok)[0]
        whole = box
        for i in (sel[np.argmin(c[sel, 0])], sel[np.argmax(c[sel, 0])],
                  sel[np.argmin(c[sel, 1])], sel[np.argmax(c[sel, 1])]):
            whole = union(whole, i)
        if not fits(whole):  # rare: take the frames nearest the map (or the batch's median)
            whole = box      # first, while the map stays in bounds; strays are refused
            centre = (np.median(c[sel], axis=0) if box is None else
                      np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]))
            for i in sel[np.argsort(np.abs(c[sel] - centre).max(axis=1), kind="stable")]:
                trial = union(whole, i)
                if fits(trial):
                    whole = trial
                else:
                    ok[i] = False
        if ok.any() and (box is None or not np.array_equal(whole, box)):
            self._resize(*(int(v) for v in whole))
        return ok

    def _resize(self, r0: int, c0: int, r1: int, c1: int) -> None:
        """New extent rows r0..r1, cols c0..c1 in today's index space (old content kept)."""
        rows, cols = self.shape
        new_shape = (r1 - r0, c1 - c0)
        for k, (dt, fill) in self._layer_spec.items():
            new = self.torch.full(new_shape, fill, dtype=dt, device=self.device)
            if rows and cols:
                new[-r0:-r0 + rows, -c0:-c0 + cols] = self.layers[k]
            self.layers[k] = new
        x0, y0 = self.origin
        self.origin = (x0 + c0 * self.pixel_m, y0 + r0 * self.pixel_m)

    def window_index(self, corner_rc: np.ndarray, size: int):
        """Flat map indices (B, size, size) of each frame's window from its integer corner."""
        torch = self.torch
        rc = torch.as_tensor(np.asarray(corner_rc, np.int64), device=self.device)
        k = torch.arange(size, device=self.device)
        cols = self.shape[1]
        return (rc[:, 0, None, None] + k[None, :, None]) * cols + (rc[:, 1, None, None]
                                                                   + k[None, None, :])


class Windows:
    """The N x N windows of a batch's frames on the map's layers: gather, add, write back.

    On the CPU one slice per frame (cheaper than building flat indices for a few frames); on a
    GPU one indexed kernel for the batch (fewer launches). ``put`` may write overlapping
    windows; where they differ (frames seeded by the network differ on their overlap) the
    batch's last frame wins on both paths. ``keep`` (a (B,) bool array) limits ``add``/``put``
    to those frames."""

    def __init__(self, canvas: Canvas, corners: np.ndarray, n: int) -> None:
        import torch

        self.torch = torch
        self.corners = corners
        self.layers = canvas.layers
        self.n_frames = len(corners)
        self.by_index = canvas.index_windows
        if self.by_index:
            self.flat = canvas.window_index(corners, n)  # (B, N, N)
        else:
            self.slices = [(slice(r, r + n), slice(c, c + n)) for r, c in corners.tolist()]

    def _frames(self, keep: np.ndarray | None) -> list[int]:
        return list(range(self.n_frames)) if keep is None else np.nonzero(keep)[0].tolist()

    def gather(self, name: str, dtype=None, box: tuple[int, int, int, int] | None = None):
        """A copy of each frame's window (B, N, N), converted to ``dtype`` on the way; ``box``
        (r0, r1, c0, c1): only those rows and columns of each window."""
        layer = self.layers[name]
        if self.by_index:
            flat = self.flat if box is None else self.flat[:, box[0]:box[1], box[2]:box[3]]
            out = layer.view(-1)[flat]
            return out if dtype is None else out.to(dtype)
        slices = self.slices
        if box is not None:
            slices = [(slice(r.start + box[0], r.start + box[1]),
                       slice(c.start + box[2], c.start + box[3])) for r, c in slices]
        if not slices:
            return self.torch.empty((0, 0, 0), dtype=dtype or layer.dtype, device=layer.device)
        r, c = slices[0]
        out = self.torch.empty((len(slices), r.stop - r.start, c.stop - c.start),
                               dtype=dtype or layer.dtype, device=layer.device)
        for o, s in zip(out, slices, strict=True):
            o.copy_(layer[s])  # one pass per window, converting as it copies
        return out

    def add(self, name: str, values, keep: np.ndarray | None = None) -> None:
        """Add per-frame values (B, N, N), or one (N, N) array, to the windows; overlaps sum."""
        layer, idx = self.layers[name], self._frames(keep)
        if self.by_index:
            v = values[idx] if values.dim() == 3 else values.expand(len(idx), *values.shape)
            layer.view(-1).index_add_(0, self.flat[idx].reshape(-1), v.reshape(-1))
            return
        for i in idx:
            layer[self.slices[i]] += values[i] if values.dim() == 3 else values

    def put(self, name: str, values, keep: np.ndarray | None = None) -> None:
        layer, idx = self.layers[name], self._frames(keep)
        if self.by_index:
            # an indexed write with repeated indices keeps any one of them: keep each pixel's
            # last, as the frame-by-frame loop does, so the map does not depend on the device
            flat, vals = self.flat[idx].reshape(-1), values[idx].reshape(-1)
            pixels, which = self.torch.unique(flat, return_inverse=True)
            order = self.torch.arange(flat.numel(), device=flat.device)
            last = self.torch.zeros(len(pixels), dtype=order.dtype, device=flat.device)
            last.scatter_reduce_(0, which, order, "amax", include_self=False)
            layer.view(-1)[pixels] = vals[last]
            return
        for i in idx:
            layer[self.slices[i]] = values[i]

    def fill(self, name: str, value: float) -> None:
        layer = self.layers[name]
        if self.by_index:
            layer.view(-1)[self.flat.reshape(-1)] = value
            return
        for s in self.slices:
            layer[s] = value


    def subset(self, frames) -> Windows:
        """The windows of some of the frames (a list of indices)."""
        out = Windows.__new__(Windows)
        out.torch, out.layers, out.by_index = self.torch, self.layers, self.by_index
        out.corners, out.n_frames = self.corners[frames], len(frames)
        if self.by_index:
            out.flat = self.flat[frames]
        else:
            out.slices = [self.slices[i] for i in frames]
        return out


class Stitcher:
    """Accumulates phase images on a map that grows as positions arrive (or is sized for the
    planned positions). See the module docstring for ``weighting`` and ``register_offsets``.

    ``device``: where the map lives ("cpu", or the GPU that ran inference)."""

    def __init__(self, pixel_m: float, frame_size: int = 128, crop: int | None = None,
                 positions_m: np.ndarray | None = None, weighting: str | None = None,
                 probe: np.ndarray | None = None, beam_fwhm_m: float = 800e-9,
                 register_offsets: bool = DEFAULT_REGISTER_OFFSETS, device: str = "cpu",
                 max_px: int = MAX_MAP_PX) -> None:
        import torch

        self.torch = torch
        self.pixel_m = float(pixel_m)
        self.frame_size = int(frame_size)
        self.crop = crop
        self.weighting = weighting or ("crop" if crop else "uniform")
        self.beam_fwhm_m = float(beam_fwhm_m)
        self.register_offsets = bool(register_offsets)
        self.device = device
        self.max_px = max_px
        # float32 sums on every device: 1000 frames at a 50 nm step differ from float64 sums by
        # at most 5e-6 rad, and float64 cost the CPU map stage a third more (bench_stitch.py)
        self._dtype = torch.float32
        self._work = torch.float32
        self.set_weights(frame_weights(self.frame_size, self.pixel_m, self.weighting, crop,
                                       probe, beam_fwhm_m))
        self._lock = threading.Lock()
        self.reset(positions_m)

    def set_weights(self, weights: np.ndarray) -> None:
        """Per-pixel weights (N, N) of one frame, e.g. when the probe becomes known."""
        w = self.torch.as_tensor(np.asarray(weights, np.float64), dtype=self._work,
                                 device=self.device)
        self._w = self.torch.nn.functional.pad(w, (0, 1, 0, 1))  # (N+1, N+1), zero edge
        # registration looks only where a shifted weight can reach REGISTER_MIN_WEIGHT: the
        # box of such pixels, one pixel wider (a sub-pixel shift moves weight by at most one)
        rows, cols = np.nonzero(self._w.cpu().numpy() >= REGISTER_MIN_WEIGHT)
        end = self.frame_size + 1
        self._reg_box = ((max(int(rows.min()) - 1, 0), min(int(rows.max()) + 2, end),
                          max(int(cols.min()) - 1, 0), min(int(cols.max()) + 2, end))
                         if rows.size else (0, end, 0, end))

    def reset(self, positions_m: np.ndarray | None = None) -> None:
        """Start a new map; with planned positions the grid is sized for the whole scan at once."""
        with getattr(self, "_lock", threading.Lock()):
            self.n_frames = 0
            self.canvas = Canvas(self.pixel_m, self.frame_size,
                                 {"sum": (self._dtype, 0.0), "weight": (self._dtype, 0.0)},
                                 positions_m, self.device, self.max_px)

    @property
    def origin(self) -> tuple[float, float] | None:
        return self.canvas.origin

    @property
    def shape(self) -> tuple[int, int]:
        return self.canvas.shape

    def _shifted(self, img, fr, fc, edge: bool):
        """Bilinear sub-pixel shift of (B, N+1, N+1) images by (fr, fc) in [0, 1): the image's
        pixel k lands on index k + f (pull form, as scipy.ndimage.shift with order 1); beyond
        the first row/column the image repeats its edge (``edge``, ndimage's "nearest") or is 0.
        One ``lerp`` per axis, written in place: the map stage's largest cost on a CPU."""
        torch = self.torch
        a = torch.empty_like(img)
        torch.lerp(img[:, 1:], img[:, :-1], fr, out=a[:, 1:])  # (1 - f) x[k] + f x[k-1]
        if edge:
            a[:, :1] = img[:, :1]
        else:
            torch.mul(img[:, :1], 1 - fr, out=a[:, :1])
        b = torch.empty_like(a)
        torch.lerp(a[:, :, 1:], a[:, :, :-1], fc, out=b[:, :, 1:])
        if edge:
            b[:, :, :1] = a[:, :, :1]
        else:
            torch.mul(a[:, :, :1], 1 - fc, out=b[:, :, :1])
        return b

    def add_batch(self, phases, positions_m: np.ndarray) -> np.ndarray:
        """Add a batch of phase images (B, N, N) at beam positions (B, 2) x, y in metres.

        Returns a (B,) bool mask of the frames added (False: non-finite position or beyond the
        map's size bound; see :class:`Canvas`)."""
        torch = self.torch
        pos = np.asarray(positions_m, np.float64).reshape(-1, 2)
        n = self.frame_size
        with self._lock:
            ok = self.canvas.fit(pos)
            if not ok.any():
                return ok
            idx = np.nonzero(ok)[0]
            corner = self.canvas.corners(pos[idx])
            ri = np.floor(corner)
            frac = torch.as_tensor(corner - ri, dtype=self._work, device=self.device)
            fr, fc = frac[:, 0, None, None], frac[:, 1, None, None]
            x = torch.as_tensor(np.asarray(phases)[idx] if isinstance(phases, np.ndarray)
                                else phases[torch.as_tensor(idx)], device=self.device)
            x = x.to(self._work)
            # image padded by edge repetition (ndimage mode="nearest"), weights by zeros
            x = torch.nn.functional.pad(x[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]
            img = self._shifted(x, fr, fc, edge=True)
            w = self._shifted(self._w.expand(len(idx), n + 1, n + 1), fr, fc, edge=False)
            win = Windows(self.canvas, ri.astype(np.int64), n + 1)
            if self.register_offsets:
                self._add_registered(img, w, win)
            else:
                self._accumulate(img, w, win)
            self.n_frames += len(idx)
        return ok

    def _accumulate(self, img, w, win: Windows) -> None:
        win.add("sum", img * w)
        win.add("weight", w)

    def _add_registered(self, img, w, win: Windows) -> None:
        """Register every image against the map, add those that overlap it, then the rest
        against the grown map; an image that overlaps nothing is added as it is (it anchors a
        new part of the map). One round per batch once the map has started."""
        off, enough = self._offsets(img, w, win)
        if bool(enough.all()):  # the usual case once a map has started: one round, no copies
            self._accumulate(img + off[:, None, None], w, win)
            return
        todo = list(range(len(img)))
        while todo:
            sub = win.subset(todo)
            off, enough = self._offsets(img[todo], w[todo], sub)
            take = [i for i, e in zip(todo, enough.tolist(), strict=True) if e]
            offs = off[enough]
            if not take:  # nothing overlaps: the first anchors, the rest follow it
                take, offs = todo[:1], off[:1] * 0
            self._accumulate(img[take] + offs[:, None, None], w[take], win.subset(take))
            todo = [i for i in todo if i not in set(take)]

    def _offsets(self, img, w, win: Windows):
        """Constant per image that matches it to the map already built, on their overlap
        (weighted mean of map - image where both are well lit), and whether they overlap
        enough to say; 0 where they do not."""
        torch = self.torch
        box = self._reg_box  # outside it no pixel is well lit by the image: nothing to compare
        r0, r1, c0, c1 = box
        s, mw = win.gather("sum", self._work, box), win.gather("weight", self._work, box)
        wb, ib = w[:, r0:r1, c0:c1], img[:, r0:r1, c0:c1]
        both = (mw >= REGISTER_MIN_WEIGHT) & (wb >= REGISTER_MIN_WEIGHT)
        ww = (wb * mw.clamp(max=1.0)).masked_fill_(~both, 0.0)  # 0 outside the overlap
        total = ww.sum((1, 2))
        diff = s.div_(mw.clamp_(min=1e-12)).sub_(ib)  # finite everywhere: s and img are
        off = (ww * diff).sum((1, 2)) / total.clamp(min=1e-12)
        enough = total >= REGISTER_MIN_OVERLAP * w.sum((1, 2))
        return torch.where(enough, off, torch.zeros_like(off)), enough

    def add(self, phase: np.ndarray, position_m) -> None:
        """Add one phase image at beam position (x, y) in metres."""
        ok = self.add_batch(np.asarray(phase)[None], np.asarray(position_m, float)[None])
        if not ok[0]:
            raise MapBoundsError(f"position {tuple(position_m)} is beyond the map's bound of "
                                 f"{self.max_px} px a side")

    def add_many(self, phases: np.ndarray, positions_m: np.ndarray, batch: int = 64) -> None:
        """Offline: add a whole scan, in arrival order, batch by batch."""
        for s in range(0, len(phases), batch):
            self.add_batch(phases[s:s + batch], positions_m[s:s + batch])

    def image(self, min_weight: float = MIN_WEIGHT) -> np.ndarray:
        """The stitched map (float32); NaN where nothing was stitched."""
        with self._lock:
            s = self.canvas.layers["sum"]
            w = self.canvas.layers["weight"]
            out = s / w.clamp(min=1e-300 if s.dtype == self.torch.float64 else 1e-30)
            out = self.torch.where(w >= min_weight, out, self.torch.full_like(out, math.nan))
            return out.float().cpu().numpy()

    def resample_to(self, shape: tuple[int, int], origin_m) -> np.ndarray:
        """The stitched map on another grid of the same pixel size (e.g. a reconstruction's)."""
        if self.origin is None:
            return np.full(shape, np.nan, np.float32)
        return place_on_grid(self.image(), self.origin, self.pixel_m, shape, origin_m)


def stitch(phases: np.ndarray, positions_m: np.ndarray, pixel_m: float, crop: int | None = None,
           **options) -> tuple[np.ndarray, tuple[float, float]]:
    """Offline stitch of a whole scan: returns (map, origin). ``options``: weighting, probe,
    beam_fwhm_m, register_offsets (see :class:`Stitcher`)."""
    s = Stitcher(pixel_m, phases.shape[-1], crop=crop, positions_m=positions_m, **options)
    s.add_many(phases, positions_m)
    return s.image(), s.origin
