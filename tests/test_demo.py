"""`ptychostream demo --quick` end to end, as a newcomer runs it: a subprocess on isolated ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(600)
def test_demo_quick_completes_and_writes_its_figures(epics_env, tmp_path):
    out = tmp_path / "demo"
    cli = Path(sys.executable).with_name("ptychostream")
    proc = subprocess.run(
        [str(cli), "demo", "--quick", "--out", str(out), "--prefix", epics_env["prefix"]],
        env=dict(os.environ), capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    # the table is printed and the summary written
    assert "SSIM live/truth" in proc.stdout and "round" in proc.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["prefix"] == epics_env["prefix"]
    train, test, sparse = summary["scans"]
    assert [s["features"] for s in summary["scans"]] == ["random", "letters", "letters"]

    # training: no model yet, yet every frame reached the map (refined with the probe); then a
    # model was trained and arrived at the IOC by a PV write
    assert train["model_version"] == 0
    assert train["ioc_frames"] == train["frames"] and train["drops"] == 0
    (round1,) = summary["rounds"]
    assert round1["deployed"] == "yes" and round1["pairs"] == train["frames"]
    # the test scans streamed live through the IOC, which inferred and stitched every frame
    for s in (test, sparse):
        assert s["model_version"] == 1
        assert s["ioc_frames"] == s["frames"] and s["drops"] == 0
        for key in ("ssim_live_truth", "ssim_live_iterative", "ssim_iterative_truth"):
            assert -1.0 <= s[key] <= 1.0
        # every map beside the flat map and the truth ceiling (the true phases, stitched)
        figs = s["figures"]
        assert {"flat", "ceiling", "live", "iterative"} <= set(figs)
        assert figs["flat"]["corr"] == 0 and figs["ceiling"]["corr"] > 0.99
        assert figs["ceiling"]["mae"] < figs["live"]["mae"] < figs["flat"]["mae"]
    assert sparse["overlap"] < test["overlap"]
    assert summary["qa"]["ssim"] == pytest.approx(sparse["validate_ssim"], abs=1e-6)
    assert summary["qa"]["decision"].startswith(sparse["decision"][:40])

    # figures: stitched inference beside iterative beside truth; SSIM over training rounds
    from matplotlib.image import imread

    for name in ("stitched_test.png", "stitched_sparse.png", "ssim_rounds.png"):
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.01  # not blank


def test_cli_lists_the_pv_table_and_refuses_bad_arguments():
    cli = Path(sys.executable).with_name("ptychostream")
    proc = subprocess.run([str(cli), "pvs", "--prefix", "X:"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert proc.returncode == 0
    from ptychostream.pvnames import PVS

    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == ["X:" + s for s in PVS]
    bad = subprocess.run([str(cli), "demo", "--quick", "--no-such-option"], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ))
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
