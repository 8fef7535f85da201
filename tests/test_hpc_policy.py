"""Continual-learning policy, executors, config and the Globus Compute serializer round trip."""

import concurrent.futures
import logging

import pytest

from ptychostream.hpc import ContinualPolicy, get_executor, load_config
from ptychostream.hpc.executors import HPCConfigError, resolve_endpoint_id
from ptychostream.hpc.transfer import collection_paths, transfer_config, transfer_files

EID = "4b116d3c-1703-4f8f-9f6f-39921e5864df"


def test_policy_match_suspends_until_periodic_check(caplog):
    p = ContinualPolicy(tolerance=0.1, check_interval_s=3600)
    caplog.set_level(logging.INFO, logger="ptychostream.hpc.policy")
    d = p.decide("s1", None, now=0)
    assert (d.action, d.state) == ("train", "active")  # no serving model validated yet
    d = p.decide("s2", 0.95, now=100)
    assert (d.action, d.state, d.next_check_at) == ("suspend", "suspended", 3700)
    assert "within tolerance" in d.reason
    d = p.decide("s3", None, now=200)  # scans before the check: nothing runs
    assert d.action == "suspend" and "next check" in d.reason
    d = p.decide("s4", None, now=3700)  # the periodic check
    assert d.action == "check"
    d = p.decide("s4", 0.93, now=3800)  # check passed
    assert (d.action, d.next_check_at) == ("suspend", 3800 + 3600)
    assert [h.scan_id for h in p.history] == ["s1", "s2", "s3", "s4", "s4"]
    assert all(r.getMessage().startswith("policy:") for r in caplog.records)
    assert len(caplog.records) == 5
    assert p.to_dict()["history"][1]["action"] == "suspend"


def test_policy_mismatch_trains_and_resumes():
    p = ContinualPolicy(tolerance=0.1, check_interval_s=60, resume_tolerance=0.2)
    p.decide("a", None, now=0)
    assert p.decide("b", 0.7, now=1).action == "train"  # mismatch while active: keep training
    assert p.decide("c", 0.92, now=2).action == "suspend"
    assert p.decide("d", None, now=70).action == "check"
    d = p.decide("d", 0.85, now=71)  # 15% off: above tolerance but within resume_tolerance
    assert (d.action, d.state) == ("suspend", "suspended")
    d = p.decide("e", None, now=200)
    assert d.action == "check"
    d = p.decide("e", 0.6, now=201)  # large mismatch: new features -> resume
    assert (d.action, d.state, d.next_check_at) == ("train", "active", None)
    assert "resumed" in d.reason
    assert p.decide("f", None, now=202).action == "train"


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError):
        ContinualPolicy(tolerance=0)
    with pytest.raises(ValueError):
        ContinualPolicy(check_interval_s=-1)
    with pytest.raises(ValueError):
        ContinualPolicy(tolerance=0.2, resume_tolerance=0.1)
    with pytest.raises(ValueError, match="SSIM"):
        ContinualPolicy().decide("x", 1.5)


def test_min_train_scans_delays_suspension():
    p = ContinualPolicy(tolerance=0.1, min_train_scans=2)
    p.decide("a", None, now=0)
    assert p.decide("b", 0.99, now=1).action == "train"
    assert p.decide("c", 0.99, now=2).action == "suspend"


def test_endpoint_from_argument_env_and_config(tmp_path, monkeypatch):
    monkeypatch.delenv("PTYCHOSTREAM_GC_ENDPOINT", raising=False)
    monkeypatch.setenv("PTYCHOSTREAM_HPC_CONFIG", str(tmp_path / "none.toml"))
    with pytest.raises(HPCConfigError, match="does not exist"):
        resolve_endpoint_id()
    cfg = tmp_path / "hpc.toml"
    cfg.write_text(f'[compute]\nendpoint_id = "{EID}"\n')
    monkeypatch.setenv("PTYCHOSTREAM_HPC_CONFIG", str(cfg))
    assert resolve_endpoint_id() == EID
    assert load_config()["compute"]["endpoint_id"] == EID
    other = "11111111-2222-3333-4444-555555555555"
    monkeypatch.setenv("PTYCHOSTREAM_GC_ENDPOINT", other)
    assert resolve_endpoint_id() == other  # environment beats the file
    assert resolve_endpoint_id(EID) == EID  # argument beats both
    monkeypatch.setenv("PTYCHOSTREAM_GC_ENDPOINT", "not-a-uuid")
    with pytest.raises(HPCConfigError, match="not a UUID"):
        resolve_endpoint_id()
    cfg.write_text("[compute\n")
    monkeypatch.delenv("PTYCHOSTREAM_GC_ENDPOINT")
    with pytest.raises(HPCConfigError, match="TOML"):
        resolve_endpoint_id()


