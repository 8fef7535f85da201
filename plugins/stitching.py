"""Stitching plugin: phase images placed at their beam positions on one map, overlaps averaged.

REFERENCE.md step 6, with :class:`ptychostream.stitch.Stitcher` (the class every offline stitch
uses, so the live map equals an offline stitch of the same images). A frame's position comes
from its PosX/PosY attributes; without them, from the planned positions (``set_positions``):
by uniqueId when the plan lists them, else in arrival order. The map pixel size comes from the
frame's PixelSize attribute, else from ``pixel_m``.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from ptychostream.ntndarray import Frame
from ptychostream.plugins.driver import FrameError
from ptychostream.stitch import Stitcher

log = logging.getLogger(__name__)


class StitchingPlugin:
    """Live stitched phase map. ``process`` returns no per-frame output; read ``image()``."""

    name = "Stitch"

    def __init__(self, pixel_m: float = 0.0, crop: int | None = None) -> None:
        self.pixel_m = float(pixel_m)
        self.crop = crop
        self._lock = threading.Lock()
        self._planned: np.ndarray | None = None
        self._planned_index: dict[int, int] = {}
        self._next_row = 0
        self._stitcher: Stitcher | None = None
        self.version = 0  # bumps at every change of the map, so hosts republish only when needed

    # ------------------------------------------------------------------ control
    def set_positions(self, positions_m: np.ndarray | None,
                      unique_ids: np.ndarray | None = None) -> None:
        """Plan a scan: the next map is sized for these (N, 2) x, y positions (m)."""
        with self._lock:
            if positions_m is None or len(positions_m) == 0:
                self._planned, self._planned_index = None, {}
            else:
                pos = np.asarray(positions_m, np.float64).reshape(-1, 2)
                if unique_ids is not None and len(unique_ids):
                    if len(unique_ids) != len(pos):
                        raise ValueError(f"{len(unique_ids)} uniqueIds for {len(pos)} positions")
                    self._planned_index = {int(u): i for i, u in enumerate(unique_ids)}
                else:
                    self._planned_index = {}
                self._planned = pos
        self.reset()

    def reset(self) -> None:
        """Start a new map (keeps the plan)."""
        with self._lock:
            self._stitcher = None
            self._next_row = 0
            self.version += 1

    @property
    def n_frames(self) -> int:
        s = self._stitcher
        return s.n_frames if s is not None else 0

    # ------------------------------------------------------------------ frames
    def check(self, frame: Frame) -> Frame:
        """Resolve position and pixel size; a frame with neither is malformed for stitching."""
        data = np.asarray(frame.data)
        if data.ndim != 2 or data.shape[0] != data.shape[1] or data.size == 0:
            raise FrameError(f"phase image shape {data.shape} is not square 2-D")
        attrs = frame.attributes
        with self._lock:
            pos = frame.position
            if pos is None:
                if self._planned is None:
                    raise FrameError("no PosX/PosY attributes and no Stitch:Positions table")
                if self._planned_index:
                    row = self._planned_index.get(int(frame.unique_id))
                    if row is None:
                        raise FrameError(f"uniqueId {frame.unique_id} is not in Stitch:Positions")
                else:
                    row = self._next_row
                    self._next_row += 1
                    if row >= len(self._planned):
                        raise FrameError(f"more frames than the {len(self._planned)} planned positions")
                pos = tuple(self._planned[row])
        if not all(np.isfinite(pos)):
            raise FrameError(f"position {pos} is not finite")
        pixel = float(attrs.get("PixelSize", 0.0) or 0.0) or self.pixel_m
        if not pixel > 0:
            raise FrameError("no PixelSize attribute and Stitch:PixelSize is 0")
        return Frame(data, frame.unique_id, frame.timestamp,
                     {**attrs, "PosX": pos[0], "PosY": pos[1], "PixelSize": pixel})

    def process(self, frames: list[Frame]) -> list[Frame]:
        for f in frames:
            with self._lock:
                if self._stitcher is None:  # the first frame of a map fixes pixel and frame size
                    self._stitcher = Stitcher(f.attributes["PixelSize"], f.data.shape[-1],
                                              crop=self.crop, positions_m=self._planned)
                stitcher = self._stitcher
            stitcher.add(f.data, f.position)
            self.version += 1
        return []

    def image(self) -> Frame | None:
        """The map as a Frame whose attributes place it: OriginX/OriginY (m), PixelSize, NumFrames."""
        s = self._stitcher
        if s is None or s.origin is None:
            return None
        while True:  # the map may grow (new origin) between reading origin and image: read again
            origin = s.origin
            img = s.image()
            if s.origin == origin:
                break
        return Frame(img, s.n_frames, 0.0,
                     {"OriginX": float(origin[0]), "OriginY": float(origin[1]),
                      "PixelSize": s.pixel_m, "NumFrames": s.n_frames})
