"""The PV table, defined once: the IOC serves it, the Phoebus screen and the ophyd devices read it.

Names follow areaDetector plugin conventions (``EnableCallbacks``, ``ArrayCounter_RBV``,
``ArrayRate_RBV``, ``DroppedArrays_RBV``, ``QueueSize``, ``QueueFree_RBV``,
``ExecutionTime_RBV``, ``UniqueId_RBV``) under the prefix ``$(P)``, default ``PTYCHO:``.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "PTYCHO:"


@dataclass(frozen=True)
class PVSpec:
    """One PV. ``kind``: 'int', 'float', 'str', 'enum' (scalars, also served over Channel Access),
    'ntndarray', 'nttable', 'bytes' (pvAccess only). ``writable``: operators/plans may put it."""

    suffix: str
    kind: str
    writable: bool = False
    initial: object = 0
    doc: str = ""
    units: str = ""
    choices: tuple[str, ...] = ()
    precision: int = 3  # digits shown for floats (display.precision on pvAccess, CA precision)

    @property
    def ca(self) -> bool:
        """Scalars are mirrored over Channel Access."""
        return self.kind in ("int", "float", "str", "enum")


def _plugin_pvs(plugin: str, queue_size: int) -> list[PVSpec]:
    """The areaDetector NDPluginDriver PVs every plugin carries."""
    p = plugin + ":"
    return [
        PVSpec(p + "EnableCallbacks", "enum", True, 1, "process arrays (Enable) or ignore them",
               choices=("Disable", "Enable")),
        PVSpec(p + "ArrayCounter_RBV", "int", doc="arrays processed since start or reset"),
        PVSpec(p + "ArrayCounter", "int", True, doc="write 0 to reset the counters"),
        PVSpec(p + "ArrayRate_RBV", "float", doc="arrays processed per second", units="Hz",
               precision=1),
        PVSpec(p + "DroppedArrays_RBV", "int",
               doc="arrays received and lost here: queue full, malformed, callbacks disabled "
                   "(with no model, NN passes frames on to the map: not lost)"),
        PVSpec(p + "BadArrays_RBV", "int", doc="malformed arrays among the dropped ones (see Status_RBV)"),
        PVSpec(p + "MissedArrays_RBV", "int",
               doc="arrays sent to this plugin that never arrived (gaps in uniqueId)"),
        PVSpec(p + "QueueSize", "int", True, queue_size, "input queue length (arrays)"),
        PVSpec(p + "QueueFree_RBV", "int", initial=queue_size, doc="free places in the queue"),
        PVSpec(p + "ExecutionTime_RBV", "float", doc="time per array in the last batch", units="ms"),
        PVSpec(p + "UniqueId_RBV", "int", doc="uniqueId of the last array processed"),
        PVSpec(p + "Status_RBV", "str", initial="Idle", doc="what the plugin is doing, or the last error"),
    ]


PVS: dict[str, PVSpec] = {
    spec.suffix: spec
    for spec in [
        # ---- inference plugin
        PVSpec("NN:Phase", "ntndarray", doc="latest inferred phase (rad), uniqueId of the source frame"),
        PVSpec("NN:Model", "bytes", True,
               doc="write model bytes (ONNX or PyTorch state dict) as a ubyte array with an "
                   "optional 'name' field; the put completes when validated (error: refused)"),
        PVSpec("NN:ModelVersion_RBV", "int", doc="version of the model serving (0: none)"),
        PVSpec("NN:ModelName_RBV", "str", initial="", doc="name of the model serving"),
        PVSpec("NN:ModelStatus_RBV", "str", initial="No model loaded",
               doc="model state, or why the last model was refused (with alarm)"),
        PVSpec("NN:ModelSelect", "int", True, 0,
               "write a stored model's version to serve it again (rollback); the put "
               "completes when it validated; reads back the version selected"),
        PVSpec("NN:ModelHistory_RBV", "str", initial="",
               doc="stored models, newest first: '*v5 name | v4 name | ...' (* serving)"),
        PVSpec("NN:RefusedWrites_RBV", "int",
               doc="writes to any PV of this IOC refused by access security (see docs/ioc.md)"),
        PVSpec("NN:BatchSize", "int", True, 8, "frames per engine call"),
        PVSpec("NN:IntensityScale", "float", True, 1.0, "multiplies frames before inference (low dose)"),
        PVSpec("NN:Engine_RBV", "str", initial="", doc="onnxruntime, tensorrt or torch"),
        PVSpec("NN:MinCallbackTime", "float", True, 0.0,
               "least time between NN:Phase updates (0: every frame; areaDetector's "
               "MinCallbackTime)", units="s"),
        PVSpec("NN:InputConnected_RBV", "int", initial=0,
               doc="1 while the detector's NTNDArray PV is connected, else 0"),
        *_plugin_pvs("NN", 256),
        # ---- stitching plugin
        PVSpec("Stitch:Image", "ntndarray",
               doc="live phase map (rad): refined against the frames when a probe is known, "
                   "else the network's phases stitched"),
        PVSpec("Stitch:Amplitude", "ntndarray", doc="live amplitude map of the refined object"),
        PVSpec("Stitch:Refine", "enum", True, 1,
               "refine the map frame by frame with the probe (acts when a probe is known)",
               choices=("Disable", "Enable")),
        PVSpec("Stitch:RefineAlpha", "float", True, 0.1, "rPIE alpha of the object update",
               precision=2),
        PVSpec("Stitch:ProbeStep", "float", True, 0.5,
               "ePIE probe step after each object step, shrinking as 8 / passes beyond 8 "
               "passes (0: the probe stays as given)"),
        PVSpec("Stitch:SeedMode", "enum", True, 1,
               "how the network's phase seeds the refined map: pixels not yet seen, a "
               "weighted blend, or not at all", choices=("New", "Blend", "None")),
        PVSpec("Stitch:Probe", "bytes", True,
               doc="write a probe (.npy, or an HDF5 reconstruction or scan file) as a ubyte "
                   "array with an optional 'name' field; the put completes when validated"),
        PVSpec("Stitch:Probe_RBV", "ntndarray",
               doc="probe in use, as learnt so far: float32 (modes, N, N, 2), last axis re, im"),
        PVSpec("Stitch:ProbeStatus_RBV", "str", initial="No probe",
               doc="which probe refines the map and where it came from, or why one was refused"),
        PVSpec("Stitch:Passes_RBV", "float",
               doc="frame updates per frame of the map: 1 after the live pass, more as idle "
                   "time re-visits frames, below 1 while the stage waits for inference to "
                   "catch up (frames seeded, refined later)"),
        PVSpec("Stitch:MaxPasses", "float", True, 32.0,  # refine.DEFAULT_MAX_PASSES
               "stop re-visiting frames once the map has this many frame updates per frame "
               "(idle time only; at most 8 while frames still arrive; 1: the live pass alone)",
               precision=1),
        PVSpec("Stitch:Weighting", "enum", True, 0,
               "weight of each network image in the stitch: probe intensity, a central crop, "
               "or the whole frame", choices=("Probe", "Crop", "Uniform")),
        PVSpec("Stitch:Crop", "int", True, 0,
               "central crop (px) for Weighting Crop; 0: the beam's FWHM", units="px"),
        PVSpec("Stitch:BeamSize", "float", True, 800.0,
               "beam FWHM, for weights while no probe is known", units="nm", precision=1),
        PVSpec("Stitch:RegisterOffsets", "enum", True, 0,  # stitch.DEFAULT_REGISTER_OFFSETS
               "match each network image's constant phase to the map before adding it",
               choices=("Disable", "Enable")),
        PVSpec("Stitch:SaveFile", "str", True, "",
               "write a file name: the map (complex, phase, amplitude) and probe are saved "
               "there as HDF5, in the IOC's map folder"),
        PVSpec("Stitch:Positions", "nttable", True,
               doc="planned positions: columns x, y (m) and optional uniqueId, for frames without "
                   "PosX/PosY (matched by uniqueId, else by arrival order); starts a new map"),
        PVSpec("Stitch:Reset", "int", True, doc="write 1 to start a new map"),
        PVSpec("Stitch:PixelSize", "float", True, 0.0,
               "map pixel size; 0 takes the frames' PixelSize attribute", units="nm",
               precision=2),
        PVSpec("Stitch:NumFrames_RBV", "int", doc="frames stitched into the current map"),
        PVSpec("Stitch:UpdatePeriod", "float", True, 0.5, "seconds between Stitch:Image updates",
               units="s", precision=2),
        *_plugin_pvs("Stitch", 1024),
        # ---- quality
        PVSpec("QA:SSIM", "float", True, 0.0, "SSIM of the serving model against the latest iterative reconstruction"),
        PVSpec("QA:Decision", "str", True, "", "continual-learning policy: last decision and its reason"),
    ]
}


def pvname(prefix: str, suffix: str) -> str:
    """Full PV name; raises KeyError for a suffix not in the table (names live only here)."""
    if suffix not in PVS:
        raise KeyError(f"{suffix!r} is not in the ptychostream PV table")
    return prefix + suffix


def all_pvnames(prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [prefix + s for s in PVS]


_TYPE_NAMES = {"int": "int", "float": "double", "str": "string", "enum": "enum",
               "ntndarray": "NTNDArray", "nttable": "NTTable", "bytes": "ubyte[] + name"}


def markdown_table(prefix: str = "$(P)") -> str:
    """The PV table as Markdown (README.md carries this; ``python -m ptychostream.pvnames``)."""
    lines = ["| PV | type | access | CA | meaning |", "|---|---|---|---|---|"]
    for s in PVS.values():
        units = f" ({s.units})" if s.units else ""
        choices = f" [{' / '.join(s.choices)}]" if s.choices else ""
        lines.append(
            f"| `{prefix}{s.suffix}` | {_TYPE_NAMES[s.kind]}{choices} | "
            f"{'read/write' if s.writable else 'read'} | {'yes' if s.ca else 'no'} | "
            f"{s.doc}{units} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
