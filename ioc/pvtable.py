"""The PV table (``ptychostream.pvnames.PVS``) served as p4p SharedPVs with normative types,
and the groups that give each PV its behaviour, declared beside it.

Scalars are NTScalar with display/control/alarm fields (units and alarms show in Phoebus),
choices are NTEnum, images NTNDArray, the positions table NTTable, byte writes (models, probes)
a ubyte array with a ``name`` field. ``PVTable.set()`` posts a value with its :class:`Alarm`;
listeners (the Channel Access mirror) see every change, alarm included.

A :class:`PVGroup` declares the PVs it serves with :func:`pv` and their write handlers with
``@x.put`` (caproto's ``pvproperty`` / p4p's ``@pv.put`` style)::

    class StitchPVs(PluginPVs):
        reset = pv("Stitch:Reset")

        @reset.put
        def reset(self, value: int) -> int: ...
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ptychostream.ntndarray import Frame, to_value
from ptychostream.pvnames import PVS, PVSpec

log = logging.getLogger(__name__)

NO_ALARM, MINOR, MAJOR, INVALID = 0, 1, 2, 3

#: why an alarm is raised -> (pvAccess alarm.status, Channel Access STAT). One table, so both
#: protocols say the same thing: pvAccess DEVICE/DRIVER/RECORD/UNDEFINED/CLIENT, CA
#: STATE/COMM/SOFT/UDF/WRITE (epicsAlarmCondition).
ALARM_STATUS = {
    "none": (0, "NO_ALARM"),
    "device": (1, "STATE"),   # the IOC's processing: refused model or probe, bad frames
    "driver": (2, "COMM"),    # the detector link: not connected, disconnected
    "record": (3, "SOFT"),    # a value out of its sensible range
    "undefined": (6, "UDF"),  # nothing to show yet (no model, no probe)
    "client": (7, "WRITE"),   # a client's write was refused
}


@dataclass(frozen=True)
class Alarm:
    """Severity (NO_ALARM/MINOR/MAJOR/INVALID), why (a key of ALARM_STATUS), message."""

    severity: int = NO_ALARM
    kind: str = "none"
    message: str = ""

    @property
    def pva_status(self) -> int:
        return ALARM_STATUS[self.kind][0] if self.severity else 0

    @property
    def ca_status(self) -> str:
        return ALARM_STATUS[self.kind][1] if self.severity else "NO_ALARM"

    @classmethod
    def of(cls, severity: int, message: str = "", kind: str = "device") -> Alarm:
        return cls(int(severity), kind if severity else "none", message if severity else "")


OK = Alarm()

POSITION_COLUMNS = [("x", "d"), ("y", "d"), ("uniqueId", "i")]

PutHook = Callable[[object], object]
Listener = Callable[[str, object, Alarm], None]


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
    """SharedPVs for every PV of the table under ``prefix``; values kept as plain python.

    ``access``: a callable (suffix, peer, account) -> bool deciding who may write (see
    :mod:`ptychostream.ioc.access`); refused writes are counted in ``refused_writes``."""

    def __init__(self, prefix: str, specs: Mapping[str, PVSpec] = PVS,
                 initial: Mapping[str, object] | None = None,
                 access: Callable[[str, str, str], bool] | None = None) -> None:
        from p4p.server.thread import SharedPV

        self.prefix = prefix
        self.specs = dict(specs)
        self.pvs: dict[str, SharedPV] = {}
        self.values: dict[str, object] = {}
        self.alarms: dict[str, Alarm] = {}
        self.access = access
        self.refused_writes = 0
        self._refusal_log = None
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
            pv.open(self._wrap(spec, nt, value, OK))
            self.pvs[suffix] = pv
            self.values[suffix] = value
            self.alarms[suffix] = OK

    # ------------------------------------------------------------------ serving
    def provider(self) -> dict:
        """{full PV name: SharedPV} for ``p4p.server.Server(providers=[...])``."""
        return {self.prefix + s: pv for s, pv in self.pvs.items()}

    def name(self, suffix: str) -> str:
        return self.prefix + suffix

    def _wrap(self, spec: PVSpec, nt, value, alarm: Alarm):
        kw = {"severity": alarm.severity, "message": alarm.message, "timestamp": time.time()}
        if spec.kind in ("int", "float", "str"):
            v = nt.wrap(value, **kw)
            v["alarm.status"] = alarm.pva_status
            v["display.description"] = spec.doc[:100]
            if spec.units:
                v["display.units"] = spec.units
            if spec.kind == "float":
                v["display.precision"] = spec.precision
            return v
        if spec.kind == "enum":
            v = nt.wrap({"index": int(value), "choices": list(spec.choices)}, **kw)
            v["alarm.status"] = alarm.pva_status
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
            v["alarm.status"] = alarm.pva_status
            return v
        raise ValueError(spec.kind)

    # ------------------------------------------------------------------ values
    def get(self, suffix: str):
        return self.values[suffix]

    def set(self, suffix: str, value, alarm: Alarm | None = None, force: bool = False) -> None:
        """Post ``value`` (and ``alarm``; None keeps the PV's current one) when either changed;
        notify listeners."""
        spec = self.specs[suffix]
        with self._lock:
            old_alarm = self.alarms[suffix]
            alarm = old_alarm if alarm is None else alarm
            if not force and spec.kind in ("int", "float", "str", "enum") and \
                    self.values[suffix] == value and alarm == old_alarm:
                return
            self.values[suffix] = value
            self.alarms[suffix] = alarm
            self.pvs[suffix].post(self._wrap(spec, self._nts[suffix], value, alarm))
            listeners = list(self._listeners)
        if spec.ca:
            for fn in listeners:
                try:
                    fn(suffix, value, alarm)
                except Exception:  # a mirror failing must not stop the IOC
                    log.exception("listener failed for %s", suffix)

    def post_frame(self, suffix: str, frame: Frame) -> None:
        """Publish an NTNDArray PV (no copy kept but the Frame)."""
        value = to_value(frame)
        with self._lock:
            self.values[suffix] = frame
            self.pvs[suffix].post(value)

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

    def may_write(self, suffix: str, peer: str = "", account: str = "") -> bool:
        """The access policy's answer, nothing counted (Channel Access rights at connect)."""
        return self.access is None or bool(self.access(suffix, peer, account))

    def allowed(self, suffix: str, peer: str = "", account: str = "") -> bool:
        """May ``account`` at ``peer`` (host:port or host) write ``suffix``? Counts refusals
        on NN:RefusedWrites_RBV and logs them, one line per writer and PV per 10 s."""
        if self.may_write(suffix, peer, account):
            return True
        from ptychostream.plugins.driver import RateLimitedLog

        with self._lock:
            self.refused_writes += 1
            n = self.refused_writes
            if self._refusal_log is None:
                self._refusal_log = RateLimitedLog(log, 10.0)
        who = f"{account or '?'}@{peer or '?'}"
        self._refusal_log.warning(f"{who} {suffix}", f"write to {self.prefix}{suffix} refused "
                                  f"by access security: {who} is not allowed")
        if "NN:RefusedWrites_RBV" in self.specs:
            self.set("NN:RefusedWrites_RBV", n, Alarm.of(MINOR, f"{n} refused writes",
                                                         "client"))
        return False

    def write(self, suffix: str, value, peer: str = "", account: str = "") -> object:
        """A client write of a plain value: check access, run the hook, then store and post.
        Returns the value stored; raises ValueError or PermissionError."""
        spec = self.specs[suffix]
        if not spec.writable:
            raise PermissionError(f"{self.prefix}{suffix} is read-only")
        if not self.allowed(suffix, peer, account):
            raise PermissionError(f"{account or '?'}@{peer or '?'} may not write "
                                  f"{self.prefix}{suffix}")
        if suffix in self._async_hooks:  # e.g. NN:ModelSelect over CA: wait for the verdict
            return self._write_async(suffix, value)
        hook = self._hooks.get(suffix)
        if hook is not None:
            out = hook(value)
            value = value if out is None else out
        self.set(suffix, value)
        return value

    def _write_async(self, suffix: str, value, timeout: float = 120.0):
        verdict: list = []
        finished = threading.Event()

        def done(error: str | None = None) -> None:
            verdict.append(error)
            finished.set()

        self._async_hooks[suffix](value, done)
        if not finished.wait(timeout):
            raise ValueError(f"{suffix}: no verdict after {timeout:.0f} s")
        if verdict[0]:
            raise ValueError(verdict[0])
        return self.values[suffix]


class _Handler:
    """p4p put handler of one PV: unwraps the Value, checks access, runs the table's hook."""

    def __init__(self, table: PVTable, suffix: str) -> None:
        self.table, self.suffix = table, suffix

    def put(self, pv, op) -> None:
        table, suffix = self.table, self.suffix
        spec = table.specs[suffix]
        peer, account = _peer(op)
        try:
            value = plain(spec, op.value())
        except Exception as exc:
            op.done(error=f"cannot read the value written to {suffix}: {exc}")
            return
        if suffix in table._async_hooks:
            if not spec.writable or not table.allowed(suffix, peer, account):
                op.done(error=f"{account or '?'}@{peer or '?'} may not write {suffix}")
                return

            def done(error: str | None = None) -> None:
                op.done(error=error) if error else op.done()

            table._async_hooks[suffix](value, done)
            return
        try:
            table.write(suffix, value, peer, account)
        except (ValueError, PermissionError, TypeError) as exc:
            log.warning("write to %s refused: %s", suffix, exc)
            op.done(error=str(exc))
            return
        op.done()


def _peer(op) -> tuple[str, str]:
    """(peer host:port, account) of a p4p server operation (empty when p4p cannot say)."""
    try:
        peer = op.peer() or ""
    except Exception:
        peer = ""
    try:
        account = op.account() or ""
    except Exception:
        account = ""
    return str(peer), str(account)


# --------------------------------------------------------------------------- groups
class pv:  # noqa: N801  (lower case, as caproto's pvproperty)
    """Declares that a group serves PV ``suffix`` of the table (``{plugin}`` is the group's
    plugin name); ``@x.put`` attaches a write handler ``fn(self, value) -> value to store``,
    ``@x.put_async`` one that completes later, ``fn(self, value, done)``."""

    def __init__(self, suffix: str) -> None:
        self.template = suffix
        self.putter: Callable | None = None
        self.async_putter: Callable | None = None
        self.attr = ""

    def __set_name__(self, owner, name: str) -> None:
        self.attr = name

    def suffix(self, group: PVGroup) -> str:
        return self.template.format(plugin=getattr(group, "plugin", ""))

    def put(self, fn: Callable) -> pv:
        self.putter = fn
        return self

    def put_async(self, fn: Callable) -> pv:
        self.async_putter = fn
        return self

    def __get__(self, group, owner=None):
        if group is None:
            return self
        return BoundPV(group.table, self.suffix(group))


class BoundPV:
    """One PV of a group instance: ``.get()``, ``.set(value, alarm)``, ``.post(frame)``."""

    __slots__ = ("table", "suffix")

    def __init__(self, table: PVTable, suffix: str) -> None:
        self.table, self.suffix = table, suffix

    def get(self):
        return self.table.get(self.suffix)

    def set(self, value, alarm: Alarm | None = None) -> None:
        self.table.set(self.suffix, value, alarm)

    def post(self, frame: Frame) -> None:
        self.table.post_frame(self.suffix, frame)


class PVGroup:
    """A set of PVs and their behaviour; binds its ``pv`` declarations to the table."""

    plugin = ""

    def __init__(self, table: PVTable) -> None:
        self.table = table
        for klass in reversed(type(self).__mro__):
            for decl in vars(klass).values():
                if not isinstance(decl, pv):
                    continue
                suffix = decl.suffix(self)
                if suffix not in table.specs:
                    raise KeyError(f"{type(self).__name__}.{decl.attr}: {suffix} is not in "
                                   "the PV table (ptychostream.pvnames)")
                if decl.putter is not None:
                    table.on_put(suffix, decl.putter.__get__(self))
                if decl.async_putter is not None:
                    table.on_put_async(suffix, decl.async_putter.__get__(self))


def in_range(kind: type, name: str, lo: float | None = None, hi: float | None = None):
    """A converter that refuses values outside [lo, hi] (and NaN) with a clear message."""

    def check(v):
        try:
            v = kind(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a {kind.__name__}, got {v!r}") from exc
        if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
        return v

    return check
