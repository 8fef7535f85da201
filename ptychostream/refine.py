"""Live refinement: each frame updates a complex map once, in arrival order, against its own
measured intensities with the known probe (streaming rPIE; REFERENCE.md "A live map without a
network"; Maiden, Johnson and Li 2017). Where scans overlap this alone shows the sample; where
they do not, the network's phase seeds the pixels the map has not seen yet.

Frames of one batch update together: their corrections are computed from the same map, summed,
and applied once, with the per-pixel denominator (1 - alpha) sum|P|^2 + alpha max|P|^2 (one
probe's peak), which keeps a batch of 8 as good as frame by frame (issue 14's measurement).
An ePIE probe step after each object step (Maiden and Rodenburg 2009) lets the probe keep
learning, as a real probe is never exact, in smaller steps once every frame has been used
several times (PROBE_ANNEAL_PASSES). Torch, so the same code runs on the CPU (about
0.5 ms a frame on one core) and beside the network on a GPU.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from pathlib import Path

import numpy as np

from ptychostream.geometry import median_phase_gradient, move_ramp_to_probe, place_on_grid
from ptychostream.stitch import MAX_MAP_PX, Canvas, Windows

log = logging.getLogger(__name__)

SEED_MODES = ("new", "blend", "none")
#: how the network's phase seeds the map, measured (W-film letters, exact probe, one pass; seed
#: = truth crops, a perfect network / the demo's weak network): zero overlap: blend 0.986 /
#: 0.656, new 0.976 / 0.612 (network alone 0.999 / 0.292); overlap 0.6: blend 0.996 / 0.921,
#: new 0.968 / 0.947; overlap 0.9: blend 0.999 / 0.995, new 0.996 / 0.996 (correlation)
DEFAULT_SEED = "blend"
#: match each seed's constant phase to the map where the map has seen the sample, or let the
#: network's constant stand; measured (letters, exact probe, one pass, seeded by the demo's weak
#: network / by truth crops; correlation / MAE): zero overlap: matched 0.697 / 0.380 and
#: 0.986 / 0.088, not 0.709 / 0.350 and 0.988 / 0.059 (the network alone 0.489 / 0.389);
#: overlap 0.6: 0.911 / 0.214 against 0.920 / 0.194; overlap 0.9: 0.990 / 0.081 against
#: 0.995 / 0.049. Matching on the thin overlap of sparse frames chains their errors.
DEFAULT_MATCH_SEED = False
#: a map pixel counts as seen once its summed illumination reaches this fraction of one probe peak
SEEN = 0.1
#: frames darker than this fraction of the running median total are not used (shutter closed)
DARK_FRACTION = 0.01
#: object alpha of the live pass, measured (letters, 1e5 photons, exact probe, batch 8; figures
#: correlation over the illuminated area): overlap 0.9: alpha 0.3 -> 0.984, 0.1 -> 0.985;
#: overlap 0.6: 0.3 -> 0.854, 0.1 -> 0.917, 0.05 -> 0.938 (0.1 keeps 0.9 as good)
DEFAULT_ALPHA = 0.1
#: alpha of further passes: small alphas amplify noise in the probe's dim tails, which a
#: re-visit of the scan's centre spreads over its already-refined edge (overlap 0.9, 1.2
#: passes: 0.1 -> 0.971, 0.3 -> 0.980; full passes 0.986 / 0.988); at overlap 0.6, 4.5
#: passes: 0.1 -> 0.981, 0.3 -> 0.975
DEFAULT_REVISIT_ALPHA = 0.3
#: ePIE probe step, measured on the W-film letters scan at overlap 0.9 (one pass, batch 2):
#: with a probe pty-chi reconstructed from another scan 0 -> corr 0.919, 0.5 -> 0.977; with an
#: 850 nm probe for the 800 nm beam 0.980 -> 0.990; with the exact probe 0.997 -> 0.992
DEFAULT_PROBE_STEP = 0.5
#: probe steps start once the map has this many frames (a flat map would teach the probe nothing)
DEFAULT_PROBE_START = 100
#: further passes beyond this many take probe steps of ProbeStep x (this / passes): a probe
#: that has learnt from every frame several times over is refined in ever smaller steps, so its
#: noise settles; measured on the demo's scans (benchmarks/bench_refine.py --arrival-caps 2 8,
#: 32 passes), MAE (rad) without -> with: test scan (probe of train-4) 0.0235 -> 0.0220 and
#: 0.0229 -> 0.0217, train-4 (probe of train-3) 0.0222 -> 0.0204 and 0.0209 -> 0.0198; 4
#: instead of 8: 0.0215 / 0.0216 and 0.0202 / 0.0198
PROBE_ANNEAL_PASSES = 8.0
DEFAULT_PROBE_ALPHA = 0.3
#: frames updated together: corrections of overlapping frames summed from one map lose
#: accuracy on a strong object (W film letters, overlap 0.9, one pass: batch 1 corr 0.998,
#: 2 -> 0.997, 4 -> 0.993, 8 -> 0.972; at overlap 0.6 batch 1 -> 0.974, 8 -> 0.967), and on a
#: CPU batch 2 costs no more than 8; a GPU needs bigger batches to keep up (measure:
#: benchmarks/bench_refine.py) and further passes make up for them
DEFAULT_BATCH = 2
DEFAULT_GPU_BATCH = 16
#: while the probe learns, once per pass of updates the map's linear phase ramp moves into the
#: probe (:meth:`Refiner._move_ramp_to_probe`); measured with benchmarks/bench_refine.py
#: --batches --passes 8 --probe-steps 0.5 --move-ramp on off on the demo's scans, SSIM / corr /
#: MAE (rad), off -> on: test scan (flat map 0.588 / 0 / 0.424), probe of the scan before
#: 0.743 / 0.9989 / 0.0274 -> 0.856 / 0.9991 / 0.0219, the exact probe 0.739 / 0.9985 / 0.0306
#: -> 0.849 / 0.9991 / 0.0228, probe fixed: unchanged; a training scan (flat 0.480 / 0 / 0.592)
#: 0.520 / 0.9940 / 0.0846 -> 0.880 / 0.9994 / 0.0219
DEFAULT_MOVE_RAMP = True
#: further passes the map stage makes while idle (frame updates per frame, live pass included);
#: measured on the demo's scans with the probe of the scan before, probe learnt, the live pass
#: seeded by the demo's network as the IOC seeds it (benchmarks/bench_refine.py --batches
#: --passes 16 24 32 48 --probe-steps 0.5 --seed-model MODEL.onnx), SSIM / corr / MAE (rad):
#: test scan (overlap 0.85; flat map 0.588 / 0 / 0.424) 16 -> 0.854 / 0.9991 / 0.0224, 24 ->
#: 0.863 / 0.9991 / 0.0220, 32 -> 0.859 / 0.9990 / 0.0222; its 18-frame sparse scan (overlap
#: 0.61; flat 0.555 / 0 / 0.460) 16 -> 0.742 / 0.9973 / 0.0398, 24 -> 0.794 / 0.9983 / 0.0309,
#: 32 -> 0.799 / 0.9985 / 0.0285, 48 -> 0.794 / 0.9986 / 0.0276. Idle time only: inference
#: never waits for them (plugins/stitching.py)
DEFAULT_MAX_PASSES = 32.0
#: while frames still arrive, idle passes stop at this many (then go on to the maximum once the
#: stream pauses, plugins/stitching.py): a map whose first frames are refined over and over
#: before their neighbours arrive settles into a wrong solution that later frames do not undo,
#: which is what a slow detector got (0.4 s frames leave time for every pass between two
#: frames). Measured on the demo's scans, frames one at a time, idle passes between them up to
#: the cap, then 32 (benchmarks/bench_refine.py --scan S.h5 --probe RECON.h5 --seed-model
#: MODEL.onnx --batches --arrival-caps 2 4 8 32), SSIM / corr / MAE (rad) when the scan ends
#: and after 32 passes: test scan (120 frames, overlap 0.85) cap 2 0.746 / 0.9967 / 0.0432 ->
#: 0.873 / 0.9988 / 0.0235, 4 0.718 / 0.9979 / 0.0365 -> 0.827 / 0.9989 / 0.0239, 8 0.780 /
#: 0.9982 / 0.0325 -> 0.873 / 0.9989 / 0.0229, 32 (no cap) 0.740 / 0.9979 / 0.0353 -> the same;
#: sparse scan (18 frames, overlap 0.61) 2 -> 0.766 / 0.9981 / 0.0337, 4 -> 0.763 / 0.9981 /
#: 0.0340, 8 -> 0.748 / 0.9980 / 0.0354, 32 -> 0.437 / 0.9811 / 0.1077
LIVE_MAX_PASSES = 8.0
#: probe power allowed (sum |P|^2): anything outside is no probe of a detector with counts
PROBE_POWER_RANGE = (1e-12, 1e15)


class ProbeError(ValueError):
    """A probe that cannot serve (shape, non-finite, zero, absurd scale): says why."""


# --------------------------------------------------------------------------- probes in
def check_probe(probe, frame_size: int | None = None) -> np.ndarray:
    """The probe as (modes, N, N) complex64, or ProbeError saying why it cannot serve."""
    p = np.asarray(probe)
    if p.dtype.kind not in "cf":
        raise ProbeError(f"probe dtype {p.dtype} is not complex or real")
    while p.ndim > 3 and p.shape[0] == 1:  # (1, 1, modes, N, N) as Tike/pty-chi keep it
        p = p[0]
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[-1] != p.shape[-2]:
        raise ProbeError(f"probe shape {np.shape(probe)} is not (N, N) or (modes, N, N)")
    if frame_size is not None and p.shape[-1] != frame_size:
        raise ProbeError(f"probe is {p.shape[-1]} px, frames are {frame_size} px")
    if not 1 <= p.shape[0] <= 12:
        raise ProbeError(f"probe has {p.shape[0]} modes; 1 to 12 are allowed")
    if not np.isfinite(p).all():
        raise ProbeError("probe has non-finite values")
    power = float(np.sum(np.abs(p.astype(np.complex128)) ** 2))
    if power == 0:
        raise ProbeError("probe is all zero")
    if not PROBE_POWER_RANGE[0] <= power <= PROBE_POWER_RANGE[1]:
        raise ProbeError(f"probe power {power:.3g} is outside {PROBE_POWER_RANGE} (absurd scale)")
    return p.astype(np.complex64)


def read_probe(source) -> tuple[np.ndarray, str]:
    """The probe array in a file path or bytes, unchecked: ``.npy``, a reconstruction file of
    ours (its ``probe`` dataset, all modes) or a scan file (``/entry/ptychography/probe``).
    Returns (array, where it came from); ProbeError when there is none to read."""
    if isinstance(source, np.ndarray):
        return source, "array"
    if isinstance(source, bytes | bytearray | memoryview):
        data, name = bytes(source), f"{len(source)} bytes"
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ProbeError(f"cannot read probe file {path}: {exc}") from exc
        name = str(path)
    if data[:6] == b"\x93NUMPY":
        try:
            return np.load(io.BytesIO(data), allow_pickle=False), f".npy {name}"
        except Exception as exc:
            raise ProbeError(f"{name}: unreadable .npy: {exc}") from exc
    if data[:8] == b"\x89HDF\r\n\x1a\n":
        import h5py

        try:
            with h5py.File(io.BytesIO(data), "r") as f:
                for key, what in (("probe", "reconstruction"),
                                  ("/entry/ptychography/probe", "scan file")):
                    if key in f:
                        label = f.attrs.get("recon_id", "")
                        label = label.decode() if isinstance(label, bytes) else str(label)
                        return f[key][()], f"{what} {name}" + (f" ({label})" if label else "")
        except Exception as exc:
            raise ProbeError(f"{name}: unreadable HDF5: {exc}") from exc
        raise ProbeError(f"{name} has no probe (neither /probe nor /entry/ptychography/probe)")
    raise ProbeError(f"{name} is neither .npy nor HDF5 (starts {data[:8]!r})")


def load_probe(source) -> tuple[np.ndarray, str]:
    """:func:`read_probe`, checked: (probe (modes, N, N) complex64, where it came from)."""
    array, where = read_probe(source)
    return check_probe(array), where


def torch_abs2(z):
    """|z|^2 of a complex tensor from its (re, im) pairs: cheaper than abs()**2 (a hypot) or
    real**2 + imag**2 (two strided views)."""
    import torch

    return torch.view_as_real(z).square().sum(-1)


# --------------------------------------------------------------------------- the refiner
class Refiner:
    """A complex map refined frame by frame; see the module docstring.

    ``alpha``: rPIE regularisation (0 = ePIE-like full step where lit, 1 = cautious).
    ``probe_step``: ePIE probe step size (0: the probe stays as given).
    ``seed``: "new" (the network's phase seeds pixels the map has not seen), "blend" (it is
    averaged in, weighted by illumination) or "none". ``history``: frames kept for further
    passes (float16 amplitudes, 32 kB a frame at 128 px). ``move_ramp``: move the map's phase
    ramp into the learning probe once per pass (:meth:`_move_ramp_to_probe`)."""

    def __init__(self, probe, pixel_m: float, alpha: float = DEFAULT_ALPHA,
                 probe_step: float = DEFAULT_PROBE_STEP, probe_alpha: float = DEFAULT_PROBE_ALPHA,
                 probe_start: int = DEFAULT_PROBE_START,
                 revisit_alpha: float = DEFAULT_REVISIT_ALPHA, seed: str = DEFAULT_SEED,
                 positions_m: np.ndarray | None = None, device: str = "cpu",
                 history: int = 2048, batch: int | None = None,
                 max_px: int = MAX_MAP_PX, match_seed: bool = DEFAULT_MATCH_SEED,
                 move_ramp: bool = DEFAULT_MOVE_RAMP) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.pixel_m = float(pixel_m)
        self.alpha = float(alpha)
        self.probe_step = float(probe_step)
        self.probe_alpha = float(probe_alpha)
        self.probe_start = int(probe_start)
        self.revisit_alpha = float(revisit_alpha)
        # a revisit's own alpha and annealed probe step; None: alpha / probe_step as set now
        self._alpha_now: float | None = None
        self._probe_step_now: float | None = None
        self.seed = seed
        self.match_seed = bool(match_seed)
        self.move_ramp = bool(move_ramp)
        self.batch = max(1, int(batch or (DEFAULT_BATCH if self.device.type == "cpu"
                                          else DEFAULT_GPU_BATCH)))
        self.history_size = int(history)
        self.max_px = int(max_px)
        self._lock = threading.RLock()
        self.set_probe(probe)
        self.reset(positions_m)

    # ------------------------------------------------------------------ state
    @property
    def seed(self) -> str:
        return self._seed_mode

    @seed.setter
    def seed(self, mode: str) -> None:
        if mode not in SEED_MODES:
            raise ValueError(f"seed mode must be one of {', '.join(SEED_MODES)}, not {mode!r}")
        self._seed_mode = mode

    def set_probe(self, probe) -> None:
        """A new probe (modes, N, N): checked, then rescaled to the next frames' counts.

        Kept times a checkerboard (-1)^(row+col): the FFT of an exit wave so modulated comes
        out with its zero frequency centred, as the detector's frames have it, so no frame is
        ever shifted (the sign squares away in both updates; :attr:`probe` removes it)."""
        p = check_probe(probe)
        with self._lock:
            self.frame_size = n = p.shape[-1]
            k = np.arange(n)
            self._checker = self.torch.as_tensor(
                (1 - 2 * ((k[:, None] + k[None, :]) % 2)).astype(np.float32), device=self.device)
            self._P = self.torch.as_tensor(p, device=self.device) * self._checker
            self._rescale = True
            self.probe_updates = 0

    @property
    def probe(self) -> np.ndarray:
        """The probe in use, as learnt so far: (modes, N, N) complex64."""
        with self._lock:
            return (self._P * self._checker).cpu().numpy()

    def reset(self, positions_m: np.ndarray | None = None) -> None:
        """Start a new map (flat: transmission 1) and forget the stored frames; keeps the probe."""
        torch = self.torch
        with self._lock:
            self.canvas = Canvas(self.pixel_m, self.frame_size, {
                "obj": (torch.complex64, 1.0 + 0j), "illum": (torch.float32, 0.0),
                "num": (torch.complex64, 0.0 + 0j), "den": (torch.float32, 0.0),
            }, positions_m, self.device, self.max_px)
            n, h = self.frame_size, self.history_size
            self._hist_amp = torch.zeros((h, n, n), dtype=torch.float16, device=self.device)
            self._hist_pos = np.zeros((h, 2), np.float64)
            self._hist_count = np.zeros(h, np.int64)  # updates each stored frame has had
            self._hist_n = 0  # frames stored in total (ring: the last h are kept)
            self.n_frames = 0  # frames refined live
            self.n_updates = 0  # frame-updates, live and revisits
            self.n_nonfinite = 0
            self.n_dark = 0
            self._median_total = None
            self._ramp_at = (0, 0)  # (n_updates, probe_updates) when the ramp last moved
            self.ramp_moved = (0.0, 0.0)  # rad/px along rows, cols, moved in all
            self.version = 0

    @property
    def origin(self) -> tuple[float, float] | None:
        return self.canvas.origin

    @property
    def stored(self) -> int:
        return min(self._hist_n, self.history_size)

    @property
    def passes(self) -> float:
        """Frame-updates per frame of this map: 1 after one live pass, more with revisits."""
        return self.n_updates / self.n_frames if self.n_frames else 0.0

    # ------------------------------------------------------------------ frames in
    def _amplitudes(self, frames):
        """Measured amplitudes sqrt(counts), zero frequency centred as recorded (see set_probe)."""
        torch = self.torch
        x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames,
                            device=self.device).to(torch.float32)
        return torch.sqrt(x.clamp(min=0.0))

    def update(self, frames, positions_m: np.ndarray, seed_phase=None,
               store: bool = True, defer: bool = False) -> np.ndarray:
        """Refine the map with a batch of frames (B, N, N) counts, zero frequency centred, at
        beam positions (B, 2) x, y in metres. ``seed_phase`` (B, N, N): the network's phase of
        each frame (see ``seed``). ``defer``: only seed the map and keep the frames; their
        update comes first among the further passes (:meth:`revisit`), for a stage that is
        behind the stream. Returns a (B,) bool mask of the frames used (False: non-finite
        position or data, dark, or beyond the map's bound)."""
        torch = self.torch
        pos = np.asarray(positions_m, np.float64).reshape(-1, 2)
        defer = defer and store  # a frame not kept could never be refined later
        with self._lock:
            amp = self._amplitudes(frames)
            totals = (amp.double() ** 2).sum((1, 2))
            ok = np.isfinite(pos).all(axis=1) & torch.isfinite(totals).cpu().numpy()
            ok &= self._not_dark(totals, ok)
            ok &= self.canvas.fit(np.where(ok[:, None], pos, np.nan), extent=self.frame_size + 1)
            idx = np.nonzero(ok)[0]
            if not len(idx):
                return ok
            if self._rescale:
                self._rescale_probe(totals[torch.as_tensor(idx, device=self.device)])
            used = np.zeros(len(pos), bool)
            for s in range(0, len(idx), self.batch):
                part = idx[s:s + self.batch]
                lo, hi = int(part[0]), int(part[-1]) + 1
                contiguous = hi - lo == len(part)  # the usual case: a slice, not a gather
                sub = amp[lo:hi] if contiguous else amp[torch.as_tensor(part, device=self.device)]
                seed = None
                if seed_phase is not None and self.seed != "none":
                    seed = torch.as_tensor(np.asarray(seed_phase)[part] if isinstance(
                        seed_phase, np.ndarray) else seed_phase[part], device=self.device)
                if defer:
                    good = self._seed_only(pos[part], seed)
                else:
                    good = self._step(sub, pos[part], seed)
                used[part[good]] = True
                if store:
                    self._store(sub if good.all() else sub[torch.as_tensor(good)],
                                pos[part][good], count=0 if defer else 1)
            n = int(used.sum())
            self.n_frames += n
            self.n_updates += 0 if defer else n
            self._move_ramp_to_probe()
            self.version += 1
            return used

    def _not_dark(self, totals, ok: np.ndarray) -> np.ndarray:
        """Frames with almost no counts (shutter closed, beam lost) would wipe the map."""
        t = totals.cpu().numpy()
        good = ok & (t > 0)
        if good.any():
            med = float(np.median(t[good]))
            self._median_total = med if self._median_total is None else (
                0.9 * self._median_total + 0.1 * med)
        if self._median_total is None:
            return np.zeros_like(ok)
        bright = t >= DARK_FRACTION * self._median_total
        self.n_dark += int((ok & ~bright).sum())
        return bright

    def _rescale_probe(self, totals) -> None:
        """Match the probe's power to the frames' counts (pty-chi's rescale_probe does the same):
        a probe's absolute scale is not kept across scans of other exposures."""
        power = float(torch_abs2(self._P).sum())
        target = float(totals.median())
        if power > 0 and target > 0:
            self.probe_scale = math.sqrt(target / power)
            self._P = self._P * self.probe_scale
            self._rescale = False

    def _store(self, amp, pos: np.ndarray, count: int = 1) -> None:
        h = self.history_size
        for a, p in zip(amp, pos, strict=True):
            k = self._hist_n % h
            self._hist_amp[k] = a.clamp(max=65000.0).to(self.torch.float16)
            self._hist_pos[k] = p
            self._hist_count[k] = count
            self._hist_n += 1

    # ------------------------------------------------------------------ one batch step
    def _probe_intensity(self):
        """(sum over modes of |P|^2 (N, N), its peak), cached until the probe changes."""
        P = self._P
        if getattr(self, "_p_cache", (None,))[0] is not P:
            p_int = torch_abs2(P).sum(0)
            self._p_cache = (P, p_int, p_int.max())
        return self._p_cache[1], self._p_cache[2]

    def _seed_only(self, pos: np.ndarray, seed) -> np.ndarray:
        """A deferred batch: the network's phase seeds the map (shown at once), no update."""
        keep = np.ones(len(pos), bool)
        if seed is not None:
            corner = np.rint(self.canvas.corners(pos)).astype(np.int64)
            win = Windows(self.canvas, corner, self.frame_size)
            self._seed(win, seed)
            win.add("illum", self._probe_intensity()[0], keep)
        return keep

    def _step(self, amp, pos: np.ndarray, seed) -> np.ndarray:
        """One rPIE step (and ePIE probe step) for up to ``batch`` frames; returns good mask."""
        torch = self.torch
        n = self.frame_size
        corner = np.rint(self.canvas.corners(pos)).astype(np.int64)
        win = Windows(self.canvas, corner, n)
        P = self._P
        p_int, p_max = self._probe_intensity()
        o_map = win.gather("obj") if seed is None else self._seed(win, seed)  # (B, N, N)
        psi = P[None] * o_map[:, None]  # (B, M, N, N)
        F = torch.fft.fft2(psi, norm="ortho")
        model = torch.sqrt(torch_abs2(F).sum(1, keepdim=True))
        dpsi = torch.fft.ifft2(F * (amp[:, None] / model.clamp(min=1e-12)), norm="ortho") - psi
        good = torch.isfinite(torch.view_as_real(dpsi.sum((1, 2, 3))).sum(-1))  # NaN/inf carry
        if not bool(good.all()):
            dpsi = torch.where(good[:, None, None, None], dpsi, torch.zeros_like(dpsi))
        win.add("num", (P.conj()[None] * dpsi).sum(1))
        win.add("den", good.to(p_int.dtype)[:, None, None] * p_int)
        alpha = self._alpha_now if self._alpha_now is not None else self.alpha
        new = o_map + win.gather("num") / ((1 - alpha) * win.gather("den") + alpha * p_max)
        good &= torch.isfinite(torch.view_as_real(new.sum((1, 2))).sum(-1))
        keep = good.cpu().numpy()
        win.put("obj", new, keep)
        win.add("illum", p_int, keep)
        win.fill("num", 0)
        win.fill("den", 0)
        step = self._probe_step_now if self._probe_step_now is not None else self.probe_step
        if step > 0 and self.n_frames >= self.probe_start and keep.any():
            Og, dg = (o_map, dpsi) if keep.all() else (o_map[good], dpsi[good])
            dP = (Og.conj()[:, None] * dg).sum(0)
            o_int = torch_abs2(Og).sum(0)
            newP = P + step * dP / ((1 - self.probe_alpha) * o_int
                                               + self.probe_alpha * o_int.max())
            if bool(torch.isfinite(torch.view_as_real(newP.sum())).all()):
                self._P = newP
                self.probe_updates += 1
        bad = int((~keep).sum())
        if bad:
            self.n_nonfinite += bad
            log.debug("refinement: %d frame(s) gave a non-finite update; map left as it was", bad)
        return keep

    def _seed(self, win: Windows, phase):
        """Seed with the network's phase (its constant matched to the map where the map has seen
        the sample if ``match_seed``): new pixels only, or blended. Returns the seeded windows
        (the map's, (B, N, N)), which are also put back in the map."""
        torch = self.torch
        w, w_lit, p_max = self._seed_weights()
        o_map, seen_w = win.gather("obj"), win.gather("illum") / p_max
        phase = phase.to(torch.float32)
        if self.match_seed:
            ws = torch.where(seen_w >= SEEN, w, torch.zeros_like(w))
            corr = (ws * o_map * torch.polar(torch.ones_like(phase), -phase)).sum((1, 2))
            has = ws.sum((1, 2)) >= 0.05 * w.sum()
            phase = phase + torch.where(has, torch.angle(corr), 0.0)[:, None, None]
        if self.seed == "new":
            blend = ((w_lit > 0) & (seen_w < SEEN)).to(torch.float32)
        else:  # blend: a running average, weighted by illumination (0 where the beam is dim)
            blend = w_lit / (seen_w + w)
        o_map = o_map + blend * (torch.polar(o_map.abs(), phase) - o_map)
        win.put("obj", o_map)
        return o_map

    def _seed_weights(self):
        """(w = |P|^2 / peak, w where the beam seeds (>= SEEN) else 0, peak): cached per probe."""
        p_int, p_max = self._probe_intensity()
        cache = getattr(self, "_w_cache", (None,))
        if cache[0] is not p_int:
            w = p_int / p_max.clamp(min=1e-30)
            self._w_cache = cache = (p_int, w, self.torch.where(w >= SEEN, w, 0.0), p_max)
        return cache[1], cache[2], cache[3]

    # ------------------------------------------------------------------ further passes
    def revisit(self, max_frames: int | None = None) -> int:
        """Update the map again with up to ``max_frames`` stored frames (when the stream leaves
        time). Frames with the fewest updates go first, so the region scanned last (whose frames
        have had one) is sharpened first; among equals, in arrival order: measured on the
        letters scan at overlap 0.9, a second pass in arrival order gains (correlation 0.984 ->
        0.987) where one newest-to-oldest loses (0.972). Returns the frame-updates done."""
        torch = self.torch
        with self._lock:
            stored = self.stored
            if not stored:
                return 0
            k = min(int(max_frames or self.batch), self.batch, stored)
            h = self.history_size
            ring = (np.arange(stored) + (self._hist_n - stored)) % h  # oldest .. newest
            counts = self._hist_count[ring]
            pick = ring[np.argsort(counts, kind="stable")[:k]]
            amp = self._hist_amp[torch.as_tensor(pick, device=self.device)].to(torch.float32)
            # frames deferred by a stage that was behind get their first update as live ones do
            self._alpha_now = None if counts.min() == 0 else self.revisit_alpha
            self._probe_step_now = self.revisit_probe_step()
            try:
                good = self._step(amp, self._hist_pos[pick], None)
            finally:
                self._alpha_now = self._probe_step_now = None
            self._hist_count[pick] += 1
            n = int(good.sum())
            self.n_updates += n
            self._move_ramp_to_probe()
            self.version += 1
            return n

    def revisit_probe_step(self) -> float:
        """The next revisit's probe step: ``probe_step``, shrinking as PROBE_ANNEAL_PASSES /
        passes once the map has had more passes than that."""
        return self.probe_step * min(1.0, PROBE_ANNEAL_PASSES / max(self.passes, 1.0))

    def _move_ramp_to_probe(self) -> None:
        """Once per pass of updates (as many as frames stored) in which the probe learnt: the
        map's linear phase ramp (median phase gradient over the seen map, as the labels measure
        it) moves into the probe (ptychostream.geometry, "the ramp ambiguity"): the frames
        cannot stop a learning probe from drifting into a ramp, and the map would carry it.
        The map's ramp pivots at its seen centre, so its shown phase stays there."""
        last_updates, last_probe = self._ramp_at
        if (not self.move_ramp or self.probe_updates == last_probe
                or self.n_updates - last_updates < max(self.stored, 1)):
            return
        torch = self.torch
        self._ramp_at = (self.n_updates, self.probe_updates)
        obj = self.canvas.layers["obj"]
        seen = self._seen().cpu().numpy()
        if seen.sum() < 16:
            return
        obj_np = obj.cpu().numpy()
        q_r, q_c = median_phase_gradient(obj_np, seen)
        if not (math.isfinite(q_r) and math.isfinite(q_c)):
            return
        rows, cols = np.nonzero(seen)
        obj_np, probe = move_ramp_to_probe(obj_np, self._P.cpu().numpy(), (q_r, q_c),
                                           pivot=(rows.mean(), cols.mean()))
        obj.copy_(torch.from_numpy(obj_np))
        self._P = torch.from_numpy(probe).to(self.device)  # the checkerboard commutes with it
        self.ramp_moved = (self.ramp_moved[0] + q_r, self.ramp_moved[1] + q_c)

    # ------------------------------------------------------------------ maps out
    def _seen(self):
        peak = float(self._probe_intensity()[1])
        return self.canvas.layers["illum"] >= SEEN * peak

    def phase_image(self) -> np.ndarray:
        """The map's phase (float32, rad, NaN where unseen), never wrapped inside the map: the
        wrap point is put opposite the map's mean phase, so a 2 rad film on any background
        stays one piece."""
        torch = self.torch
        with self._lock:
            obj = self.canvas.layers["obj"]
            seen = self._seen()
            if not bool(seen.any()):
                return np.full(self.canvas.shape, np.nan, np.float32)
            unit = obj / obj.abs().clamp(min=1e-30)
            mean = torch.angle(unit[seen].sum())
            ph = mean + torch.angle(obj * torch.polar(torch.ones_like(mean), -mean))
            ph = torch.where(seen, ph, torch.full_like(ph, math.nan))
            return ph.cpu().numpy().astype(np.float32)

    def amplitude_image(self) -> np.ndarray:
        """The map's amplitude |O| (float32, NaN where unseen)."""
        torch = self.torch
        with self._lock:
            a = self.canvas.layers["obj"].abs()
            return torch.where(self._seen(), a, torch.full_like(a, math.nan)).cpu().numpy()

    def complex_image(self) -> np.ndarray:
        with self._lock:
            return self.canvas.layers["obj"].cpu().numpy().copy()

    def resample_to(self, shape: tuple[int, int], origin_m) -> np.ndarray:
        """The phase map on another grid of the same pixel size (e.g. the truth's)."""
        if self.origin is None:
            return np.full(shape, np.nan, np.float32)
        return place_on_grid(self.phase_image(), self.origin, self.pixel_m, shape, origin_m)


def refine_scan(frames: np.ndarray, positions_m: np.ndarray, probe, pixel_m: float,
                passes: int = 1, batch: int | None = None,
                seed_phases: np.ndarray | None = None,
                alpha: float = DEFAULT_ALPHA, probe_step: float | None = None,
                seed: str = DEFAULT_SEED, device: str = "cpu",
                **options) -> tuple[np.ndarray, tuple]:
    """Offline refinement of a whole scan in arrival order, as the live stage does it: one live
    pass (seeded by ``seed_phases`` when given), then ``passes - 1`` revisit passes.
    Returns (phase map, origin)."""
    r = Refiner(probe, pixel_m, alpha=alpha,
                probe_step=DEFAULT_PROBE_STEP if probe_step is None else probe_step,
                seed=seed, positions_m=positions_m, device=device, batch=batch,
                history=max(len(frames), 1), **options)
    chunk = 64  # frames handed over at a time, as a stream's batches; updates go by r.batch
    for s in range(0, len(frames), chunk):
        r.update(frames[s:s + chunk], positions_m[s:s + chunk],
                 None if seed_phases is None else seed_phases[s:s + chunk])
    while r.passes < passes and r.stored:
        r.revisit()
    return r.phase_image(), r.origin
