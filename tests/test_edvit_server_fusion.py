"""Fusion on the server (PROTOCOL.md §13.5, §13.6 item 3): `edgesplit serve` with a real (tiny,
random-weight) ED-ViT bundle, `edgesplit worker` processes and the camera with a server to fuse,
all on loopback with real CIFAR-10 test frames. The server's logits are checked against the camera
running the same fusion head locally; malformed fused requests from a raw DEALER get §13.5's codes
with their ids; a server stopped mid-stream leaves every later frame fused on the camera, none lost.
No timing asserts: budgets are generous and only what happened is checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from build_fixtures import require_cifar
from edvit_fixtures import build_edvit_bundle
from test_edvit_runtime import Workers

from edgesplit.bundle import Bundle
from edgesplit.data.sources import open_source, take
from edgesplit.data.transforms import preprocess
from edgesplit.edge.scatter_bundle import EdvitBundle, Fusion, SubModelRunner
from edgesplit.edge.scatter_camera import ScatterCamera
from edgesplit.server.daemon import Server
from edgesplit.wire import protocol as P
from edgesplit.wire import scatter_messages as S
from edgesplit.wire.codec import encode_float
from edgesplit.wire.errors import ErrorCode
from edgesplit.wire.kinds import FEATURE_FUSED_REQUESTS
from edgesplit.wire.transport import recv_parts, send_parts

ATOL = 1e-5


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return build_edvit_bundle(tmp_path_factory.mktemp("edvit-srv") / "b", n=2)


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> EdvitBundle:
    return EdvitBundle.load(bundle_dir)


@pytest.fixture(scope="module")
def frames():
    require_cifar()  # the shared shards are part of the install: missing, the tests fail naming them
    return list(take(open_source("cifar10:test"), 16))


@pytest.fixture(scope="module")
def features(bundle):
    """sample -> every sub-model's features, computed here."""
    runner = SubModelRunner(bundle)

    def run(sample) -> dict[int, np.ndarray]:
        x = preprocess(sample.data, bundle.input_spec)
        return {i: runner.run(i, x) for i in sorted(bundle.submodels)}

    return run


@pytest.fixture(scope="module")
def local(bundle, features):
    """Camera-side fusion of a frame with only ``present`` sub-models."""
    fusion = Fusion(bundle)

    def fused(sample, present=(0, 1)):
        f = features(sample)
        return fusion({i: f[i] for i in present})

    return fused


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.stop()


