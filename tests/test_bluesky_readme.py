"""The README's Bluesky snippet, run as a script against a real `ptychostream-ioc` (small sizes):
it runs once (the HPC worker does not re-run it), ends with status 0, and one Ctrl-C (SIGINT)
during an HPC task aborts it cleanly: status 130, no traceback, no worker left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptychostream.epics_env import free_port

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent


def readme_snippet(prefix: str) -> str:
    """The README's Bluesky code block, with this test's PV names and small sizes."""
    text = README.read_text()
    section = text[text.index("## At IPython (Bluesky)"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in [('"PTYCHO:"', f'"{prefix}"'), ('"SIM:Pva1:Image"', f'"{prefix}SIM:Pva1:Image"'),
                     ("n_points=400", "n_points=12"), ("n_points=963", "n_points=12"),
                     ("] * 10", "] * 1"), ('"iterations": 100', '"iterations": 3'),
                     ('"epochs": 50', '"epochs": 1, "progress": False')]:
        assert old in code, f"the README snippet no longer has {old}"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def ioc_env(tmp_path_factory):
    """Loopback ports of their own and a real `ptychostream-ioc --ca` on them, for the module."""
    env = dict(os.environ)
    pva, pva_udp, ca, ca_rep = free_port(), free_port(), free_port(), free_port()
    env.update({"EPICS_PVA_SERVER_PORT": str(pva), "EPICS_PVAS_SERVER_PORT": str(pva),
                "EPICS_PVA_BROADCAST_PORT": str(pva_udp), "EPICS_PVAS_BROADCAST_PORT": str(pva_udp),
                "EPICS_CA_SERVER_PORT": str(ca), "EPICS_CAS_SERVER_PORT": str(ca),
                "EPICS_CA_REPEATER_PORT": str(ca_rep), "PTYCHOSTREAM_GC_ENDPOINT": "",
                "HOME": str(tmp_path_factory.mktemp("home"))})
    prefix = f"RDME{os.getpid() % 1000}:"
    ioc = subprocess.Popen([str(BIN / "ptychostream-ioc"), "--prefix", prefix, "--input",
                            prefix + "SIM:Pva1:Image", "--ca", "--batch-size", "4",
                            "--log-level", "WARNING"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        probe = ("from p4p.client.thread import Context; "
                 f"Context('pva').get('{prefix}NN:ModelStatus_RBV', timeout=2)")
        deadline = time.monotonic() + 60
        while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             timeout=60).returncode:
            assert ioc.poll() is None and time.monotonic() < deadline, "the IOC did not start"
        yield env, prefix
    finally:
        ioc.terminate()
        ioc.wait(30)


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: no extra dependency)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(300)
def test_readme_snippet_runs_once_as_a_script(ioc_env, tmp_path):
    env, prefix = ioc_env
    script = tmp_path / "snippet.py"
    script.write_text(readme_snippet(prefix))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "BrokenProcessPool" not in out
    # each scan and each result once: the worker did not re-run the script
    assert out.count("Transient Scan ID: 1 ") == 1 and out.count("Transient Scan ID: 2 ") == 1
    assert proc.stdout.count("'sent': 12") == 1  # print(ioc.last_report)
    rounds = [line for line in out.splitlines() if "round cl-000:" in line]
    assert len(rounds) == 1, out[-3000:]
    assert "deployed a new model; serving v" in rounds[0] and "decision train" in rounds[0]
    assert (tmp_path / "scans" / "cl-000.h5").exists()


@pytest.mark.timeout(300)
def test_one_ctrl_c_aborts_the_script_cleanly(ioc_env, tmp_path):
    env, prefix = ioc_env
    script = tmp_path / "snippet.py"
    script.write_text(readme_snippet(prefix))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:  # the log: wait until the reconstruction runs on the worker
            lines.append(line)
            if "reconstruct submitted" in line or time.monotonic() > deadline:
                break
        assert any("reconstruct submitted" in x for x in lines), "".join(lines)[-3000:]
        time.sleep(1.0)
        workers = children_of(proc.pid)
        assert workers, "no worker process runs the reconstruction"
        proc.send_signal(signal.SIGINT)  # one Ctrl-C
        rest_out, rest_err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines) + rest_err
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "aborting the run" in err and "stopping its local worker" in err
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "worker processes outlived the script"
