"""Access security (issue 10 item 8, issue 11 item 9): who may write, on pvAccess and Channel
Access, with real p4p and caproto clients on loopback."""

from __future__ import annotations

import getpass
import socket

import pytest
import test_ioc_server
from test_ioc_server import onnx_model, wait_for

from ptychostream.ioc.access import AccessConfigError, AccessPolicy
from ptychostream.model import ModelError

ioc_factory = test_ioc_server.ioc_factory


def test_policy_groups_defaults_and_matching():
    assert AccessPolicy.from_config(None) is None  # no [access]: everyone may write
    pol = AccessPolicy.from_config({"hosts": ["10.1.0.0/16", "ctrl-ws1"],
                                    "model": {"users": ["loop"]}})
    assert pol.group_of("NN:Model") == pol.group_of("NN:ModelSelect") == "model"
    assert pol.group_of("QA:SSIM") == "qa" and pol.group_of("Stitch:Reset") == "control"
    assert pol("NN:BatchSize", "10.1.2.3:5076", "anyone")          # default rule: hosts
    assert not pol("NN:BatchSize", "10.2.0.1:5076", "anyone")
    assert pol("NN:BatchSize", "CTRL-WS1", "anyone")               # a CA client's host name
    assert pol("NN:Model", "192.168.9.9:40000", "loop")             # model: users only
    assert not pol("NN:Model", "10.1.2.3:5076", "operator")
    assert pol("QA:SSIM", "anywhere", "loop") and not pol("QA:SSIM", "x", "operator")  # qa=model
    assert pol("NN:BatchSize", "[::1]:5076", "x") is False
    for bad in ({"hsts": []}, {"model": {"users": "loop"}}, {"hosts": ["10.0.0.0/40"]},
                {"qa": ["x"]}, {"model": {"user": ["x"]}}):
        with pytest.raises(AccessConfigError):
            AccessPolicy.from_config(bad)


def _ca(name: str, value=None):
    from caproto.sync import client as ca

    if value is None:
        return ca.read(name, timeout=10, repeater=False)
    return ca.write(name, value, notify=True, timeout=10, repeater=False)


def test_writes_outside_the_allow_list_take_no_effect_on_either_protocol(ioc_factory):
    from p4p.client.thread import RemoteError

    from ptychostream.ioc import client

    me = getpass.getuser()
    policy = AccessPolicy.from_config({
        "control": {"hosts": ["localhost", socket.gethostname()], "users": [me]},
        "model": {"users": ["ptycho-loop"]},
        "qa": {"hosts": ["10.9.9.0/24"]},
    })
    p = ioc_factory.prefix
    ioc = ioc_factory(ca_mirror=True, access=policy)
    # allowed: control from this host and user, on both protocols
    client.put(p, "NN:BatchSize", 3)
    _ca(p + "NN:QueueSize", 40)
    assert (ioc.nn.batch_size, ioc.nn.queue_size) == (3, 40)
    # refused over pvAccess: the model (wrong user) and QA (wrong network)
    with pytest.raises(ModelError, match="may not write"):
        client.deploy_model(p, onnx_model(), "intruder")
    with pytest.raises(RemoteError, match="may not write"):
        client.put(p, "QA:SSIM", 0.99)
    # refused over Channel Access: the client sees a read-only channel, a write fails
    with pytest.raises(Exception):  # noqa: B017 (caproto's ErrorResponseReceived)
        _ca(p + "QA:Decision", "deploy everything")
    with pytest.raises(Exception):  # noqa: B017
        _ca(p + "NN:ModelSelect", 1)
    assert ioc.inference.serving is None and client.get(p, "QA:SSIM") == 0.0
    assert client.get(p, "QA:Decision") == ""
    wait_for(lambda: client.get(p, "NN:RefusedWrites_RBV") == 4, what="4 refused writes")
    assert _ca(p + "NN:RefusedWrites_RBV").data[0] == 4
    from caproto import AccessRights
    from caproto.threading.client import Context

    ctx = Context()
    try:
        qa, control = ctx.get_pvs(p + "QA:SSIM", p + "NN:BatchSize", timeout=10)
        qa.wait_for_connection(timeout=10)
        control.wait_for_connection(timeout=10)
        assert AccessRights.WRITE not in qa.access_rights
        assert AccessRights.WRITE in control.access_rights
    finally:
        ctx.disconnect()


def test_counter_reset_is_a_control_write(ioc_factory):
    from p4p.client.thread import RemoteError

    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(access=AccessPolicy.from_config({"users": ["operator"]}))
    ioc.nn.dropped = 5
    with pytest.raises(RemoteError):
        client.put(p, "NN:ArrayCounter", 0)  # would wipe the drop counts
    assert ioc.nn.dropped == 5
