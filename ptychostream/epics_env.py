"""Keep EPICS traffic on loopback: no searches or beacons to the broadcast address.

Tests, the demo and the benchmarks call :func:`use_loopback` before importing p4p, pvapy or
caproto; the IOC and the other services never do unless their user asks for it
(``--loopback``, see :func:`configure`): on a beamline they follow the host's EPICS
environment. The values are those of shared/epics-loopback.env; already-set variables are kept.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

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


def pva_server_conf() -> dict:
    """p4p Server ``conf`` that serves on the configured pvAccess port, or, when another server
    on this host has it (a detector IOC beside ours), on a random port found by search as
    usual, said in one INFO line instead of pvxs's "unable to bind port" warning."""
    port = int(os.environ.get("EPICS_PVAS_SERVER_PORT",
                              os.environ.get("EPICS_PVA_SERVER_PORT", "5075")))
    # the interfaces the server will bind (as pvxs reads them), each tried as it would be
    interfaces = os.environ.get("EPICS_PVAS_INTF_ADDR_LIST", "").split() or ["0.0.0.0"]
    for addr in interfaces:
        with socket.socket() as s:
            try:
                s.bind((addr.split(":")[0], port))
            except OSError:
                log.info("pvAccess port %d is taken by another server on this host: serving "
                         "on a random port (clients find it by search)", port)
                return {"EPICS_PVAS_SERVER_PORT": "0"}
    return {}


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (EPICS uses one number for both): tests
    and benchmarks give each of their servers ports of its own."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
