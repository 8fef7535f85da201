"""Every HPC function through Globus Compute's own endpoint engine, started here without the cloud.

The GlobusComputeEngine (Parsl's HighThroughputExecutor: an interchange process and a worker pool,
what an endpoint's config.yaml names) runs the tasks; each is packed with the SDK's serializer
as the web service packs it and unpacked by the engine's own execute_task in a worker process,
in that worker's working directory. So: imports inside the functions, files by path, plain values
back, exceptions as TaskExecutionFailed.
"""

import os

import pytest
import torch
from test_hpc_fixtures import build_hpc_scans

from ptychostream.hpc import (
    ContinualPolicy,
    corpus_append,
    hpc_round,
    read_reconstruction,
    transfer_files,
)
from ptychostream.model import PtychoNN2

pytest.importorskip("globus_compute_endpoint")


@pytest.fixture(scope="module")
def hpc_scans(tmp_path_factory):
    return build_hpc_scans(tmp_path_factory)


def _listening(pids):
    """(pid, address) of every listening TCP socket of the given processes."""
    import psutil

    out = []
    for pid in pids:
        try:
            out += [(pid, c.laddr.ip) for c in psutil.Process(pid).net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return out


@pytest.mark.timeout(240)
def test_hpc_round_inside_globus_compute_engine(hpc_scans, tmp_path, monkeypatch):
    import psutil
    from globus_compute_sdk.errors import TaskExecutionFailed

    from ptychostream.hpc.local_endpoint import EngineExecutor

    monkeypatch.delenv("PTYCHOSTREAM_HPC_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no user config reaches transfer_files
    serving = tmp_path / "serving.pt"
    torch.manual_seed(0)
    torch.save(PtychoNN2().state_dict(), serving)
    cwd = os.getcwd()
    with EngineExecutor("GlobusComputeEngine", run_dir=tmp_path / "endpoint") as ex:
        # the tasks run in worker processes of the engine, in the engine's working directory
        where = ex.submit(os.getcwd).result(timeout=120)
        assert where.startswith(str(tmp_path / "endpoint")) and where != cwd
        moved = ex.submit(transfer_files, [hpc_scans["scans"][0]]).result(timeout=60)
        assert moved["files"][0]["destination"] == hpc_scans["scans"][0]
        report = hpc_round(
            ex, moved["files"][0]["destination"], str(tmp_path / "work"), str(tmp_path / "corpus"),
            serving_model=str(serving), policy=ContinualPolicy(tolerance=0.01),
            recon_options={"iterations": 3, "device": "cpu", "threads": 1},
            train_options={"epochs": 1, "batch_size": 8, "max_pairs": 16, "progress": False,
                           "threads": 1, "device": "cpu"},
        )
        # a remote failure comes back as the SDK raises it, with the remote error in it
        with pytest.raises(TaskExecutionFailed, match="CorpusError"):
            ex.submit(corpus_append, str(tmp_path / "c"), str(tmp_path / "missing.h5")).result(timeout=60)
        children = [p.pid for p in psutil.Process().children(recursive=True)]
        assert children, "the engine runs its interchange and workers as processes"
        listening = _listening(children)
        assert listening and all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening
    assert os.getcwd() == cwd
    assert [d["action"] for d in report["decisions"]] == ["train", "train"]
    assert read_reconstruction(report["recon"]).iterations == 3
    assert report["corpus"]["n_scans"] == 1 and report["train"]["n_pairs"] == 16
    assert -1.0 <= report["serving_validation"]["ssim"] <= 1.0
    assert -1.0 <= report["validation"]["ssim"] <= 1.0
    assert os.path.exists(report["train"]["state_dict"]) and os.path.exists(report["train"]["onnx"])

