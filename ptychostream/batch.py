"""A batch of frames: what flows one way through the IOC (monitor -> inference -> map -> PVs).

Arrays, not a Python object per frame: the detector data (B, H, W), uniqueIds, timestamps,
beam positions and pixel sizes, and after inference the phases. Frames a stage cannot use are
taken out with :meth:`FrameBatch.drop`, which records why, so every stage counts what it lost
and the stream goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: attributes that travel as arrays (the rest, per frame, in ``extra``)
POSITION_KEYS = ("PosX", "PosY")


@dataclass
class FrameBatch:
    """Frames of one batch. ``positions`` are (x, y) in metres, NaN where a frame had none;
    ``pixel_size`` in metres, 0 where unknown. ``problems``: (reason, count, malformed) of
    frames dropped so far; ``skipped``: (reason, count) of frames a stage passed on unprocessed."""

    data: np.ndarray
    unique_ids: np.ndarray
    timestamps: np.ndarray
    positions: np.ndarray
    pixel_size: np.ndarray
    extra: list[dict] = field(default_factory=list)
    phase: np.ndarray | None = None
    model_version: int = 0
    model_name: str = ""
    problems: list[tuple[str, int, bool]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    frames: bool = True  # False: ``data`` holds no detector frames (a consumer's phases)

    def __len__(self) -> int:
        return len(self.unique_ids)

    @classmethod
    def empty(cls, shape: tuple[int, int] = (0, 0)) -> FrameBatch:
        return cls(np.zeros((0, *shape), np.float32), np.zeros(0, np.int64), np.zeros(0),
                   np.zeros((0, 2)), np.zeros(0))

    @classmethod
    def from_arrays(cls, data: np.ndarray, unique_ids=None, positions_m=None,
                    pixel_size_m: float | np.ndarray = 0.0, timestamps=None,
                    phase: np.ndarray | None = None) -> FrameBatch:
        """A batch from whole arrays (offline use, tests, scale-out outputs)."""
        data = np.asarray(data)
        n = len(data)
        uid = np.arange(1, n + 1) if unique_ids is None else np.asarray(unique_ids)
        pos = np.full((n, 2), np.nan) if positions_m is None else np.asarray(positions_m, float)
        return cls(data, uid.astype(np.int64),
                   np.zeros(n) if timestamps is None else np.asarray(timestamps, float),
                   pos.reshape(n, 2), np.broadcast_to(np.asarray(pixel_size_m, float), (n,)).copy(),
                   [{} for _ in range(n)], phase)

    def select(self, keep: np.ndarray) -> FrameBatch:
        """The frames where ``keep`` is True (problems and skips carried over)."""
        keep = np.asarray(keep, bool)
        if keep.all():
            return self
        idx = np.nonzero(keep)[0]
        return FrameBatch(
            self.data[idx], self.unique_ids[idx], self.timestamps[idx], self.positions[idx],
            self.pixel_size[idx], [self.extra[i] for i in idx] if self.extra else [],
            None if self.phase is None else self.phase[idx], self.model_version,
            self.model_name, list(self.problems), list(self.skipped), self.frames)

    def drop(self, bad: np.ndarray, reason: str, malformed: bool = True) -> FrameBatch:
        """The batch without the frames where ``bad`` is True, recording why they went."""
        bad = np.asarray(bad, bool)
        n = int(bad.sum())
        if not n:
            return self
        uids = self.unique_ids[bad]
        first = f" (uniqueId {uids[0]}{f' and {n - 1} more' if n > 1 else ''})"
        out = self.select(~bad)
        out.problems = [*self.problems, (reason + first, n, malformed)]
        return out

    def attributes(self, i: int) -> dict:
        """Frame ``i``'s NTNDArray attributes (positions and pixel size included)."""
        a = dict(self.extra[i]) if self.extra else {}
        if np.isfinite(self.positions[i]).all():
            a["PosX"], a["PosY"] = float(self.positions[i, 0]), float(self.positions[i, 1])
        if self.pixel_size[i] > 0:
            a["PixelSize"] = float(self.pixel_size[i])
        if self.phase is not None and self.model_version:
            a["ModelVersion"], a["ModelName"] = int(self.model_version), self.model_name
        return a


def batch_from_frames(frames: list) -> FrameBatch:
    """Frames (:class:`ptychostream.ntndarray.Frame`) of one shape as a batch (hosts that get
    one object per frame, such as pvapy's processors); a frame of another shape is dropped."""
    good = [f for f in frames if np.shape(f.data) == np.shape(frames[0].data)] if frames else []
    n = len(good)
    if not n:
        return FrameBatch.empty()
    data = np.empty((n, *np.shape(good[0].data)), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, f in enumerate(good):
            np.copyto(data[i], np.asarray(f.data), casting="unsafe")
    pos = np.array([f.position or (np.nan, np.nan) for f in good], np.float64)
    extra = [{k: v for k, v in f.attributes.items() if k not in (*POSITION_KEYS, "PixelSize")}
             for f in good]
    pix = np.array([float(f.attributes.get("PixelSize", 0.0) or 0.0) for f in good])
    batch = FrameBatch(data, np.array([f.unique_id for f in good], np.int64),
                       np.array([f.timestamp for f in good], np.float64), pos, pix, extra)
    if len(good) < len(frames):
        batch.problems.append((f"frame shape differs from {np.shape(good[0].data)}",
                               len(frames) - n, True))
    return batch