class Serve:
    """`edgesplit serve --bundle <edvit bundle>` on a free loopback port."""

    def __init__(self, *bundles: Path):
        cmd = [sys.executable, "-m", "edgesplit", "serve", "--bind", "tcp://127.0.0.1:0", "--heartbeat-ms", "1000"]
        for b in bundles:
            cmd += ["--bundle", str(b)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = ""
        while "listening on" not in line:
            line = self.proc.stdout.readline()
            assert line, "edgesplit serve exited before listening"
        self.endpoint = line.rsplit(" ", 1)[1].strip()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def serve():
    started: list[Serve] = []

    def start(*bundles: Path) -> Serve:
        s = Serve(*bundles)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_server_fusion_equals_camera_fusion_with_a_worker_killed(bundle_dir, bundle, frames, local, workers, serve):
    _, ep0 = workers.start(bundle_dir, "0")
    w1, ep1 = workers.start(bundle_dir, "1")
    srv = serve(bundle_dir)
    cam = ScatterCamera(bundle, [ep0, ep1], budget_ms=2000, server=srv.endpoint).connect()
    answers = []
    try:
        assert cam.server is not None and cam.server.live, cam.server.report() if cam.server else None
        for i, s in enumerate(frames):
            if i == 8:
                w1.kill()  # SIGKILL: no bye, the connection just drops
                w1.wait()
            answers.append(cam.infer(s))
        # the server fuses a frame missing a sub-model (whatever the cut-off did above)
        f0 = SubModelRunner(bundle, [0]).run(0, preprocess(frames[0].data, bundle.input_spec))
        by_server = cam.server.fuse({0: f0}, deadline_ns=time.perf_counter_ns() + int(30e9))
        assert by_server is not None, cam.server.report()
        np.testing.assert_allclose(by_server[0], local(frames[0], present=(0,)), rtol=1e-5, atol=ATOL)
        assert by_server[1] == [0]
        report = cam.server.report()
    finally:
        cam.close()
    assert [a.frame for a in answers] == list(range(1, len(frames) + 1))  # one answer per frame
    for a, s in zip(answers[:8], frames[:8]):  # all present: every one fused by the server
        assert a.used == [0, 1] and a.missing == [] and a.fused_on == "server" and a.fallback is None
        np.testing.assert_allclose(a.logits, local(s), rtol=1e-5, atol=ATOL)
    degraded = [(a, s) for a, s in zip(answers[8:], frames[8:]) if a.used == [0]]
    assert degraded, "after the kill, frames must be fused without sub-model 1"
    for a, s in degraded:  # on the server, or on the camera when its answer came too late: same logits
        assert a.missing == [1] and a.fused_on in ("server", "camera")
        np.testing.assert_allclose(a.logits, local(s, present=(0,)), rtol=1e-5, atol=ATOL)
    assert report["answered"] == sum(a.fused_on == "server" for a in answers) + 1
    assert srv.stop() == 0  # drains and exits cleanly


def test_server_stopped_mid_stream_frames_fused_on_the_camera(bundle_dir, bundle, frames, local, workers, serve):
    _, ep = workers.start(bundle_dir)
    srv = serve(bundle_dir)
    cam = ScatterCamera(bundle, [ep], budget_ms=2000, server=srv.endpoint).connect()
    answers = []
    try:
        for i, s in enumerate(frames[:12]):
            if i == 5:
                assert srv.stop() == 0  # SIGTERM: drain, bye to the camera, exit
            answers.append(cam.infer(s))
        report = cam.server.report() if cam.server else {}
    finally:
        cam.close()
    assert [a.frame for a in answers] == list(range(1, 13))  # none lost
    assert all(a.fused_on == "server" for a in answers[:5])
    assert all(a.fused_on == "camera" for a in answers[6:]), [a.fused_on for a in answers]
    for a, s in zip(answers, frames):
        assert a.used == [0, 1] and a.logits is not None
        np.testing.assert_allclose(a.logits, local(s), rtol=1e-5, atol=ATOL)
    assert report["answered"] >= 5 and sum(report["failures"].values()) >= 6


def test_agent_cli_with_fusion_on_the_server(bundle_dir, frames, workers, serve, tmp_path):
    import json

    _, ep = workers.start(bundle_dir)
    srv = serve(bundle_dir)
    out = tmp_path / "lines.jsonl"
    cmd = [sys.executable, "-m", "edgesplit", "agent", "--edvit", "--bundle", str(bundle_dir), "--workers", ep]
    cmd += ["--fusion", "server", "--server", srv.endpoint, "--source", "cifar10:test", "--frames", "4"]
    cmd += ["--budget-ms", "2000", "--json-lines", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    summary = lines[-1]["summary"]
    assert summary["frames"] == 4 and summary["fused_on"] == {"server": 4}
    assert summary["server"]["answered"] == 4 and summary["server"]["failures"] == {}
    assert all(x["used"] == [0, 1] and x["fused_on"] == "server" for x in lines[:-1])


# -- the server's checks, from a raw DEALER --------------------------------------------------------


def _dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(endpoint)
    return s


def _ask(sock: zmq.Socket, header: dict, frames: list) -> tuple[dict, list]:
    send_parts(sock, [P.pack_header(header), *frames])
    msg = P.parse(recv_parts(sock), features=(FEATURE_FUSED_REQUESTS,))
    return msg.header, msg.frames


def _feat(bundle: EdvitBundle, sid: int, values: np.ndarray, name: str | None = None) -> tuple[dict, bytes]:
    return encode_float(values, name=name or bundle.submodels[sid].feature_name, dtype="float32")


def test_fused_request_checks_in_order(bundle_dir, bundle, frames, features, tiny_bundle):
    """§13.5's checks with the request's id: submodels vs tensors, UNKNOWN_SUBMODEL, the features'
    name and shape, compact with submodels, mode; a valid one answered with logits and used. A
    session on a head-tail bundle is not offered fused_requests and refuses one as v1.1 does."""
    ed = Bundle.load(bundle_dir)
    f = features(frames[0])
    d0, p0 = _feat(bundle, 0, f[0])
    d1, p1 = _feat(bundle, 1, f[1])
    dim = bundle.submodels[0].dim
    with Server([ed, tiny_bundle], "tcp://127.0.0.1:0", heartbeat_ms=0) as srv:
        assert srv.endpoint is not None
        sock = _dealer(srv.endpoint)
        try:
            h, _ = _ask(sock, P.hello(ed.hash, "test"), [])
            assert h["kind"] == "welcome" and h["features"] == [FEATURE_FUSED_REQUESTS]
            cases = [
                (S.fused_request(1, 0, [0, 1], [d0]), [p0], ErrorCode.MALFORMED),  # 2 sub-models, 1 tensor
                (S.fused_request(2, 0, [0, 5], [d0, d1]), [p0, p1], ErrorCode.UNKNOWN_SUBMODEL),
                (
                    S.fused_request(3, 0, [0], [_feat(bundle, 0, np.zeros(dim + 1, np.float32))[0]]),
                    [bytes(4 * (dim + 1))],
                    ErrorCode.MALFORMED,
                ),
                (S.fused_request(4, 0, [1], [_feat(bundle, 1, f[1], name="logits")[0]]), [p1], ErrorCode.MALFORMED),
                ({**P.request(5, 0, None), "submodels": [0]}, [p0], ErrorCode.MALFORMED),  # compact with submodels
                (S.fused_request(6, 7, [0, 1], [d0, d1]), [p0, p1], ErrorCode.UNKNOWN_MODE),
                (P.request(7, 0, [d0]), [p0], ErrorCode.MALFORMED),  # no submodels on an ED-ViT session
                (S.fused_request(8, 0, list(range(17)), [d0]), [p0], ErrorCode.TOO_LARGE),
            ]
            for header, payload, code in cases:
                h, _ = _ask(sock, header, payload)
                assert h["kind"] == "error" and h["id"] == header["id"], h
                assert h["code"] == code, (header["id"], h)
            # the first failing check is the answer: an unknown sub-model before a wrong shape
            h, _ = _ask(
                sock, S.fused_request(9, 0, [0, 9], [_feat(bundle, 0, np.zeros(3, np.float32))[0], d1]), [bytes(12), p1]
            )
            assert (h["id"], h["code"]) == (9, ErrorCode.UNKNOWN_SUBMODEL)
            fusion = Fusion(bundle)
            for rid, present in ((10, [0, 1]), (11, [1])):
                descs, payloads = zip(*[_feat(bundle, s, f[s]) for s in present])
                h, out = _ask(sock, S.fused_request(rid, 0, present, list(descs)), list(payloads))
                assert h["kind"] == "result" and h["id"] == rid and h["used"] == present, h
                logits = np.frombuffer(out[0], "<f4")
                np.testing.assert_allclose(logits, fusion({s: f[s] for s in present}), rtol=1e-5, atol=ATOL)
            # a session on the head-tail bundle: no fused_requests, a fused request refused as v1.1
            h, _ = _ask(sock, P.hello(tiny_bundle.hash, "test"), [])
            assert h["kind"] == "welcome" and FEATURE_FUSED_REQUESTS not in h["features"]
            h, _ = _ask(sock, S.fused_request(12, 0, [0, 1], [d0, d1]), [p0, p1])
            assert (h["kind"], h["id"], h["code"]) == ("error", 12, ErrorCode.MALFORMED)
        finally:
            sock.close()
