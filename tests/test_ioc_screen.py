"""The Phoebus screen names only PVs of the table, and a running IOC serves every one of them."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from importlib.resources import files

from ptychostream.pvnames import PVS

SCREEN = files("ptychostream.ioc") / "screens" / "ptychostream.bob"


def screen_suffixes() -> list[str]:
    root = ET.fromstring(SCREEN.read_text())
    names = [e.text.strip() for e in root.iter("pv_name") if e.text and "$(pv_name)" not in e.text]
    out = []
    for name in names:
        name = name.removeprefix("pva://").removeprefix("ca://")
        assert name.startswith("$(P)"), f"{name} does not use the $(P) macro"
        out.append(name.removeprefix("$(P)"))
    return out


def test_screen_pvs_are_in_the_table():
    suffixes = screen_suffixes()
    missing = [s for s in suffixes if s not in PVS]
    assert not missing, f"screen names PVs the IOC does not serve: {missing}"
    for needed in ["NN:Phase", "Stitch:Image", "NN:ModelVersion_RBV", "NN:ModelStatus_RBV",
                   "QA:SSIM", "NN:ArrayRate_RBV", "NN:DroppedArrays_RBV", "NN:BatchSize",
                   "NN:EnableCallbacks", "Stitch:Reset", "Stitch:NumFrames_RBV"]:
        assert needed in suffixes, f"the screen lacks {needed}"


def test_running_ioc_serves_every_screen_pv(epics_env):
    from p4p.client.thread import Context

    from ptychostream.ioc.server import EdgeIOC

    prefix = epics_env["prefix"]
    with EdgeIOC(prefix) as _, Context("pva") as ctx:
        names = [prefix + s for s in sorted(set(screen_suffixes()))]
        values = ctx.get(names, timeout=10, throw=False)
    failed = [n for n, v in zip(names, values, strict=True) if isinstance(v, Exception)]
    assert not failed, f"not served: {failed}"
