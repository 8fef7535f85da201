"""The IOC's fault matrix, fast cases (issue 11): bad input, lost frames, bad models, a broken
model store, absurd values. Real p4p detector and clients on loopback, real onnxruntime; the
long cases (overload, soak, stalled clients, kill -9) are in benchmarks/fault_matrix.py."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import test_ioc_server
import torch
from test_ioc_server import PhaseCollector, onnx_model, wait_for

from ptychostream.model import ModelError, PtychoNN2, export_onnx

ioc_factory = test_ioc_server.ioc_factory  # the same fixture: IOCs on this test's ports

FRAME = (128, 128)


def frame(seed: int = 0, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).poisson(20.0, FRAME).astype(dtype)


def reopen(pub, value) -> None:
    """Serve ``value`` (any type) on the detector PV: clients see a disconnect, then it."""
    with pub._lock:
        pub._pv.close()
        pub._pv.open(value)


def ntndarray_without_unique_id():
    from p4p import Type, Value

    t = Type([("value", ("U", None, [("ushortValue", "aH")])),
              ("dimension", ("aS", None, [("size", "i")]))], id="epics:nt/NTNDArray:1.0")
    return Value(t, {"value": ("ushortValue", frame().ravel()),
                     "dimension": [{"size": 128}, {"size": 128}]})


# ---------------------------------------------------------------------- (1) malformed updates
def test_malformed_updates_counted_and_the_input_goes_on(ioc_factory):
    from p4p.nt import NTScalar

    from ptychostream.ioc import client
    from ptychostream.ntndarray import Frame, to_value

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=4)
    client.deploy_model(p, onnx_model(), "m")
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    pub.publish(frame(1), 1)
    wait_for(lambda: ioc.nn.array_counter == 1, what="first frame")
    reopen(pub, NTScalar("d").wrap(3.0))                  # an NTScalar on the detector PV
    wait_for(lambda: ioc.nn.bad == 1, what="NTScalar counted as bad")
    reopen(pub, ntndarray_without_unique_id())            # an NTNDArray without uniqueId
    wait_for(lambda: ioc.nn.bad == 2, what="no uniqueId counted as bad")
    reopen(pub, to_value(Frame(frame(2), 2)))
    wait_for(lambda: ioc.nn.received == 4, what="the detector back")  # reconnected
    for uid in range(3, 13):                              # the next good frames: all processed
        pub.publish(frame(uid), uid)
    wait_for(lambda: ioc.nn.array_counter == 12, what="the 11 good frames after")
    wait_for(lambda: client.get(p, "NN:BadArrays_RBV") == 2, what="BadArrays_RBV")
    assert ioc.nn.dropped == 2 and "Serving m" in client.get(p, "NN:ModelStatus_RBV")


# ---------------------------------------------------------------------- (3) bad frames alone
def test_one_bad_frame_drops_alone_and_the_model_is_not_blamed(ioc_factory):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=8, flush_s=0.5)  # one batch: the bad frames share it
    client.deploy_model(p, onnx_model(), "m")
    phases = PhaseCollector(p)
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    for uid in range(1, 9):
        if uid == 3:
            pub.publish(np.full(FRAME, 1e300), uid)            # finite in float64, inf as float32
        elif uid == 6:
            pub.publish(np.full(FRAME, 2**62, np.int64), uid)  # no detector counts that far
        else:
            pub.publish(frame(uid), uid)
    wait_for(lambda: len(phases.frames) == 6, what="the 6 good phases")
    phases.close()
    assert sorted(phases.frames) == [1, 2, 4, 5, 7, 8]
    assert (ioc.nn.bad, ioc.nn.array_counter) == (2, 6)
    assert client.get(p, "NN:ModelStatus_RBV").severity == 0


# ---------------------------------------------------------------------- (4) compressed frames
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_compressed_frames_decoded_and_unknown_codecs_refused(ioc_factory, dtype):
    from ptychostream.codecs import compressed_value
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=1)
    client.deploy_model(p, onnx_model(), "m")
    phases = PhaseCollector(p)
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    images = {uid: frame(uid, dtype) for uid in range(1, 7)}
    corrupt = compressed_value(images[5], "lz4", 5)
    corrupt["value"] = ("ubyteValue", np.frombuffer(b"not lz4 at all" * 9, np.uint8))
    for value in [compressed_value(images[1], "lz4", 1), compressed_value(images[2], "blosc", 2),
                  compressed_value(images[3], "bslz4", 3),
                  compressed_value(images[4], "jpeg", 4),          # a codec we do not decode
                  corrupt,
                  compressed_value(images[6], "lz4", 6, parameters=10)]:  # wrong pixel type
        pub._pv.post(value)
    wait_for(lambda: ioc.nn.bad == 3 and len(phases.frames) == 3, what="3 decoded, 3 refused")
    phases.close()
    engine = ioc.inference.serving.engine
    for uid in (1, 2, 3):  # decoded exactly: the phase of the original frame
        np.testing.assert_allclose(phases.frames[uid][3], engine.infer(images[uid][None])[0],
                                   rtol=1e-5, atol=1e-5)
    wait_for(lambda: "codec" in client.get(p, "NN:Status_RBV"), what="the codec on Status_RBV")


# ---------------------------------------------------------------------- (5) losses counted
def test_sent_equals_processed_dropped_passed_missed_at_full_rate(ioc_factory):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=8, queue_size=16)
    client.deploy_model(p, onnx_model(), "m")
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    pub.publish(frame(), 1)  # the count starts at the first uniqueId the IOC sees
    wait_for(lambda: ioc.nn.received == 1, what="first frame")
    img, uid = frame(), 1
    for n, enabled in ((600, 1), (300, 0), (600, 1)):
        client.put(p, "NN:EnableCallbacks", enabled)
        for _ in range(n):
            uid += 1 + (uid % 97 == 0)  # and a few frames the detector lost before sending
            pub.publish(img, uid)
    sent = uid
    wait_for(lambda: ioc.nn.idle() and ioc.nn.unique_id or None, what="drain")
    time.sleep(0.5)
    s = ioc.nn.stats()
    total = s["ArrayCounter_RBV"] + s["DroppedArrays_RBV"] + ioc.nn.passed + ioc.nn.missed
    assert total == sent, (s, ioc.nn.passed, ioc.nn.missed)
    assert ioc.nn.missed >= sent // 97 and s["DroppedArrays_RBV"] > 0
    wait_for(lambda: client.get(p, "NN:MissedArrays_RBV") == ioc.nn.missed, what="Missed PV")


# ---------------------------------------------------------------------- (6) model validation
def _onnx(net: torch.nn.Module, outputs=("phase",)) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), (torch.zeros(2, 1, 128, 128),), buf, dynamo=False,
                      input_names=["diffraction"], output_names=list(outputs),
                      dynamic_axes={"diffraction": {0: "b"}, **{o: {0: "b"} for o in outputs}})
    return buf.getvalue()


class _OneConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)) * np.pi


class _TwoHeads(_OneConv):
    def forward(self, x):
        y = super().forward(x)
        return y, y


class _NaNOnZeroFrames(PtychoNN2):
    def forward(self, x):  # fine on any frame with counts: 0/0 on an all-zero one
        return super().forward(x / x.amax(dim=(-1, -2), keepdim=True))


class _NotAPhase(PtychoNN2):
    def forward(self, x):
        return super().forward(x) * 4.0


@functools.cache
def bad_models() -> dict[str, tuple[bytes, str]]:
    torch.manual_seed(0)
    return {
        "one convolution": (_onnx(_OneConv()), "not PtychoNN 2.0"),
        "two outputs": (_onnx(_TwoHeads(), ("a", "b")), "2 outputs"),
        "NaN on zero frames": (export_onnx(_NaNOnZeroFrames()), "not finite on the all-zero"),
        "phase of +-4 pi": (export_onnx(_NotAPhase()), "not a phase"),
    }


def test_models_that_are_not_ptychonn2_or_not_a_phase_are_refused():
    from ptychostream.plugins.inference import InferencePlugin

    plugin = InferencePlugin("onnxruntime", engine_kwargs={"spinning": False})
    plugin.load_model(onnx_model(), "good")
    for label, (data, why) in bad_models().items():
        with pytest.raises(ModelError, match=why):
            plugin.load_model(data, label)
        assert plugin.model_name == "good", label
    # another architecture serves when the write says so, and must still give phases
    assert plugin.load_model(_onnx(_OneConv()), "tiny@custom").name == "tiny@custom"
    with pytest.raises(ModelError, match="not finite"):
        plugin.load_model(export_onnx(_NaNOnZeroFrames()), "nan@custom")


# ---------------------------------------------------------------------- (7) the model store
def _stored_ioc(ioc_factory, **kw):
    return ioc_factory(model_store=ioc_factory.store, **kw)


def test_store_falls_back_past_a_truncated_file_and_recovers_current_json(ioc_factory):
    from ptychostream.ioc import client
    from ptychostream.ioc.model_store import ModelStore

    p = ioc_factory.prefix
    ioc = _stored_ioc(ioc_factory)
    for i, name in enumerate("abc"):
        assert client.deploy_model(p, onnx_model(i), name) == i + 1
    ioc.stop()
    store = ModelStore(ioc_factory.store)
    newest = store.get(3).path
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated (a full disk, a bad copy)
    (ioc_factory.store / "model-v0004.onnx.tmp").write_bytes(b"half a model")
    ioc = _stored_ioc(ioc_factory)
    assert ioc.wait_model() == 2 and client.get(p, "NN:ModelName_RBV") == "b"
    status = client.get(p, "NN:ModelStatus_RBV")
    assert status.severity == 1 and "v3" in status and "truncated" in status, status
    assert not list(ioc_factory.store.glob("*.tmp"))
    assert client.deploy_model(p, onnx_model(3), "d") == 4  # never v3 again
    ioc.stop()
    (ioc_factory.store / "current.json").write_text("{not json")
    ioc = _stored_ioc(ioc_factory)
    assert ioc.wait_model() == 4, "recovered from the files: the newest that validates"
    assert "current.json" in client.get(p, "NN:ModelStatus_RBV")
    assert client.deploy_model(p, onnx_model(4), "e") == 5
    assert ModelStore(ioc_factory.store).read(ModelStore(ioc_factory.store).get(2)) == \
        onnx_model(1), "old files are never overwritten"
    assert json.loads((ioc_factory.store / "current.json").read_text())["version"] == 5


def test_rollback_selects_a_stored_version_and_history_shows_it(ioc_factory):
    from p4p.client.thread import RemoteError

    from ptychostream.ioc import client

    p = ioc_factory.prefix
    _stored_ioc(ioc_factory)
    client.deploy_model(p, onnx_model(0), "a")
    client.deploy_model(p, onnx_model(1), "b")
    client.put(p, "NN:ModelSelect", 1, timeout=30)
    assert (client.get(p, "NN:ModelVersion_RBV"), client.get(p, "NN:ModelName_RBV")) == (1, "a")
    assert client.get(p, "NN:ModelHistory_RBV").startswith("v2 b | *v1 a")
    with pytest.raises(RemoteError, match="not stored"):
        client.put(p, "NN:ModelSelect", 7, timeout=30)
    assert client.get(p, "NN:ModelVersion_RBV") == 1
    assert client.deploy_model(p, onnx_model(2), "c") == 3


def test_unsaved_deploy_is_major_or_refused_when_the_store_is_required(ioc_factory):
    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = _stored_ioc(ioc_factory)
    client.deploy_model(p, onnx_model(0), "a")
    (ioc_factory.store / "model-v0002.onnx.tmp").mkdir()  # the save cannot write its file
    assert client.deploy_model(p, onnx_model(1), "b") == 2
    status = client.get(p, "NN:ModelStatus_RBV")
    assert status.severity == 2 and "NOT SAVED" in status
    ioc.stop()
    (ioc_factory.store / "model-v0002.onnx.tmp").rmdir()
    ioc = _stored_ioc(ioc_factory, model_store_required=True)
    assert ioc.wait_model() == 1
    (ioc_factory.store / "model-v0002.onnx.tmp").mkdir()
    with pytest.raises(ModelError, match="required"):
        client.deploy_model(p, onnx_model(1), "b")
    assert client.get(p, "NN:ModelName_RBV") == "a"


# ---------------------------------------------------------------------- (8) absurd values
def test_absurd_positions_and_pixel_sizes_refused_per_frame_map_lives(ioc_factory):
    from p4p.client.thread import RemoteError

    from ptychostream.ioc import client

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=4)
    client.deploy_model(p, onnx_model(), "m")
    pub = ioc_factory.publisher()
    wait_for(ioc.input_connected.is_set, what="input monitor")
    for value in (1e-12, -1.0, float("nan"), 1e9):
        with pytest.raises(RemoteError):
            client.put(p, "Stitch:PixelSize", value)
    pub.publish(frame(1), 1, {"PosX": 1e3, "PosY": 1e3, "PixelSize": 10e-9})   # first: far off
    pub.publish(frame(2), 2, {"PosX": 0.0, "PosY": 0.0, "PixelSize": 1e-15})   # absurd pixel
    for uid in range(3, 9):
        pub.publish(frame(uid), uid, {"PosX": uid * 1e-7, "PosY": 0.0, "PixelSize": 10e-9})
    wait_for(lambda: client.get(p, "Stitch:NumFrames_RBV") >= 6, what="the good frames stitched")
    assert ioc.stitch.dropped >= 1 and ioc.stitch.stats()["Status_RBV"][1] >= 0
    for name in ("NN:QueueSize", "NN:BatchSize"):
        with pytest.raises(RemoteError):
            client.put(p, name, 10**6)


# ---------------------------------------------------------------------- (11) config mistakes
CONFIG_MISTAKES = [
    ("toml syntax", "[ioc\nbatch_size = 8\n", [], "not valid TOML"),
    ("wrong type", 'batch_size = "eight"\n', [], "batch_size must be"),
    ("zero batch", "batch_size = 0\n", [], "batch_size must be in"),
    ("negative queue", "queue_size = -5\n", [], "queue_size must be in"),
    ("queue beyond memory", "queue_size = 100000\n", [], "queue_size must be in"),
    ("unknown key", "batchsize = 3\n", [], "unknown keys"),
    ("access typo", '[access]\nhsts = ["a"]\n', [], "unknown keys in [access]"),
    ("access wrong type", '[access.model]\nusers = "loop"\n', [], "list of names"),
    ("bad network", '[access]\nhosts = ["10.0.0.0/33"]\n', [], "hosts"),
    ("store is a file", None, ["--model-store", "{file}"], "is a file"),
    ("store not creatable", None, ["--model-store", "{file}/sub"], "cannot be created"),
    ("missing config", None, ["--config", "{tmp}/nope.toml"], "does not exist"),
    ("nan scale", None, ["--intensity-scale", "nan"], "intensity_scale must be"),
    ("unknown engine", None, ["--engine", "bogus"], "engine must be one of"),
    ("missing model file", None, ["--model-file", "{tmp}/none.onnx"], "does not exist"),
    ("required without store", None, ["--model-store-required"], "needs a model_store"),
]


def test_config_mistakes_are_one_line_and_exit_2(tmp_path):
    file = tmp_path / "afile"
    file.write_text("x")
    failures = []
    for label, toml, args, expect in CONFIG_MISTAKES:
        argv = [a.format(file=file, tmp=tmp_path) for a in args]
        if toml is not None:
            cfg = tmp_path / f"{label.replace(' ', '_')}.toml"
            cfg.write_text(toml)
            argv += ["--config", str(cfg)]
        out = subprocess.run([sys.executable, "-m", "ptychostream.ioc.server", *argv],
                             capture_output=True, text=True, timeout=60)
        lines = [ln for ln in out.stderr.splitlines() if "error:" in ln]
        if out.returncode != 2 or "Traceback" in out.stderr or len(lines) != 1 \
                or expect not in lines[0]:
            failures.append((label, out.returncode, out.stderr[-300:]))
    assert not failures, failures


# ---------------------------------------------------------------------- pvapy consumer path
PVAPY_CASES = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pvaccess as pva
    from pvapy.utility.adImageUtility import AdImageUtility
    from ptychostream.plugins.pvapy_adapter import InferenceProcessor
    from ptychostream.codecs import compress

    proc = InferenceProcessor({"modelFile": sys.argv[1], "batchSize": 4, "flushSeconds": 0.05})
    proc.start()
    img = np.random.default_rng(0).poisson(20.0, (128, 128)).astype(np.uint16)
    def raw(uid, a):
        return AdImageUtility.generateNtNdArray2D(uid, a)
    def packed(uid, a, codec):
        data = np.frombuffer(compress(a, codec) if codec != "zstd" else a.tobytes(), np.uint8)
        return AdImageUtility.generateNtNdArray2D(uid, data, nx=128, ny=128, dtype=a.dtype,
                                                   compressorName=codec)
    cases = [raw(1, img), pva.PvObject({"value": pva.DOUBLE}, {"value": 3.0}),
             pva.PvObject({"value": pva.DOUBLE}, {"value": 1.0}),  # no uniqueId either
             raw(4, np.full((128, 128), 1e300)), raw(5, np.full((128, 128), 2**62, np.int64)),
             packed(6, img, "lz4"), packed(7, img, "bslz4"), packed(8, img, "blosc"),
             packed(9, img, "zstd"), raw(10, img)]
    for c in cases:
        proc.process(c)
    proc.stop()
    print(json.dumps(proc.getStats()))
""")


