"""Moving scan files between facilities with Globus Transfer (globus-sdk).

Used when both collections are configured in the HPC config file (docs/hpc.md)::

    [transfer]
    client_id = "..."                 # a native app registered at app.globus.org
    source_collection = "..."         # the beamline's collection (UUID)
    destination_collection = "..."    # the HPC facility's collection (UUID)
    source_root = "/gdata/ptycho"     # local folder the source collection serves at "/"
    destination_root = "/eagle/ptycho" # where those files appear for the endpoint

Otherwise files are assumed to be on a shared or local folder and nothing moves.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from .executors import HPCConfigError, _check_uuid, load_config

log = logging.getLogger(__name__)

REQUIRED = ("client_id", "source_collection", "destination_collection")


def transfer_config(config_path: str | None = None) -> dict | None:
    """The validated [transfer] section, or None when transfer is not configured."""
    section = load_config(config_path).get("transfer")
    if not section:
        return None
    missing = [k for k in REQUIRED if not section.get(k)]
    if missing:
        raise HPCConfigError(f"[transfer] lacks {', '.join(missing)}")
    for k in REQUIRED:
        section[k] = _check_uuid(section[k], f"[transfer] {k}")
    section.setdefault("source_root", "/")
    section.setdefault("destination_root", "/")
    return section


def collection_paths(local_path: str, cfg: dict) -> tuple[str, str]:
    """(path on the source collection, path on the destination collection) of a local file
    under ``source_root``; the destination mirrors the source layout under ``destination_root``."""
    src_root = PurePosixPath(cfg.get("source_root", "/"))
    path = PurePosixPath(local_path)
    try:
        rel = path.relative_to(src_root)
    except ValueError as exc:
        raise HPCConfigError(f"{local_path} is not under source_root {src_root}") from exc
    return "/" + str(rel), str(PurePosixPath(cfg.get("destination_root", "/")) / rel)


def transfer_files(
    paths: list[str], config_path: str | None = None, wait: bool = True, timeout_s: int = 3600,
    label: str = "ptychostream scans",
) -> dict:
    """Copy local files from the beamline collection to the HPC collection.

    Returns {"task_id", "done", "files": [{"source", "destination"}]} — ``destination`` is
    the path the endpoint reads. When transfer is not configured returns the paths unchanged
    with task_id None (shared filesystem). The first call opens a Globus login (tokens are then
    stored by globus-sdk's UserApp); checksums are verified.
    """
    cfg = transfer_config(config_path)
    if cfg is None:
        return {"task_id": None, "done": True,
                "files": [{"source": p, "destination": p} for p in paths]}
    import globus_sdk

    files = [dict(zip(("source", "destination"), collection_paths(p, cfg), strict=True)) for p in paths]
    app = globus_sdk.UserApp("ptychostream", client_id=cfg["client_id"])
    tc = globus_sdk.TransferClient(app=app)
    # mapped (GCS v5) collections need a data_access consent
    tc.add_app_data_access_scope([cfg["source_collection"], cfg["destination_collection"]])
    data = globus_sdk.TransferData(
        cfg["source_collection"], cfg["destination_collection"], label=label,
        sync_level="checksum", verify_checksum=True,
    )
    for f in files:
        data.add_item(f["source"], f["destination"])
    task_id = tc.submit_transfer(data)["task_id"]
    log.info("Globus transfer %s: %d file(s) %s -> %s", task_id, len(files),
             cfg["source_collection"], cfg["destination_collection"])
    done = False
    if wait:
        done = tc.task_wait(task_id, timeout=timeout_s, polling_interval=10)
        status = tc.get_task(task_id)["status"]
        if status != "SUCCEEDED":
            raise RuntimeError(f"Globus transfer {task_id} ended {status}" if done
                               else f"Globus transfer {task_id} still {status} after {timeout_s} s")
    return {"task_id": task_id, "done": done, "files": files}
