"""Live views a scientist wants during a scan: the IOC's stitched phase map.

    from ptychostream.bluesky_plans.live import LiveStitchedMap
    RE.subscribe(LiveStitchedMap(ioc))        # redraws Stitch:Image as the scan goes

The best-effort callback already maps ``det_total_counts`` over the two stage axes (a
transmission map); this one shows what the IOC makes of the frames: the phase, stitched.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from bluesky.callbacks.mpl_plotting import QtAwareCallback

log = logging.getLogger(__name__)


class LiveStitchedMap(QtAwareCallback):
    """Fetch the IOC's ``Stitch:Image`` (pvAccess) at most every ``period`` s while a run's
    primary events arrive, and once more at its end, and show it in an image on ``ax``.

    ``image``/``extent_m`` hold the last map fetched (NaN where nothing was stitched). Runs in
    the GUI thread with Qt backends (bluesky's teleporter), so it is safe at IPython."""

    def __init__(self, ioc, period: float = 1.0, ax=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ioc, self.period, self.ax = ioc, float(period), ax
        self.image: np.ndarray | None = None
        self.extent_m: tuple[float, float, float, float] | None = None
        self.frames = 0
        self._artist = None
        self._last = 0.0
        self._primary: set[str] = set()

    def start(self, doc) -> None:
        self._primary.clear()
        self._last = 0.0
        self._title = f"{doc.get('scan_name', '')} (scan {doc.get('scan_id', '')})".strip()

    def descriptor(self, doc) -> None:
        if doc.get("name") == "primary":
            self._primary.add(doc["uid"])

    def event(self, doc) -> None:
        if doc["descriptor"] in self._primary and time.monotonic() - self._last >= self.period:
            self.update()

    def stop(self, doc) -> None:
        self.update()

    def update(self) -> None:
        """Fetch the map now and redraw; a failed fetch is logged, never raised into the run."""
        self._last = time.monotonic()
        try:
            from ptychostream.ioc.client import stitched_geometry

            img = self.ioc.stitched()
            if img.size == 0:
                return
            (x0, y0), px = stitched_geometry(img)
        except Exception as exc:  # a live view must not fail a scan
            log.debug("stitched map not available: %s", exc)
            return
        self.image = np.asarray(img, np.float32)
        rows, cols = self.image.shape
        # pixel centres at origin + index * px; extent in um, as the stage reads
        self.extent_m = (x0 - px / 2, x0 + (cols - 0.5) * px, y0 - px / 2, y0 + (rows - 0.5) * px)
        self.frames = int(getattr(img, "attrib", {}).get("NumFrames", 0) or 0)
        self._draw()

    def _draw(self) -> None:
        import matplotlib.pyplot as plt

        if self.ax is None:
            _, self.ax = plt.subplots(num="ptychostream: stitched phase")
        extent = [v * 1e6 for v in self.extent_m]
        if self._artist is None or self._artist.axes is not self.ax:
            self._artist = self.ax.imshow(self.image, origin="lower", extent=extent,
                                          cmap="viridis")
            self.ax.figure.colorbar(self._artist, ax=self.ax, label="phase (rad)")
            self.ax.set_xlabel("x (um)")
            self.ax.set_ylabel("y (um)")
        else:
            self._artist.set_data(self.image)
            self._artist.set_extent(extent)
            finite = self.image[np.isfinite(self.image)]
            if finite.size:
                self._artist.set_clim(float(finite.min()), float(finite.max()))
        self.ax.set_title(f"{self._title}: {self.frames} frames stitched", fontsize=9)
        self.ax.figure.canvas.draw_idle()
