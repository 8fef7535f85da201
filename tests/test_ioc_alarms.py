"""Status and alarms say what is wrong now, the same on pvAccess and Channel Access (issue 10
item 2, issue 11 item 10): severity, status and message of one PV read over both protocols."""

from __future__ import annotations

import time

import test_ioc_server
from test_ioc_server import wait_for

from ptychostream.ioc.pvtable import ALARM_STATUS
from ptychostream.model import ModelError

ioc_factory = test_ioc_server.ioc_factory

PVA_TO_CA = {pva: ca for pva, ca in ALARM_STATUS.values()}


def both(prefix: str, suffix: str) -> tuple[tuple, tuple]:
    """((severity, status, message, text) over pvAccess, (severity, status, text) over CA);
    CA has no alarm message: a status PV's text is its value."""
    from caproto import AlarmStatus, ChannelType
    from caproto.sync import client as ca

    from ptychostream.ioc import client

    v = client.get(prefix, suffix)
    raw = v.raw
    r = ca.read(prefix + suffix, data_type=ChannelType.TIME_CHAR, timeout=10, repeater=False)
    text = r.data.tobytes().rstrip(b"\0").decode()
    return ((raw["alarm.severity"], raw["alarm.status"], raw["alarm.message"], raw["value"]),
            (int(r.metadata.severity), AlarmStatus(r.metadata.status).name, text))


def agree(prefix: str, suffix: str, severity: int, words: str) -> str:
    """Wait until ``suffix`` shows ``severity`` and ``words`` on both protocols, consistently."""
    def check():
        (sev, status, message, value), (ca_sev, ca_status, ca_text) = both(prefix, suffix)
        if sev != severity or words not in value or ca_text != value[:255]:  # CA: 256 chars
            return None
        assert ca_sev == sev and ca_status == PVA_TO_CA[status], (sev, status, ca_status)
        assert (message == value) if sev else (message == "" and status == 0)
        assert sev == 0 or status != 0, "an alarm says why"
        return value

    return wait_for(check, 20, f"{suffix}: severity {severity} with {words!r} on both")


def test_status_and_alarms_agree_on_both_protocols(ioc_factory):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(ca_mirror=True)  # its input PV does not exist yet
    ioc.nn.error_hold_s = 0.3
    agree(p, "NN:ModelStatus_RBV", 1, "No model loaded")
    client.deploy_model(p, test_ioc_server.onnx_model(), "good")
    agree(p, "NN:ModelStatus_RBV", 0, "Serving good")
    agree(p, "NN:Status_RBV", 1, "Waiting for input PV")
    time.sleep(1.0)  # a state, not a message that ages
    agree(p, "NN:Status_RBV", 1, "Waiting for input PV")
    try:
        client.deploy_model(p, b"\x80 not a model, a pickle", "junk")
    except ModelError:
        pass
    agree(p, "NN:ModelStatus_RBV", 2, "Refused junk")
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    agree(p, "NN:Status_RBV", 0, "")
    pub.close()  # the detector goes away: the alarm stands as long as it is away
    agree(p, "NN:Status_RBV", 1, "Disconnected")
    time.sleep(1.0)
    agree(p, "NN:Status_RBV", 1, "Disconnected")
    # every scalar with an alarm carries the same one on both protocols
    for suffix, alarm in list(ioc.table.alarms.items()):
        if alarm.severity and ioc.table.specs[suffix].ca:
            (sev, status, _, _), (ca_sev, ca_status, _) = both(p, suffix)
            assert (ca_sev, ca_status) == (sev, PVA_TO_CA[status]), suffix
