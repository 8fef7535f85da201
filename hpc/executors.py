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
import os
import signal
import sys
import threading
import uuid
import warnings
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


def _worker_init() -> None:
    """Worker start-up: a terminal's Ctrl-C (sent to the whole process group) is the caller's to
    handle, not the worker's; and a worker ends when its caller dies (no orphans, Linux).
    Progress bars (pty-chi's tqdm) lock with a thread lock: tqdm's default multiprocessing
    lock is a named semaphore that a killed or recycled worker leaves behind, and Python warns
    of it ("leaked semaphore objects") when the demo ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import threading

        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:  # no tqdm in this environment: nothing creates the semaphore
        pass
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # no libc prctl: the pool's own shutdown still applies
            pass


class LocalExecutor(concurrent.futures.Executor):
    """The local process pool: safe to create at module level and to interrupt.

    A loky pool (well-kept, the one joblib uses): its workers are fresh interpreters (no
    inherited EPICS or torch threads, no fork after threads started) that do not re-import the
    caller's ``__main__``, so a script without an ``if __name__ == "__main__"`` guard runs once,
    not once more per worker. Workers start at the first ``submit`` and ignore SIGINT;
    :meth:`terminate` stops a running task now (an aborted plan) and the next ``submit`` starts
    a fresh pool. Hand-written part: only this lazy start / kill-and-restart wrapper.
    """

    def __init__(self, max_workers: int = 1) -> None:
        if int(max_workers) < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers!r}")
        self.max_workers = int(max_workers)
        self._pool = None
        self._lock = threading.Lock()
        self._shutdown = False

    def _get_pool(self):
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a LocalExecutor after shutdown")
            if self._pool is None:
                from loky import ProcessPoolExecutor

                # loky replaces a worker that grew 300 MB (torch's caches after a training
                # round do) and warns of a leak; the fresh worker is what we want, the warning
                # only alarms the user
                warnings.filterwarnings("ignore", message="A worker was restarted while some",
                                        category=UserWarning)

                self._pool = ProcessPoolExecutor(max_workers=self.max_workers,
                                                 initializer=_worker_init)
            return self._pool

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        return self._get_pool().submit(fn, *args, **kwargs)

    def terminate(self) -> None:
        """Kill the workers now (running tasks fail, pending ones are cancelled); a later
        ``submit`` starts a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            log.info("stopping the local HPC worker(s)")
            pool.shutdown(wait=True, kill_workers=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        if cancel_futures:  # what is still queued will not run; a running task is killed
            pool.shutdown(wait=wait, kill_workers=True)
        else:
            pool.shutdown(wait=wait)


def get_executor(
    endpoint_id: str | None = None, config_path: str | None = None, max_workers: int = 1
) -> concurrent.futures.Executor:
    """A Globus Compute executor for the configured endpoint, else a :class:`LocalExecutor`.

    Local workers are fresh interpreters, so a reconstruction's process-wide torch settings
    never leak into the caller; ``max_workers`` 1 keeps HPC jobs from competing for a small
    machine. Safe to call at module level of a script (workers do not re-run it).
    """
    eid = resolve_endpoint_id(endpoint_id, config_path)
    if eid is None:
        log.info("HPC functions run locally (process pool, %d worker(s))", max_workers)
        return LocalExecutor(max_workers=max_workers)
    from globus_compute_sdk import Executor

    log.info("HPC functions run on Globus Compute endpoint %s", eid)
    return Executor(endpoint_id=eid)
