"""Where the HPC functions run: a local process pool, or a Globus Compute endpoint.

Both are ``concurrent.futures.Executor``s, so callers submit the same way::

    with get_executor() as ex:                       # local (default)
        fut = ex.submit(reconstruct, scan_path, out_path)

The endpoint id comes from, in order: the ``endpoint_id`` argument, the environment variable
``PTYCHOSTREAM_GC_ENDPOINT``, the ``[compute] endpoint_id`` of a TOML config file
(``config_path``, else ``$PTYCHOSTREAM_HPC_CONFIG``, else ``~/.config/ptychostream/hpc.toml``).
No id anywhere: the local pool. See docs/hpc.md for both set-ups.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

ENV_ENDPOINT = "PTYCHOSTREAM_GC_ENDPOINT"
ENV_CONFIG = "PTYCHOSTREAM_HPC_CONFIG"
DEFAULT_CONFIG = Path("~/.config/ptychostream/hpc.toml")


class HPCConfigError(ValueError):
    """The HPC configuration file or an id in it is unusable: says why."""


def load_config(config_path: str | Path | None = None) -> dict:
    """The HPC config (TOML) as a dict; {} when no file is configured or the default is absent.

    An explicitly named file (argument or $PTYCHOSTREAM_HPC_CONFIG) must exist."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    explicit = config_path or os.environ.get(ENV_CONFIG)
    path = Path(explicit or DEFAULT_CONFIG).expanduser()
    if not path.exists():
        if explicit:
            raise HPCConfigError(f"HPC config file {path} does not exist")
        return {}
    try:
        cfg = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HPCConfigError(f"{path} is not valid TOML: {exc}") from exc
    cfg["_path"] = str(path)
    return cfg


def _check_uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError as exc:
        raise HPCConfigError(f"{what} {value!r} is not a UUID") from exc


def resolve_endpoint_id(endpoint_id: str | None = None, config_path: str | Path | None = None) -> str | None:
    """The Globus Compute endpoint id from argument, environment or config file, or None."""
    if endpoint_id:
        return _check_uuid(endpoint_id, "endpoint id")
    env = os.environ.get(ENV_ENDPOINT)
    if env:
        return _check_uuid(env, f"${ENV_ENDPOINT}")
    value = load_config(config_path).get("compute", {}).get("endpoint_id")
    return _check_uuid(value, "[compute] endpoint_id") if value else None


def get_executor(
    endpoint_id: str | None = None, config_path: str | None = None, max_workers: int = 1
) -> concurrent.futures.Executor:
    """A Globus Compute executor for the configured endpoint, else a local process pool.

    The local pool uses the "spawn" start method: each worker is a fresh interpreter (no
    inherited EPICS or torch threads), so a reconstruction's process-wide torch settings never
    leak into the caller. ``max_workers`` 1 keeps HPC jobs from competing for a small machine.
    """
    eid = resolve_endpoint_id(endpoint_id, config_path)
    if eid is None:
        log.info("HPC functions run locally (process pool, %d worker(s))", max_workers)
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=max_workers, mp_context=multiprocessing.get_context("spawn")
        )
    from globus_compute_sdk import Executor

    log.info("HPC functions run on Globus Compute endpoint %s", eid)
    return Executor(endpoint_id=eid)
