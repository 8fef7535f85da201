"""The PV table (``ptychostream.pvnames.PVS``) served as p4p SharedPVs with normative types.

Scalars are NTScalar with display/control/alarm fields (units and alarms show in Phoebus),
choices are NTEnum, images NTNDArray, the positions table NTTable, the model PV a ubyte array
with a ``name`` field. ``set()`` posts a value (with alarm), ``on_put()`` routes client writes
to the IOC; listeners (the Channel Access mirror) see every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from ptychostream.ntndarray import Frame, to_value
from ptychostream.pvnames import PVS, PVSpec

log = logging.getLogger(__name__)

NO_ALARM, MINOR, MAJOR, INVALID = 0, 1, 2, 3

POSITION_COLUMNS = [("x", "d"), ("y", "d"), ("uniqueId", "i")]

PutHook = Callable[[object], object]
Listener = Callable[[str, object, int, str], None]


def _nt_for(spec: PVSpec):
    """The normative type that carries one kind of PV."""
    from p4p.nt import NTEnum, NTNDArray, NTScalar, NTTable

    if spec.kind == "int":
        return NTScalar("i", display=True, control=True, form=True)
    if spec.kind == "float":
        return NTScalar("d", display=True, control=True, form=True)
    if spec.kind == "str":
        return NTScalar("s", display=True, form=True)
    if spec.kind == "enum":
        return NTEnum(display=True)
    if spec.kind == "ntndarray":
        return NTNDArray()
    if spec.kind == "nttable":
        return NTTable(columns=POSITION_COLUMNS)
    if spec.kind == "bytes":
        return NTScalar("aB", display=True, extra=[("name", "s")])
    raise ValueError(f"unknown PV kind {spec.kind!r} for {spec.suffix}")


def plain(spec: PVSpec, value):
    """A client's put (p4p Value) as a plain python value of the PV's kind."""
    if spec.kind == "enum":
        return int(value["value.index"])
    if spec.kind == "nttable":
        cols = value["value"]
        return {name: np.asarray(cols[name]) for name, _ in POSITION_COLUMNS}
    if spec.kind == "bytes":
        return bytes(np.asarray(value["value"], np.uint8)), str(value["name"])
    v = value["value"]
    return {"int": int, "float": float, "str": str}[spec.kind](v)


class PVTable:
    """SharedPVs for every PV of the table under ``prefix``; values kept as plain python."""

    def __init__(self, prefix: str, specs: Mapping[str, PVSpec] = PVS,
                 initial: Mapping[str, object] | None = None) -> None:
        from p4p.server.thread import SharedPV

        self.prefix = prefix
        self.specs = dict(specs)
        self.pvs: dict[str, SharedPV] = {}
        self.values: dict[str, object] = {}
        self.alarms: dict[str, tuple[int, str]] = {}
        self._nts: dict[str, object] = {}
        self._hooks: dict[str, PutHook] = {}
        self._async_hooks: dict[str, Callable] = {}
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        initial = dict(initial or {})
        for suffix, spec in self.specs.items():
            nt = _nt_for(spec)
            self._nts[suffix] = nt
            pv = SharedPV(handler=_Handler(self, suffix))
            value = initial.get(suffix, spec.initial)
            pv.open(self._wrap(spec, nt, value))
            self.pvs[suffix] = pv
            self.values[suffix] = value
            self.alarms[suffix] = (NO_ALARM, "")

    # ------------------------------------------------------------------ serving
    def provider(self) -> dict:
        """{full PV name: SharedPV} for ``p4p.server.Server(providers=[...])``."""
        return {self.prefix + s: pv for s, pv in self.pvs.items()}

    def name(self, suffix: str) -> str:
        return self.prefix + suffix

    def _wrap(self, spec: PVSpec, nt, value, severity: int = 0, message: str = ""):
        kw = {"severity": severity, "message": message, "timestamp": time.time()}
        if spec.kind in ("int", "float", "str"):
            v = nt.wrap(value, **kw)
            v["display.description"] = spec.doc[:100]
            if spec.units:
                v["display.units"] = spec.units
            if spec.kind == "float":
                v["display.precision"] = 3
            return v
        if spec.kind == "enum":
            v = nt.wrap({"index": int(value), "choices": list(spec.choices)}, **kw)
            v["display.description"] = spec.doc[:100]
            return v
        if spec.kind == "ntndarray":
            frame = value if isinstance(value, Frame) else Frame(np.zeros((0, 0), np.float32))
            return to_value(frame)
        if spec.kind == "nttable":
            from p4p import Value

            cols = value if isinstance(value, Mapping) else {}
            dtypes = {"d": np.float64, "i": np.int32}
            v = Value(nt.type, {
                "labels": [k for k, _ in POSITION_COLUMNS],
                "value": {k: np.asarray(cols.get(k, []), dtypes[t]) for k, t in POSITION_COLUMNS},
            })
            return nt._annotate(v, **kw)
        if spec.kind == "bytes":
            data, name = value if isinstance(value, tuple) else (b"", "")
            v = nt.wrap({"value": np.frombuffer(data, np.uint8), "name": name}, **kw)
            return v
        raise ValueError(spec.kind)

    # ------------------------------------------------------------------ values
    def get(self, suffix: str):
        return self.values[suffix]

    def set(self, suffix: str, value, severity: int | None = None, message: str | None = None,
            force: bool = False) -> None:
        """Post ``value`` (and alarm, if given) when it changed; notify listeners."""
        spec = self.specs[suffix]
        with self._lock:
            old_alarm = self.alarms[suffix]
            alarm = (old_alarm[0] if severity is None else severity,
                     old_alarm[1] if message is None else message)
            if not force and spec.kind in ("int", "float", "str", "enum") and \
                    self.values[suffix] == value and alarm == old_alarm:
                return
            self.values[suffix] = value
            self.alarms[suffix] = alarm
            self.pvs[suffix].post(self._wrap(spec, self._nts[suffix], value, *alarm))
            listeners = list(self._listeners)
        if spec.ca:
            for fn in listeners:
                try:
                    fn(suffix, value, alarm[0], alarm[1])
                except Exception:  # a mirror failing must not stop the IOC
                    log.exception("listener failed for %s", suffix)

    def post_frame(self, suffix: str, frame: Frame) -> None:
        """Publish an NTNDArray PV (no copy kept but the Frame)."""
        self.values[suffix] = frame
        self.pvs[suffix].post(to_value(frame))

    # ------------------------------------------------------------------ writes
    def on_put(self, suffix: str, hook: PutHook) -> None:
        """``hook(value) -> value to store`` runs on every client write (p4p or CA); raising
        ValueError refuses the write with that message."""
        self._hooks[suffix] = hook

    def on_put_async(self, suffix: str, hook: Callable) -> None:
        """``hook(value, done)``: the hook completes the write later by calling ``done(error)``
        (None on success). For slow writes such as model validation."""
        self._async_hooks[suffix] = hook

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def write(self, suffix: str, value) -> object:
        """A client write of a plain value: run the hook, then store and post. Returns the value
        stored; raises ValueError (or PermissionError for a read-only PV)."""
        spec = self.specs[suffix]
        if not spec.writable:
            raise PermissionError(f"{self.prefix}{suffix} is read-only")
        hook = self._hooks.get(suffix)
        if hook is not None:
            out = hook(value)
            value = value if out is None else out
        self.set(suffix, value)
        return value


class _Handler:
    """p4p put handler of one PV: unwraps the Value, runs the table's hook, completes the op."""

    def __init__(self, table: PVTable, suffix: str) -> None:
        self.table, self.suffix = table, suffix

    def put(self, pv, op) -> None:
        table, suffix = self.table, self.suffix
        spec = table.specs[suffix]
        try:
            value = plain(spec, op.value())
        except Exception as exc:
            op.done(error=f"cannot read the value written to {suffix}: {exc}")
            return
        if suffix in table._async_hooks:
            def done(error: str | None = None) -> None:
                op.done(error=error) if error else op.done()

            table._async_hooks[suffix](value, done)
            return
        try:
            table.write(suffix, value)
        except (ValueError, PermissionError, TypeError) as exc:
            log.warning("write to %s refused: %s", suffix, exc)
            op.done(error=str(exc))
            return
        op.done()
