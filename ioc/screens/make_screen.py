"""Writes ptychostream.bob, the operator's Phoebus screen, from the PV table.

    python ioc/screens/make_screen.py            # rewrites ioc/screens/ptychostream.bob

Made with phoebusgen (PyPI: Python objects that write .bob files the way Phoebus's own
examples nest them, one level per structured property) rather than hand-written XML: the
hand-written file had grown ``<actions><actions>`` and ``<font><font><font>``, which Phoebus
ignores. Every PV comes from :data:`ptychostream.pvnames.PVS`; rows for PVs the table does not
have yet are left out, so regenerating after the table grows adds them (the places are below,
``FUTURE``). tests/test_ioc_screen.py checks the committed file is this script's output.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from phoebusgen import screen, widget

from ptychostream.pvnames import PVS

HERE = Path(__file__).resolve().parent
OUT = HERE / "ptychostream.bob"
ROW = 25  # pixels between rows of a column

#: PVs the lead is adding and where they go once they are in the table (column, label)
FUTURE = {
    "NN:MissedArrays_RBV": ("NN", "Missed"),
    "NN:InputConnected_RBV": ("NN", "Input connected"),
    "Stitch:Amplitude": ("images", "Refined amplitude  Stitch:Amplitude"),
}


def pv(suffix: str) -> str:
    if suffix not in PVS:
        raise KeyError(f"{suffix} is not in ptychostream.pvnames.PVS")
    return f"pva://$(P){suffix}"


def heading(text: str, x: int, y: int, width: int = 240) -> widget.Label:
    label = widget.Label(f"Label {text}", text, x, y, width, 22)
    label.font_family("Liberation Sans")
    label.font_size(14)
    label.font_style_bold()
    label.predefined_foreground_color("Text")
    return label


def label(text: str, x: int, y: int, width: int = 110) -> widget.Label:
    return widget.Label(f"Label {text}", text, x, y, width, 20)


def readback(suffix: str, x: int, y: int, width: int = 120) -> widget.TextUpdate:
    w = widget.TextUpdate(suffix, pv(suffix), x, y, width, 20)
    w.alarm_border(True)
    spec = PVS[suffix]
    if spec.kind == "float":
        w.format("Decimal")
        w.precision(3)
    if spec.units:
        w.show_units(True)
    return w


def setting(suffix: str, x: int, y: int, width: int = 120):
    spec = PVS[suffix]
    if spec.kind == "enum":
        w = widget.ComboBox(suffix, pv(suffix), x, y, width, 20)
        w.items_from_pv(True)
        return w
    return widget.TextEntry(suffix, pv(suffix), x, y, width, 20)


def column(title: str, rows: list[tuple[str, str]], x: int, y: int) -> list:
    """A heading, then one (label, PV) row each; settings get entries, readbacks updates."""
    out = [heading(title, x, y)]
    for i, (text, suffix) in enumerate(rows):
        yy = y + 28 + i * ROW
        out.append(label(text, x, yy))
        make = setting if PVS[suffix].writable else readback
        out.append(make(suffix, x + 112, yy))
    return out


def image(name: str, suffix: str, x: int, y: int, w: int, h: int, toolbar: bool):
    img = widget.Image(name, pv(suffix), x, y, w, h)
    img.predefined_color_map("VIRIDIS")
    bar = widget.ColorBar()
    bar.visible(True)
    img.add_color_bar(bar)
    img.auto_scale(True)
    img.show_toolbar(toolbar)
    return img


def button(text: str, suffix: str, value: str, x: int, y: int) -> widget.ActionButton:
    b = widget.ActionButton(text, text, pv(suffix), x, y, 120, 26)
    b.action_write_pv("$(pv_name)", value, text)
    return b


def strip_chart(title: str, traces: list[tuple[str, str]], x: int, y: int, w: int, h: int):
    """A strip chart of PVs over the last 10 minutes, one y axis per trace."""
    chart = widget.StripChart(title, x, y, w, h)
    chart.title(title)
    chart.show_legend(True)
    chart.time_range("10 minutes")
    for i, (axis_title, suffix) in enumerate(traces):
        axis = widget.StripChartYAxis()
        axis.title(axis_title)
        axis.auto_scale(True)
        axis.show_grid(i == 0)
        chart.add_y_axis(axis)
        trace = widget.StripChartTrace()
        trace.name(f"{axis_title} ({suffix})")
        trace.y_pv(pv(suffix))
        trace.axis(i)
        if PVS[suffix].kind == "int":
            trace.trace_type_step()
        chart.add_trace(trace)
    return chart


def present(rows: list[tuple[str, str]], column_name: str) -> list[tuple[str, str]]:
    """Rows of a column, plus those of FUTURE PVs that the table now has."""
    extra = [(text, s) for s, (col, text) in FUTURE.items() if col == column_name and s in PVS]
    return rows + extra


def build() -> screen.Screen:
    s = screen.Screen("ptychostream $(P)")
    s.macro("P", "PTYCHO:")
    wide = "Stitch:Amplitude" in PVS
    s.width(1570 if wide else 1010)
    s.height(1150)
    widgets: list = [heading("ptychostream edge IOC  $(P)", 10, 8, 500)]

    # images: the latest phase and the stitched map (room to their right: Stitch:Amplitude)
    widgets += [label("Latest phase  NN:Phase (rad)", 10, 40, 300),
                image("Phase", "NN:Phase", 10, 62, 420, 420, False),
                label("Stitched map  Stitch:Image (rad)", 440, 40, 300),
                image("Stitched", "Stitch:Image", 440, 62, 560, 420, True)]
    if wide:
        widgets += [label(FUTURE["Stitch:Amplitude"][1], 1010, 40, 300),
                    image("Amplitude", "Stitch:Amplitude", 1010, 62, 560, 420, True)]

    top = 495
    widgets += column("Model", [
        ("Version", "NN:ModelVersion_RBV"), ("Name", "NN:ModelName_RBV"),
        ("Status", "NN:ModelStatus_RBV"), ("Engine", "NN:Engine_RBV"),
        ("SSIM vs iterative", "QA:SSIM"), ("Loop decision", "QA:Decision"),
        ("Stored models", "NN:ModelHistory_RBV"), ("Roll back to v", "NN:ModelSelect"),
        ("Refused writes", "NN:RefusedWrites_RBV"),
    ], 10, top)
    plugin_rows = [("Enable", "EnableCallbacks"), ("Rate (Hz)", "ArrayRate_RBV"),
                   ("Processed", "ArrayCounter_RBV"), ("Dropped", "DroppedArrays_RBV"),
                   ("Malformed", "BadArrays_RBV"), ("Queue free", "QueueFree_RBV"),
                   ("Queue size", "QueueSize"), ("Exec. time (ms)", "ExecutionTime_RBV"),
                   ("UniqueId", "UniqueId_RBV"), ("Status", "Status_RBV")]
    for i, plugin in enumerate(("NN", "Stitch")):
        rows = [(text, f"{plugin}:{s}") for text, s in plugin_rows]
        widgets += column(f"{plugin} plugin", present(rows, plugin), 260 + 250 * i, top)
    controls = [("Batch size", "NN:BatchSize"), ("Intensity scale", "NN:IntensityScale"),
                ("Map pixel (nm)", "Stitch:PixelSize"), ("Map update (s)", "Stitch:UpdatePeriod"),
                ("Frames stitched", "Stitch:NumFrames_RBV")]
    widgets += column("Controls", controls, 760, top)
    if wide:  # the live refinement: the map shows the sample from the first frames
        widgets += column("Refinement", [
            ("Refine", "Stitch:Refine"), ("Probe", "Stitch:ProbeStatus_RBV"),
            ("Passes", "Stitch:Passes_RBV"), ("Max passes", "Stitch:MaxPasses"),
            ("Alpha", "Stitch:RefineAlpha"),
            ("Probe step", "Stitch:ProbeStep"), ("Network seed", "Stitch:SeedMode"),
            ("Weighting", "Stitch:Weighting"), ("Register offsets", "Stitch:RegisterOffsets"),
        ], 1010, top)
    by = top + 28 + len(controls) * ROW + 5
    widgets += [button("Reset map", "Stitch:Reset", "1", 760, by),
                button("Reset counters", "NN:ArrayCounter", "0", 760 + 124, by)]

    # history: rates, accuracy and the model version over the last 10 minutes
    charts_y = top + 28 + 14 * ROW + 10  # room for the FUTURE rows of the plugin columns
    widgets += [
        strip_chart("Rates", [("NN rate (Hz)", "NN:ArrayRate_RBV"),
                              ("Stitch rate (Hz)", "Stitch:ArrayRate_RBV")],
                    10, charts_y, 490, 260),
        strip_chart("Model history", [("SSIM", "QA:SSIM"), ("model version", "NN:ModelVersion_RBV")],
                    510, charts_y, 490, 260),
    ]
    s.add_widget(widgets)
    return s


def render() -> str:
    """The screen's XML, with a comment saying where it comes from."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "screen.bob"
        build().write_screen(str(path))
        text = path.read_text()
    head, _, body = text.partition("\n")
    note = ("<!-- ptychostream edge IOC operator screen; macro P = the IOC prefix (default PTYCHO:)."
            "\n     Generated by ioc/screens/make_screen.py from ptychostream.pvnames.PVS: edit that"
            " script, not this file. -->")
    return f"{head}\n{note}\n{body}"


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else OUT
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
