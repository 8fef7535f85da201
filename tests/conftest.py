"""Shared test set-up: EPICS on loopback before anything imports p4p, pvapy or caproto."""

from ptychostream.epics_env import use_loopback

use_loopback(force=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_scan():
    """A small simulated scan (64x... fast) shared by the core tests."""
    from ptychostream.simulation import simulate_scan

    return simulate_scan(n_positions=40, step_m=100e-9, seed=3)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
