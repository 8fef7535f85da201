"""The continual-learning plan: dry runs touch nothing; a real run trains, deploys over
pvAccess to the real edge IOC, writes QA:SSIM/QA:Decision, and suspends when the model matches."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
from bluesky.simulators import check_limits, summarize_plan

from ptychostream.bluesky_plans.continual import ContinualLearner, continual_learning_plan
from ptychostream.bluesky_plans.devices import EdgeIOC, SimPtychoDetector, SimSpiralStage
from ptychostream.hpc import ContinualPolicy

SCAN = {"n_points": 30, "step": 100e-9, "exposure": 0.4}


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A real executor that counts what was submitted to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted: list[str] = []

    def submit(self, fn, *args, **kwargs):
        self.submitted.append(fn.__name__)
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def rig(epics_env, tmp_path):
    stage = SimSpiralStage(name="stage", limits=(-3e-6, 3e-6))
    det = SimPtychoDetector(name="det", stage=stage, pv_name=epics_env["prefix"] + "det:Image",
                            write_dir=tmp_path / "scans", field_of_view_m=1.6e-6)
    yield stage, det
    det.close()


def test_dry_run_submits_nothing_and_decides_nothing(RE, rig, epics_env, tmp_path, capsys):
    stage, det = rig
    ioc = EdgeIOC(epics_env["prefix"], name="ioc")
    with CountingExecutor() as ex:
        learner = ContinualLearner(ex, tmp_path / "work")
        scans = [dict(SCAN, sample=("train", 1)), dict(SCAN, sample=("train", 2))]
        summarize_plan(continual_learning_plan(det, stage, learner, scans, ioc=ioc))
        check_limits(continual_learning_plan(det, stage, learner, scans, ioc=ioc))
        assert ex.submitted == []
    assert learner.policy.history == [] and learner.history == []
    assert not (tmp_path / "work").exists()
    out = capsys.readouterr().out
    assert out.count("Open Run") == 2  # two scans (check_limits prints nothing)
    assert "det_sample_seed -> 2" in out
    assert "ioc_qa_decision -> dry run" in out
    assert "ioc_nn_model -> ('model.onnx', 'ptychonn-cl-000')" in out


def test_trains_deploys_then_suspends_when_the_model_matches(RE, rig, epics_env, tmp_path,
                                                             caplog):
    from ptychostream.hpc import get_executor
    from ptychostream.ioc.server import EdgeIOC as EdgeIOCServer

    stage, det = rig
    det.open()
    server = EdgeIOCServer(prefix=epics_env["prefix"], input_pv=det.pv_name.get(),
                           ca_mirror=True, batch_size=4)
    server.start()
    try:
        assert server.wait_model(30) == 0  # nothing serves yet
        ioc = EdgeIOC(epics_env["prefix"], name="ioc")
        ioc.wait_for_connection(timeout=10)
        # a loose tolerance: the test is the loop's wiring, not the network's accuracy
        policy = ContinualPolicy(tolerance=0.999, check_interval_s=3600.0)
        with get_executor(max_workers=1) as ex:
            learner = ContinualLearner(
                ex, tmp_path / "work", policy=policy,
                recon_options={"iterations": 6, "device": "cpu"},
                train_options={"epochs": 1, "progress": False, "seed": 0},
            )
            scans = [dict(SCAN, sample=("train", 1))] * 3  # the same features three times
            RE(continual_learning_plan(det, stage, learner, scans, ioc=ioc))
        version = ioc.nn.model_version.get()  # over Channel Access
        served_ssim = ioc.qa.ssim.get()
        decision = ioc.qa.decision.get()
        probe_status = ioc.stitch.probe_status.get()
        probe_in_use = server.stitching.probe_image()
    finally:
        server.stop()
    first, second, third = learner.history

    # each reconstruction's probe went to the IOC by one PV write and refines the live map
    assert first["probe_deployed"] and second["probe_deployed"]
    assert "probe-cl-001" in probe_status, probe_status
    from ptychostream.hpc import read_reconstruction

    recon_probe = read_reconstruction(second["recon"]).probe
    assert probe_in_use.data.shape[0] == recon_probe.shape[0]

    # scan 1: no model serving -> train, validate, deploy over pvAccess: the IOC serves v1
    assert [d["action"] for d in first["decisions"]] == ["train"]
    assert first["deployed"] and Path(first["deployed"]).suffix == ".onnx"
    assert version == 1
    assert first["new_ssim"] is not None

    # scan 2: the served model is validated against the new reconstruction, matches -> suspend
    assert [d["action"] for d in second["decisions"]] == ["train", "suspend"]
    assert second["serving_ssim"] is not None and second["deployed"] is None
    assert served_ssim == pytest.approx(second["serving_ssim"], abs=1e-9)
    assert decision.startswith("suspend: ")
    assert "train" not in second  # no training was run
    assert not (tmp_path / "work" / "model-cl-001").exists()

    # each round said on the console what serves now, the SSIM and the decision with its reason
    rounds = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round cl-")]
    assert len(rounds) == 3, rounds
    assert rounds[0].startswith("round cl-000: deployed a new model; serving v1 (ptychonn-cl-000)")
    assert "decision train: " in rounds[0]
    assert f"QA:SSIM {second['serving_ssim']:.3f}" in rounds[1]
    assert "kept the model; serving v1" in rounds[1] and "decision suspend: " in rounds[1]
    assert first["model_version"] == 1 and third["model_version"] == 1

    # scan 3: suspended, so no HPC time at all: not even a reconstruction
    assert [d["action"] for d in third["decisions"]] == ["suspend"]
    assert not (tmp_path / "work" / "cl-002.recon.h5").exists()
    assert (tmp_path / "scans" / "cl-002.h5").exists()  # the scan itself was still taken
    assert policy.suspended


def test_qa_pvs_follow_the_loop(RE, rig, epics_env, tmp_path):
    """QA:SSIM and QA:Decision written by the plan reach the IOC (read back over pvAccess);
    a model or a probe the IOC refuses does not stop the plan."""
    from ptychostream.bluesky_plans.continual import report_decision, report_ssim
    from ptychostream.hpc.policy import Decision
    from ptychostream.ioc.client import get
    from ptychostream.ioc.server import EdgeIOC as EdgeIOCServer

    server = EdgeIOCServer(prefix=epics_env["prefix"], ca_mirror=True)
    server.start()
    try:
        ioc = EdgeIOC(epics_env["prefix"], name="ioc")
        ioc.wait_for_connection(timeout=10)
        d = Decision("s1", "suspend", "x" * 400, 0.93, "suspended", 0.0, 3600.0)

        def plan():
            yield from report_ssim(ioc, 0.93)
            yield from report_decision(ioc, d)

        RE(plan())
        assert float(get(epics_env["prefix"], "QA:SSIM")) == pytest.approx(0.93)
        text = get(epics_env["prefix"], "QA:Decision")  # p4p ntstr: a str subclass
        assert text.startswith("suspend: xxx") and len(text) == 255

        # a model the IOC refuses: the plan goes on, the old model (none here) keeps serving
        from ptychostream.bluesky_plans.continual import ContinualLearner, deploy

        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not a model at all")
        learner = ContinualLearner(None, tmp_path / "work", serving_model="old.pt")
        RE(deploy(ioc, learner, {"onnx": str(bad), "state_dict": "new.pt"}, "bad"))
        assert learner.serving_model == "old.pt"

        # a probe the IOC refuses (all zero): the plan goes on, the status says why
        import numpy as np

        from ptychostream.bluesky_plans.continual import deploy_probe

        zero = tmp_path / "zero.npy"
        np.save(zero, np.zeros((128, 128), np.complex64))
        ok = RE(deploy_probe(ioc, str(zero), "zeros"))
        status = get(epics_env["prefix"], "Stitch:ProbeStatus_RBV")
        assert ok is not None and "zero" in status and status.severity == 2
        assert int(get(epics_env["prefix"], "NN:ModelVersion_RBV")) == 0
        assert get(epics_env["prefix"], "NN:ModelStatus_RBV").startswith("Refused")
    finally:
        server.stop()
