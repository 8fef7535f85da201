"""The Phoebus screen: read with the rules Phoebus applies, it names only widgets Phoebus has and
PVs of the table, every action and structured property is where Phoebus looks (one level), it
is what its generator writes, and a running IOC serves every PV it names."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from importlib.resources import files
from pathlib import Path

import pytest

from ptychostream.pvnames import PVS

SCREEN = files("ptychostream.ioc") / "screens" / "ptychostream.bob"
GENERATOR = Path(__file__).resolve().parents[1] / "ioc" / "screens" / "make_screen.py"

#: the widget types of Phoebus's display builder (org.csstudio.display.builder.model.widgets)
PHOEBUS_WIDGETS = {
    "action_button", "arc", "array", "bool_button", "byte_monitor", "checkbox", "choice",
    "combo", "databrowser", "ellipse", "embedded", "fileselector", "group", "image", "label",
    "led", "meter", "multi_state_led", "navtabs", "picture", "polygon", "polyline",
    "progressbar", "radio", "rectangle", "scaledslider", "scrollbar", "slide_button", "spinner",
    "stripchart", "symbol", "table", "tabs", "tank", "textentry", "textsymbol", "textupdate",
    "thermometer", "3dviewer", "webbrowser", "xyplot",
}
FONT_PROPERTIES = {"font", "title_font", "label_font", "scale_font"}
PV_TAGS = {"pv_name", "y_pv", "x_pv", "error_pv"}


def phoebus_problems(root: ET.Element) -> list[str]:
    """What Phoebus would ignore or refuse: it reads structured properties one level deep."""
    problems = []
    parent = {child: p for p in root.iter() for child in p}
    for el in root.iter():
        tag, kids = el.tag, list(el)
        if tag == "widget" and el.get("type") not in PHOEBUS_WIDGETS:
            problems.append(f"widget type {el.get('type')!r} is not a Phoebus widget")
        if tag == "actions" and (not kids or any(k.tag != "action" for k in kids)):
            problems.append(f"<actions> holds {[k.tag for k in kids]}, not <action> elements")
        if tag == "action":
            if parent.get(el) is None or parent[el].tag != "actions":
                problems.append("an <action> outside <actions>")
            if el.get("type") == "write_pv" and {k.tag for k in kids} < {"pv_name", "value"}:
                problems.append("a write_pv action without pv_name and value")
        if tag in FONT_PROPERTIES and parent.get(el) is not None and parent[el].tag != tag:
            if len(kids) != 1 or kids[0].tag != "font" or list(kids[0]) or not kids[0].get("size"):
                problems.append(f"<{tag}> is not one <font family= size= style=/>")
        if tag.endswith("_color") or (tag == "color" and parent.get(el) is not None
                                      and parent[el].tag in {"trace", "y_axis", "x_axis"}):
            if len(kids) != 1 or kids[0].tag != "color" or list(kids[0]):
                problems.append(f"<{tag}> is not one <color red= green= blue=/>")
        if tag == "color_map" and (any(k.tag == "color_map" for k in kids)
                                   or not any(k.tag in ("name", "section") for k in kids)):
            problems.append("<color_map> does not hold a <name> (or sections) directly")
        if tag == "color_bar" and any(list(k) for k in kids):
            problems.append("<color_bar> nests deeper than one level")
    return problems


def screen_suffixes(root: ET.Element) -> list[str]:
    out = []
    for el in root.iter():
        if el.tag not in PV_TAGS or not el.text or "$(pv_name)" in el.text:
            continue
        name = el.text.strip().removeprefix("pva://").removeprefix("ca://")
        assert name.startswith("$(P)"), f"{name} does not use the $(P) macro"
        out.append(name.removeprefix("$(P)"))
    return out


def test_the_screen_reads_as_phoebus_reads_it():
    root = ET.fromstring(SCREEN.read_text())
    assert root.tag == "display"
    assert phoebus_problems(root) == []
    buttons = {w.findtext("name"): w for w in root.iter("widget")
               if w.get("type") == "action_button"}
    for name, pv, value in (("Reset map", "Stitch:Reset", "1"),
                            ("Reset counters", "NN:ArrayCounter", "0")):
        action = buttons[name].find("actions/action")
        assert action.get("type") == "write_pv" and action.findtext("value") == value
        assert buttons[name].findtext("pv_name") == f"pva://$(P){pv}"
    for img in (w for w in root.iter("widget") if w.get("type") == "image"):
        assert img.findtext("color_map/name") == "VIRIDIS"
        assert img.findtext("color_bar/visible") == "true"
    charts = {w.findtext("name"): [t.findtext("y_pv") for t in w.iter("trace")]
              for w in root.iter("widget") if w.get("type") == "stripchart"}
    assert "pva://$(P)NN:ArrayRate_RBV" in charts["Rates"]
    assert "pva://$(P)QA:SSIM" in charts["Model history"]
    assert "pva://$(P)NN:ModelVersion_RBV" in charts["Model history"]


def test_the_rules_catch_the_nesting_phoebus_ignores():
    bad = ET.fromstring(
        '<display><widget type="action_button"><actions><actions><action type="write_pv">'
        "<pv_name>$(pv_name)</pv_name><value>1</value></action></actions></actions></widget>"
        '<widget type="label"><font><font><font family="Liberation Sans" size="14"/></font>'
        "</font></widget><widget type=\"image\"><color_map><color_map><name>VIRIDIS</name>"
        '</color_map></color_map></widget><widget type="fancy_plot"/></display>')
    problems = " ".join(phoebus_problems(bad))
    for expected in ("<actions> holds ['actions']", "<font> is not one", "<color_map>",
                     "'fancy_plot'"):
        assert expected in problems


def test_screen_pvs_are_in_the_table():
    suffixes = screen_suffixes(ET.fromstring(SCREEN.read_text()))
    missing = [s for s in suffixes if s not in PVS]
    assert not missing, f"screen names PVs the IOC does not serve: {missing}"
    for needed in ["NN:Phase", "Stitch:Image", "NN:ModelVersion_RBV", "NN:ModelName_RBV",
                   "NN:ModelStatus_RBV", "QA:SSIM", "QA:Decision", "NN:ArrayRate_RBV",
                   "Stitch:ArrayRate_RBV", "NN:DroppedArrays_RBV", "NN:BatchSize",
                   "NN:EnableCallbacks", "Stitch:Reset", "NN:ArrayCounter",
                   "Stitch:NumFrames_RBV"]:
        assert needed in suffixes, f"the screen lacks {needed}"


def test_the_committed_screen_is_the_generators_output():
    pytest.importorskip("phoebusgen")
    spec = importlib.util.spec_from_file_location("make_screen", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == SCREEN.read_text(), (
        "ioc/screens/ptychostream.bob is stale: run python ioc/screens/make_screen.py")


def test_running_ioc_serves_every_screen_pv(epics_env):
    from p4p.client.thread import Context

    from ptychostream.ioc.server import EdgeIOC

    prefix = epics_env["prefix"]
    suffixes = screen_suffixes(ET.fromstring(SCREEN.read_text()))
    with EdgeIOC(prefix) as _, Context("pva") as ctx:
        names = [prefix + s for s in sorted(set(suffixes))]
        values = ctx.get(names, timeout=10, throw=False)
    failed = [n for n, v in zip(names, values, strict=True) if isinstance(v, Exception)]
    assert not failed, f"not served: {failed}"