def test_pvapy_consumer_path_through_the_input_cases(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_model())
    out = subprocess.run([sys.executable, "-c", PVAPY_CASES, str(model)], capture_output=True,
                         text=True, timeout=180, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    # processed: 1, 6, 7, 8, 10; bad: the two scalars, 1e300, 2**62, the unknown codec
    assert (stats["nProcessed"], stats["nBad"]) == (5, 5), stats


# ---------------------------------------------------------------------- (8) memory under any client
FROZEN_CLIENT = textwrap.dedent("""
    import os, signal, sys, threading
    from p4p.client.thread import Context
    first = threading.Event()
    sub = Context("pva").monitor(sys.argv[1], lambda v: first.set(),
                                 request="record[queueSize=100000]")
    first.wait(30)
    print("subscribed", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # the whole client stops: its socket fills
""")


def test_memory_guard_drops_a_frozen_client_and_the_others_go_on(ioc_factory):
    """A client asking for a queue of 100,000 images, then frozen, grows the IOC by one image
    a frame (pvxs honours any queueSize); past the headroom the guard drops that connection
    alone, and a well-behaved client beside it receives every frame."""
    from ptychostream.ioc import client
    from ptychostream.ioc.server import _rss_mb as ioc_rss_mb

    p = ioc_factory.prefix
    ioc = ioc_factory(batch_size=4, memory_headroom_mb=1e6)
    client.deploy_model(p, onnx_model(), "m")
    phases = PhaseCollector(p)
    pub = ioc_factory.publisher()  # before the frozen client: a frozen process that shares the
    wait_for(ioc.input_connected.is_set, what="input monitor")  # UDP port answers no search
    uid = 0
    for _ in range(100):  # warm-up: arenas and caches reach their size
        uid += 1
        pub.publish(frame(uid % 7), uid)
        time.sleep(0.004)
    wait_for(lambda: uid in phases.frames, what="the warm-up phases")
    frozen = subprocess.Popen([sys.executable, "-c", FROZEN_CLIENT, p + "NN:Phase"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert frozen.stdout.readline().strip() == "subscribed"
        ioc.memory_base_mb = ioc_rss_mb()
        ioc.memory_headroom_mb = 24.0  # ~400 images
        start = uid
        while ioc.peers_dropped == 0 and uid < start + 3000:
            uid += 1
            pub.publish(frame(uid % 7), uid)
            time.sleep(0.004)
        assert ioc.peers_dropped == 1, f"guard dropped {ioc.peers_dropped} after {uid} frames"
        wait_for(lambda: "stopped reading" in ioc.nn.status()[0], what="the status")
        for _ in range(20):  # the stream goes on for the others
            uid += 1
            pub.publish(frame(uid % 7), uid)
            time.sleep(0.01)
        wait_for(lambda: set(range(1, uid + 1)) <= set(phases.frames),
                 what="every phase at the well-behaved client", timeout=30)
    finally:
        frozen.kill()
        frozen.wait()
        phases.close()


def test_stall_watch_finds_a_peer_that_stops_reading_and_drops_it():
    """The kernel's view the guard relies on: a connection whose peer reads nothing keeps a
    full send queue; one that reads does not; dropping the stalled one resets it."""
    import socket

    from ptychostream.ioc.peers import StallWatch, _address, drop, server_peers

    assert _address("0100007F:DBEC") == "127.0.0.1:56300"
    assert _address("0000000000000000FFFF00000100007F:1F90") == "127.0.0.1:8080"
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        port = lsock.getsockname()[1]
        reader, sleeper = socket.create_connection(lsock.getsockname()), \
            socket.create_connection(lsock.getsockname())
        a, _ = lsock.accept()
        b, _ = lsock.accept()
        served = {a.getpeername()[1]: a, b.getpeername()[1]: b}
        to_reader, to_sleeper = served[reader.getsockname()[1]], served[sleeper.getsockname()[1]]
        to_sleeper.setblocking(False)
        chunk = b"x" * 65536
        try:
            while True:
                to_sleeper.send(chunk)
        except BlockingIOError:
            pass  # the sleeper's window and our send buffer are full
        to_reader.sendall(chunk)
        reader.recv(1 << 20)
        watch = StallWatch(port, samples=2)
        assert {p.fd for p in server_peers(port)} == {a.fileno(), b.fileno()}
        assert watch.sample() == []
        stalled = watch.sample()
        assert [p.fd for p in stalled] == [to_sleeper.fileno()]
        drop(stalled[0])
        assert to_sleeper.recv(1) == b""  # what pvxs sees: the connection ended, so it closes
        to_sleeper.close()
        time.sleep(0.1)
        with pytest.raises(ConnectionResetError):  # reset: the queued data is discarded
            while sleeper.recv(1 << 20):
                pass
        assert [p.fd for p in server_peers(port)] == [to_reader.fileno()]
        for s in (reader, sleeper, a, b):
            s.close()
