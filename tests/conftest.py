"""Shared test set-up: EPICS on loopback before anything imports p4p, pvapy or caproto,
and a fixture that gives each test its own ports and PV prefix so servers never collide."""

from ptychostream.epics_env import free_port, use_loopback

use_loopback(force=True)

import itertools  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_counter = itertools.count()


@pytest.fixture
def epics_env(monkeypatch):
    """Isolated loopback EPICS for one test: unique PVA/CA ports set in os.environ (servers and
    clients created afterwards, and subprocesses, use them) and a unique PV prefix.

    Returns a dict: the variables set, plus 'prefix'. Pass ``env={**os.environ}`` to subprocesses.
    pvapy (pvAccessCPP) reads the ports once per process: run pvapy in a subprocess.
    """
    pva, pva_udp, ca, ca_rep = free_port(), free_port(), free_port(), free_port()
    env = {
        "EPICS_PVA_SERVER_PORT": str(pva),
        "EPICS_PVAS_SERVER_PORT": str(pva),
        "EPICS_PVA_BROADCAST_PORT": str(pva_udp),
        "EPICS_PVAS_BROADCAST_PORT": str(pva_udp),
        "EPICS_CA_SERVER_PORT": str(ca),
        "EPICS_CAS_SERVER_PORT": str(ca),
        "EPICS_CA_REPEATER_PORT": str(ca_rep),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    env["prefix"] = f"PST{os.getpid() % 1000}x{next(_counter)}:"
    return env


@pytest.fixture
def RE():
    """A real Bluesky RunEngine with the best-effort callback, headless."""
    from bluesky import RunEngine
    from bluesky.callbacks.best_effort import BestEffortCallback

    engine = RunEngine({})
    bec = BestEffortCallback()
    bec.disable_plots()
    engine.subscribe(bec)
    return engine


@pytest.fixture(scope="session")
def small_scan():
    """A small simulated scan shared by the core tests."""
    from ptychostream.simulation import simulate_scan

    return simulate_scan(n_positions=40, step_m=100e-9, seed=3)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
