"""ptychostream: real-time streaming ptychography for EPICS beamlines.

Core (this package): simulation, geometry, scan files, PtychoNN 2.0, inference engines,
stitching, SSIM, PV names. Subpackages: ``ioc``, ``plugins``, ``bluesky_plans``, ``hpc``.
"""

import logging

__version__ = "0.1.0"


def setup_logging(level: int | str = logging.INFO) -> None:
    """One log format for every ptychostream command."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # caproto logs every channel's connect/disconnect at INFO: noise for an operator
        for name in ("caproto", "caproto.ch", "caproto.ctx", "caproto.bcast"):
            logging.getLogger(name).setLevel(logging.WARNING)
