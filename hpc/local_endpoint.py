"""Run the HPC functions inside a Globus Compute endpoint engine on this machine, no cloud.

:class:`EngineExecutor` is a ``concurrent.futures.Executor`` (like ``get_executor()``'s two) over
the engine an endpoint's ``config.yaml`` names (``GlobusComputeEngine``, the Parsl
HighThroughputExecutor with its interchange and worker-pool processes, or the
``ProcessPoolEngine`` / ``ThreadPoolEngine``). Each call travels as it does through the cloud:
function, args and kwargs serialized with the SDK's ``ComputeSerializer`` into one buffer inside a
messagepack ``Task``; the engine's own ``execute_task`` unpacks and runs it in a worker (in that
worker's working directory, with only what the buffer carried); the ``Result`` comes back
packed and is deserialized as the SDK does. So what passes here passes on an endpoint: imports
inside functions, files passed by path, plain values back. Use it to check an endpoint's
environment before registering it, and in tests::

    with EngineExecutor(run_dir="gce-run") as ex:
        hpc_round(ex, scan, work, corpus)

Everything listens on 127.0.0.1 only (interchange and workers are addressed by loopback).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

ENGINES = ("GlobusComputeEngine", "ProcessPoolEngine", "ThreadPoolEngine")


class EngineExecutor(concurrent.futures.Executor):
    """A Globus Compute engine started locally, behind the Executor interface.

    ``engine``: one of ENGINES. ``workers``: worker processes (threads for ThreadPoolEngine).
    ``run_dir``: the engine's run directory (logs, task working directory); a temporary one
    by default. ``engine_options``: passed to the engine (e.g. ``worker_init`` for the
    GlobusComputeEngine's provider is ``provider=...``).
    """

    def __init__(self, engine: str = "GlobusComputeEngine", workers: int = 1,
                 run_dir: str | os.PathLike | None = None, **engine_options) -> None:
        from globus_compute_sdk.serialize import ComputeSerializer

        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        self._tmp = None if run_dir else tempfile.TemporaryDirectory(prefix="ptycho-gce-")
        self.run_dir = Path(run_dir or self._tmp.name).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.engine_name = engine
        self.endpoint_id = uuid.uuid4()
        self._serde = ComputeSerializer()
        self._lock = threading.Lock()
        self._closed = False
        self.engine = self._make_engine(engine, workers, engine_options)
        self.engine.start(endpoint_id=self.endpoint_id, run_dir=str(self.run_dir))
        log.info("%s started locally in %s (endpoint id %s, not registered anywhere)",
                 engine, self.run_dir, self.endpoint_id)

    def _make_engine(self, engine: str, workers: int, options: dict):
        import globus_compute_endpoint.engines as engines

        if engine == "GlobusComputeEngine":
            from parsl.providers import LocalProvider

            if shutil.which("globus-compute-endpoint") is None:  # the engine launches its CLI
                bindir = os.path.dirname(sys.executable)
                os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
                log.info("put %s on PATH for the engine's interchange and workers", bindir)
            options = {
                "address": "127.0.0.1", "loopback_address": "127.0.0.1",
                "max_workers_per_node": workers,
                "provider": LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1),
                "job_status_kwargs": {"max_idletime": 3600.0, "strategy": "none"},
                **options,
            }
            return engines.GlobusComputeEngine(**options)
        if engine == "ProcessPoolEngine":
            import multiprocessing

            options = {"mp_context": multiprocessing.get_context("spawn"), **options}
        return getattr(engines, engine)(max_workers=workers, **options)

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        """Pack ``fn(*args, **kwargs)`` as a Globus Compute task and run it in the engine."""
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            buffer = self._serde.pack_buffers(
                [self._serde.serialize(fn), self._serde.serialize(args), self._serde.serialize(kwargs)])
            task_id = uuid.uuid4()
            packed = messagepack.pack(Task(task_id=task_id, task_buffer=buffer))
            task_f = GCFuture(gc_task_id=task_id)
            out: concurrent.futures.Future = concurrent.futures.Future()
            task_f.add_done_callback(lambda f: self._finish(f, out))
            self.engine.submit(task_f, packed, resource_specification={})
        return out

    def _finish(self, task_f, out: concurrent.futures.Future) -> None:
        """Unpack the engine's Result as the SDK does: a value, or TaskExecutionFailed."""
        from globus_compute_common import messagepack
        from globus_compute_sdk.errors import TaskExecutionFailed

        try:
            result = messagepack.unpack(task_f.result())
            if result.is_error:
                out.set_exception(TaskExecutionFailed(result.data, task_details=result.details))
            else:
                out.set_result(self._serde.deserialize(result.data))
        except Exception as exc:  # a broken payload must still end the future
            out.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.engine_name == "GlobusComputeEngine":
            self.engine.shutdown()
        else:
            self.engine.shutdown(block=wait)
        if self._tmp is not None:
            self._tmp.cleanup()