def test_local_executor_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("PTYCHOSTREAM_GC_ENDPOINT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/ptychostream/hpc.toml
    monkeypatch.delenv("PTYCHOSTREAM_HPC_CONFIG", raising=False)
    with get_executor() as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        from ptychostream.hpc.policy import ContinualPolicy as P

        assert ex.submit(P(tolerance=0.2).decide, "s", 0.9, 5.0).result().action == "suspend"


def test_local_worker_progress_bars_leave_no_semaphore(tmp_path):
    """pty-chi draws tqdm bars in the worker; a killed worker must not leave a named semaphore
    that Python reports as leaked when the caller ends (as ``make demo`` did)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        from ptychostream.hpc.executors import LocalExecutor

        def bars():
            from tqdm import tqdm
            return sum(tqdm(range(3)))

        ex = LocalExecutor()
        print("sum", ex.submit(bars).result())
        ex.terminate()
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "sum 3" in run.stdout
    assert "leaked semaphore" not in run.stderr


def test_transfer_config_and_paths(tmp_path):
    cfg = tmp_path / "hpc.toml"
    cfg.write_text("[compute]\n")
    assert transfer_config(str(cfg)) is None
    # not configured: files stay where they are (shared filesystem)
    r = transfer_files(["/data/a.h5"], config_path=str(cfg))
    assert r == {"task_id": None, "done": True, "files": [{"source": "/data/a.h5", "destination": "/data/a.h5"}]}
    cfg.write_text(f'[transfer]\nclient_id = "{EID}"\nsource_collection = "{EID}"\n')
    with pytest.raises(HPCConfigError, match="destination_collection"):
        transfer_config(str(cfg))
    cfg.write_text(
        f'[transfer]\nclient_id = "{EID}"\nsource_collection = "{EID}"\n'
        f'destination_collection = "{EID}"\nsource_root = "/gdata/ptycho"\n'
        f'destination_root = "/eagle/proj/ptycho"\n'
    )
    t = transfer_config(str(cfg))
    assert collection_paths("/gdata/ptycho/2026/scan1.h5", t) == (
        "/2026/scan1.h5", "/eagle/proj/ptycho/2026/scan1.h5")
    with pytest.raises(HPCConfigError, match="not under"):
        collection_paths("/home/x/scan.h5", t)


def test_functions_survive_globus_compute_serializer(tmp_path):
    """Every remote function and typical arguments go through the SDK's own serializer and the
    deserialized function still runs (here: the cheap ones; the heavy ones are checked to
    deserialize to the same importable function)."""
    from globus_compute_sdk.serialize import ComputeSerializer

    import ptychostream.hpc as hpc

    serde = ComputeSerializer()
    calls = [
        (hpc.reconstruct, ("/data/scan.h5", "/data/recon.h5"), {"iterations": 50, "probe_modes": 3}),
        (hpc.make_labels, ("/data/scan.h5", "/data/recon.h5", "/data/labels.h5"), {}),
        (hpc.corpus_append, (str(tmp_path / "corpus"), "/data/labels.h5"), {}),
        (hpc.train, (str(tmp_path / "corpus"), str(tmp_path / "m")),
         {"warm_start": None, "epochs": 3, "max_pairs": 100, "lr_max": 5e-4}),
        (hpc.validate, ("/m/model.onnx", "/data/scan.h5", "/data/recon.h5"), {"max_frames": 10}),
        (hpc.transfer_files, (["/data/scan.h5"],), {"wait": False}),
    ]
    for fn, args, kwargs in calls:
        f2, a2, k2 = serde.check_strategies(fn, *args, **kwargs)
        assert f2.__module__ == fn.__module__ and f2.__qualname__ == fn.__qualname__
        assert (a2, k2) == (args, kwargs)
    # round-tripped functions run: corpus_append on a missing file fails with its own error
    f2, a2, k2 = serde.check_strategies(hpc.corpus_append, *calls[2][1])
    with pytest.raises(hpc.CorpusError, match="does not exist"):
        f2(*a2, **k2)
    # results are plain values and survive the data serializer too
    policy = hpc.ContinualPolicy()
    decision = serde.deserialize(serde.serialize(policy.decide("s", 0.5, now=1.0).to_dict()))
    assert decision["action"] == "train"
