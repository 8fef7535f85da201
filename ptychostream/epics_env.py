"""Keep EPICS traffic on loopback: no searches or beacons to the broadcast address.

Tests, the demo and the benchmarks call :func:`use_loopback` before importing p4p, pvapy or
caproto; the IOC and the other services never do unless their user asks for it
(``--loopback``, see :func:`configure`): on a beamline they follow the host's EPICS
environment. The values are those of shared/epics-loopback.env; already-set variables are kept.
"""

from __future__ import annotations

import os

LOOPBACK = {
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
}


def use_loopback(force: bool = False) -> dict[str, str]:
    """Set the loopback EPICS variables (``force`` overrides values already set)."""
    for key, value in LOOPBACK.items():
        if force:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in LOOPBACK}


def configure(loopback: bool = False) -> None:
    """Apply a command's ``--loopback`` choice (a try-out on one machine); without it nothing
    is changed and the host's EPICS environment holds."""
    if loopback:
        use_loopback()
