"""The `ptychostream` command: lazy --help, no EPICS settings of its own, deploy to a real IOC,
export to ONNX, import."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ptychostream.cli import BAD_INPUT, REFUSED, UNREACHABLE, main

HEAVY = ("torch", "onnxruntime", "p4p", "pvaccess", "caproto")


def run_py(code: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_help_is_lean_and_no_command_sets_epics_variables():
    code = ("import sys\nfrom ptychostream.cli import main\n"
            "for argv in (['--help'], ['deploy', '--help'], ['export', '--help'], "
            "['import', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    out = run_py(code, clean)
    assert out.endswith("[]"), out  # no heavy import for --help
    env_code = ("import os\nfrom ptychostream.cli import main\n"
                "main(['--log-level', 'WARNING', 'pvs'])\n"
                "print('A', sorted(k for k in os.environ if k.startswith('EPICS_')))\n"
                "main(['--loopback', '--log-level', 'WARNING', 'pvs'])\n"
                "print('B', os.environ.get('EPICS_PVA_ADDR_LIST'))")
    out = run_py(env_code, clean).splitlines()
    assert "A []" in out  # a beamline host's environment is left as it is
    assert "B 127.0.0.1" in out  # --loopback is the explicit choice


def test_export_writes_onnx_with_a_fixed_batch(tmp_path, capsys):
    import onnxruntime as ort
    import torch

    from ptychostream.model import PtychoNN2

    torch.manual_seed(0)
    sd = tmp_path / "best.pt"
    torch.save({"model_state_dict": PtychoNN2().state_dict()}, sd)  # a training checkpoint
    out = tmp_path / "best.onnx"
    assert main(["export", str(sd), str(out), "--batch-size", "8"]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [8, 1, 128, 128]
    phase = sess.run(None, {"diffraction": np.zeros((8, 1, 128, 128), np.float32)})[0]
    assert phase.shape == (8, 1, 128, 128)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    assert main(["export", str(bad), str(tmp_path / "x.onnx")]) == BAD_INPUT
    assert "not a loadable PyTorch file" in capsys.readouterr().err


def test_deploy_reports_the_version_or_the_refusal(epics_env, tmp_path, capsys):
    import torch

    from ptychostream.ioc.server import EdgeIOC
    from ptychostream.model import PtychoNN2, export_onnx

    torch.manual_seed(0)
    good = tmp_path / "good.onnx"
    export_onnx(PtychoNN2(), good)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    prefix = epics_env["prefix"]
    with EdgeIOC(prefix) as ioc:
        ioc.wait_model(30)
        assert main(["deploy", prefix, str(good), "--name", "first"]) == 0
        assert f"{prefix}: serving first as model version 1" in capsys.readouterr().out
        assert main(["deploy", prefix, str(bad)]) == REFUSED
        err = capsys.readouterr().err
        assert "refused bad.onnx" in err and ioc.inference.model_version == 1
    assert main(["deploy", prefix, str(good), "--timeout", "1"]) == UNREACHABLE
    assert "no answer" in capsys.readouterr().err
    assert main(["deploy", prefix, str(tmp_path / "absent.onnx")]) == BAD_INPUT


@pytest.mark.parametrize("fmt", ["auto", "cxi"])
def test_import_command(tmp_path, small_scan, capsys, fmt):
    from test_importers import write_cxi  # tests/ is on sys.path (pytest rootdir conftest)

    src = write_cxi(tmp_path / "scan.cxi", small_scan)
    out = tmp_path / "ours.h5"
    assert main(["import", fmt, str(src), str(out)]) == 0
    assert f"{small_scan.n_frames} frames" in capsys.readouterr().out
    src.write_bytes(b"junk")
    assert main(["import", fmt, str(src), str(out)]) == BAD_INPUT
