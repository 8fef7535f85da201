"""Channel Access mirror of the IOC's scalar PVs (caproto), for CA-only clients and ophyd.

A caproto ``PVGroup`` is generated from the PV table (same names), runs on its own asyncio loop
in a thread of the IOC process and stays in sync both ways: a CA write goes through the same
hook as a pvAccess write (so it is validated once), and every change on the pvAccess side is
written to the CA PV with its alarm: the same severity, and the CA status that
``ptychostream.ioc.pvtable.ALARM_STATUS`` pairs with the pvAccess status (CA has no alarm
message; a status PV's text is its value). Each PV has an alarm of its own (caproto shares one
per group unless told otherwise, which made one PV's alarm show on all). String PVs are CHAR
waveforms of up to 256 characters (areaDetector's convention for long status messages;
``caget -S`` shows them as text).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ptychostream.ioc.pvtable import Alarm, PVTable
from ptychostream.pvnames import PVSpec

log = logging.getLogger(__name__)

STRING_LENGTH = 256


class _NoBeaconErrors(logging.Filter):
    """caproto logs a traceback per beacon when no CA repeater listens on loopback (the normal
    case here: clients search by unicast); keep the log readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to send beacon")


def _property(table: PVTable, suffix: str, spec: PVSpec):
    """One pvproperty for one scalar PV of the table."""
    from caproto import ChannelType
    from caproto.server import pvproperty

    value = table.get(suffix)
    kw = {"name": suffix, "doc": spec.doc, "read_only": not spec.writable,
          "alarm_group": suffix}  # an alarm per PV
    if spec.kind == "int":
        prop = pvproperty(value=int(value), dtype=int, units=spec.units, **kw)
    elif spec.kind == "float":
        prop = pvproperty(value=float(value), dtype=float, precision=spec.precision,
                          units=spec.units, **kw)
    elif spec.kind == "str":
        prop = pvproperty(value=str(value), dtype=ChannelType.CHAR, max_length=STRING_LENGTH,
                          string_encoding="utf-8", **kw)
    elif spec.kind == "enum":
        prop = pvproperty(value=spec.choices[int(value)], dtype=ChannelType.ENUM,
                          enum_strings=list(spec.choices), **kw)
    else:
        raise ValueError(f"{suffix} ({spec.kind}) is not a scalar")

    if spec.writable:
        async def putter(group, instance, value, _suffix=suffix, _spec=spec):
            if _spec.kind == "enum":
                value = list(_spec.choices).index(value) if isinstance(value, str) else int(value)
            # hooks are quick (they set a number); run them off the loop anyway, they take locks
            stored = await asyncio.get_running_loop().run_in_executor(
                None, table.write, _suffix, value)
            return _spec.choices[int(stored)] if _spec.kind == "enum" else stored

        prop = prop.putter(putter)
    return prop


def make_group_class(table: PVTable) -> type:
    """A PVGroup class with one pvproperty per scalar PV of the table (attribute: ':' -> '_')."""
    from caproto.server import PVGroup

    attrs = {suffix.replace(":", "_"): _property(table, suffix, spec)
             for suffix, spec in table.specs.items() if spec.ca}
    return type("PtychoStreamCA", (PVGroup,), attrs)


class CAMirror:
    """Serves the table's scalars over CA from a background thread; ``stop()`` ends it."""

    def __init__(self, table: PVTable, interfaces: list[str] | None = None) -> None:
        logging.getLogger("caproto.ctx").addFilter(_NoBeaconErrors())
        self.table = table
        self.group = make_group_class(table)(prefix=table.prefix)
        self.interfaces = interfaces
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        table.add_listener(self._on_change)

    def start(self, timeout: float = 10.0) -> CAMirror:
        self._thread = threading.Thread(target=self._run, name="ca-mirror", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the Channel Access mirror did not start")
        return self

    def _run(self) -> None:
        from caproto.asyncio.server import Context

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            ctx = Context(self.group.pvdb, self.interfaces)
            self._task = asyncio.current_task()

            async def started(_async_lib) -> None:
                self._ready.set()
                for suffix, alarm in list(self.table.alarms.items()):  # alarms raised before
                    if alarm.severity and self.table.specs[suffix].ca:
                        self._on_change(suffix, self.table.get(suffix), alarm)

            await ctx.run(startup_hook=started)

        try:
            self._loop.run_until_complete(serve())
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("Channel Access mirror failed")
        finally:
            self._ready.set()
            self._loop.close()

    def _on_change(self, suffix: str, value, alarm: Alarm) -> None:
        """A change on the pvAccess side: write it to the CA PV (thread-safe hand-over)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._ready.is_set():
            return
        pv = self.group.pvdb.get(self.table.prefix + suffix)
        if pv is None:
            return
        from caproto import AlarmSeverity, AlarmStatus

        spec = self.table.specs[suffix]
        if spec.kind == "enum":
            value = spec.choices[int(value)]
        elif spec.kind == "str":
            value = str(value)[:STRING_LENGTH - 1]

        severity = AlarmSeverity(alarm.severity)
        status = AlarmStatus[alarm.ca_status]

        async def write() -> None:
            if pv.value == value and pv.alarm.severity == severity and pv.alarm.status == status:
                return
            await pv.write(value, verify_value=False, severity=severity, status=status)

        try:
            asyncio.run_coroutine_threadsafe(write(), loop)
        except RuntimeError:  # loop closing
            pass

    def stop(self, timeout: float = 5.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
