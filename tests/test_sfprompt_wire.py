"""Split training over the wire (docs/PROTOCOL.md §15): a real body server process on ZeroMQ
loopback, the client's :class:`WireBody`, real Imagenette frames at 32 px. A step over the wire
equals the same step in one process; retransmits are answered again and never run twice; every
refusal of §15.5 and §15.2; U-shaped inference gives the model's own logits; an old server
(``edgesplit serve``) answers the training kinds UNSUPPORTED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)

from edgesplit.builder.data import MEAN, STD, DeviceLoader, load_split
from edgesplit.builder.zoo import create_model
from edgesplit.families.sfprompt.export import export_body
from edgesplit.families.sfprompt.model import SFPromptModel, save_student
from edgesplit.families.sfprompt.train import LocalBody, split_step
from edgesplit.families.sfprompt.wire_link import StepLost, WireBody, WireError
from edgesplit.wire import protocol as P
from edgesplit.wire import split_train as S
from edgesplit.wire import transport

ROOT = Path(__file__).resolve().parents[1]


def make_model(seed: int = 0) -> SFPromptModel:
    torch.manual_seed(seed)
    return SFPromptModel(create_model("vit_tiny_cifar", 10), 1, 4, prompts=4, reset_classifier=False)


@pytest.fixture(scope="module")
def frames():
    x, y = load_split("imagenette", "val", 32, limit_per_shard=8)
    xs = torch.cat([b for b, _ in DeviceLoader(x, y, 256, torch.device("cpu"), MEAN, STD)])
    return xs, torch.from_numpy(y)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The body package of :func:`make_model` and a body server process serving it."""
    d = tmp_path_factory.mktemp("body")
    save_student(make_model(), d / "student.pt")
    pkg = export_body(d / "student.pt", d / "pkg")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgesplit.server.body_server",
            str(pkg.root),
            "--bind",
            "tcp://127.0.0.1:0",
            "--max-pending",
            "2",
            "--replay",
            "4",
            "--ttl-ms",
            "60000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    info = json.loads(line)
    assert info["package"] == pkg.hash
    yield info["endpoint"], pkg
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def raw_session(endpoint: str, package: str, serving: str | None = "u-shaped"):
    sock = transport.connect_dealer(endpoint)
    h = S.hello(package, "test", serving) if serving else P.hello(package, "test")
    transport.send(sock, h)
    return sock, ask(sock)


def ask(sock, parts=None):
    if parts is not None:
        transport.send_parts(sock, parts)
    assert sock.poll(30_000), "no answer"
    raw = transport.recv_parts(sock)
    return raw, P.parse(raw)


def test_split_steps_over_the_wire_equal_the_steps_in_one_process(served, frames):
    endpoint, pkg = served
    x, y = frames
    here, there = make_model(), make_model()
    link = WireBody(endpoint, pkg.hash)
    assert link.welcome["train"] == {"tokens": [69, 128], "max_pending": 2, "replay": 4, "ttl_ms": 60000}
    opt_here = torch.optim.SGD(here.client_parameters(), lr=0.05)
    opt_there = torch.optim.SGD(there.client_parameters(), lr=0.05)
    for step in range(1, 4):
        xb, yb = x[(step - 1) * 8 : step * 8], y[(step - 1) * 8 : step * 8]
        a = split_step(here, opt_here, xb, yb, LocalBody(here.body), step)
        b = split_step(there, opt_there, xb, yb, link, step)
        assert abs(a - b) < 1e-5
    for (n, p), (_, q) in zip(here.named_parameters(), there.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), n
    assert not torch.equal(here.head.prompts, make_model().head.prompts)  # they did train
    # every message of a step went once: 3 steps x (fwd + bwd), 69x128 float32 tokens of 8 rows each
    assert link.resends == 0 and link.bytes_up > 6 * 8 * 69 * 128 * 4
    link.close()


def prompt_grad(model, x, y, link) -> torch.Tensor:
    opt = torch.optim.SGD(model.client_parameters(), lr=0.0)
    split_step(model, opt, x, y, link, 1)
    return model.head.prompts.grad.clone()


@pytest.mark.parametrize("bits", [16, 8])
def test_quantized_tensors_over_the_wire(served, frames, bits):
    """Activations and gradients at 16 and 8 bits: the wire run equals the in-process run with the
    same quantization, and the prompt gradient stays close to float32's (figures printed)."""
    endpoint, pkg = served
    x, y = frames[0][:16], frames[1][:16]
    exact = prompt_grad(make_model(), x, y, LocalBody(make_model().body))
    link = WireBody(endpoint, pkg.hash, act_bits=bits, grad_bits=bits)
    wire = prompt_grad(make_model(), x, y, link)
    local = prompt_grad(make_model(), x, y, LocalBody(make_model().body, bits, bits))
    link.close()
    assert torch.allclose(wire, local, atol=1e-6, rtol=1e-4)
    cos = float(F.cosine_similarity(wire.flatten(), exact.flatten(), dim=0))
    rel = float((wire - exact).norm() / exact.norm())
    print(json.dumps({"bits": bits, "prompt_grad_cosine": cos, "prompt_grad_rel_err": rel}))
    assert cos > 0.9 and rel < 0.5


def fwd_parts(step, x, grad=True, bits=32, name="tokens"):
    d, p = S.encode(x, bits, name)
    return P.pack(S.train_fwd(step, d, grad), [p])


def bwd_parts(step, g, bits=32):
    d, p = S.encode(g, bits, "grad_out")
    return P.pack(S.train_bwd(step, d), [p])


def test_retransmits_are_answered_again_and_never_run_twice(served):
    endpoint, pkg = served
    sock, (_, w) = raw_session(endpoint, pkg.hash)
    assert w.kind == "welcome" and {"split_training", "u_shaped"} <= set(w.header["features"])
    t = np.random.default_rng(0).normal(size=(2, 69, 128)).astype(np.float32)
    g = np.random.default_rng(1).normal(size=(2, 69, 128)).astype(np.float32)
    first, m1 = ask(sock, fwd_parts(7, t))
    again, _ = ask(sock, fwd_parts(7, t))
    assert m1.kind == "result" and m1.header["outputs"][0]["name"] == "body_out"
    assert first[1:] == again[1:]  # the same body output bytes
    _, bad = ask(sock, fwd_parts(7, t + 1))
    assert bad.kind == "error" and bad.header["code"] == 1 and "reused" in bad.header["message"] and bad.id == 7
    b1, m2 = ask(sock, bwd_parts(7, g))
    b2, _ = ask(sock, bwd_parts(7, g))
    assert m2.kind == "result" and m2.header["outputs"][0]["name"] == "grad_in" and b1[1:] == b2[1:]
    # the answer is the true input gradient of the body
    body = make_model().body
    ti = torch.from_numpy(t).requires_grad_(True)
    body(ti).backward(torch.from_numpy(g))
    assert np.allclose(S.decode(m2.header["outputs"][0], m2.frames[0]), ti.grad.numpy(), atol=1e-5)
    # unknown, forward-only and over-the-limit steps
    _, e = ask(sock, bwd_parts(99, g))
    assert (e.header["code"], e.header["name"], e.id) == (13, "UNKNOWN_STEP", 99)
    ask(sock, fwd_parts(8, t, grad=False))
    _, e = ask(sock, bwd_parts(8, g))
    assert e.header["code"] == 13
    ask(sock, fwd_parts(9, t))
    ask(sock, fwd_parts(10, t))
    _, e = ask(sock, fwd_parts(11, t))
    assert e.header["name"] == "OVERLOADED"  # max_pending 2
    _, e = ask(sock, bwd_parts(9, g[:1]))
    assert e.header["code"] == 1 and "body_out" in e.header["message"]
    sock.close(0)


def test_refusals(served):
    endpoint, pkg = served
    _, (_, e) = raw_session(endpoint, pkg.hash, serving=None)  # an agent expecting logits
    assert (e.kind, e.header["name"], e.id) == ("error", "UNSUPPORTED", None)
    _, (_, e) = raw_session(endpoint, pkg.hash, serving="head-tail")
    assert e.header["name"] == "UNSUPPORTED"
    _, (_, e) = raw_session(endpoint, "0" * 64)
    assert e.header["name"] == "UNKNOWN_BUNDLE"
    sock = transport.connect_dealer(endpoint)
    t = np.zeros((1, 69, 128), np.float32)
    _, e = ask(sock, fwd_parts(1, t))
    assert (e.header["name"], e.id) == ("NOT_READY", 1)
    sock, _ = raw_session(endpoint, pkg.hash)
    for parts, name in [
        (fwd_parts(2, np.full((1, 69, 128), np.nan, np.float32)), "MALFORMED"),  # NaN
        (fwd_parts(3, np.zeros((1, 70, 128), np.float32)), "MALFORMED"),  # not the body's tokens
        (fwd_parts(4, t, name="x"), "MALFORMED"),
        (fwd_parts(5, np.zeros((300, 69, 128), np.float32)), "TOO_LARGE"),  # over max_batch
    ]:
        _, e = ask(sock, parts)
        assert e.kind == "error" and e.header["name"] == name, (name, e.header)
    h = S.train_fwd(6, S.encode(t, 32, "tokens")[0], True)
    del h["grad"]
    _, e = ask(sock, P.pack(h, [S.encode(t, 32, "tokens")[1]]))
    assert e.header["name"] == "MALFORMED" and "grad" in e.header["message"]
    sock.close(0)
    with pytest.raises(WireError, match="UNKNOWN_BUNDLE"):
        WireBody(endpoint, "1" * 64, timeout_s=10)


def test_u_shaped_inference_gives_the_models_logits(served, frames):
    endpoint, pkg = served
    m = make_model().eval()
    x = frames[0][:4]
    sock, _ = raw_session(endpoint, pkg.hash)
    with torch.no_grad():
        tokens = m.head(x).numpy()
        want = m(x)
    d, p = S.encode(tokens, 32, "tokens")
    _, r = ask(sock, P.pack(P.request(1, 0, [d]), [p]))
    assert r.kind == "result" and r.header["outputs"][0]["name"] == "body_out"
    with torch.no_grad():
        logits = m.tail(torch.from_numpy(S.decode(r.header["outputs"][0], r.frames[0])))
    assert torch.allclose(logits, want, atol=1e-5)
    _, e = ask(sock, P.pack(P.request(2, 1, [d]), [p]))
    assert e.header["name"] == "UNKNOWN_MODE"
    sock.close(0)


def test_an_old_server_answers_training_unsupported():
    """``edgesplit serve`` (no split training) with a shipped head-tail bundle."""
    from edgesplit.server.daemon import Server

    with Server([ROOT / "models" / "cifar10-resnet20-bottlefit"], "tcp://127.0.0.1:0", threads=1) as srv:
        sock = transport.connect_dealer(srv.endpoint)
        t = np.zeros((1, 69, 128), np.float32)
        for parts in (fwd_parts(5, t), bwd_parts(6, t)):
            _, e = ask(sock, parts)
            assert e.kind == "error" and e.header["name"] == "UNSUPPORTED" and e.id in (5, 6)
        sock.close(0)


def test_step_lost_after_the_server_restarts(tmp_path, frames):
    """kill -9 between a step's forward and backward: the restarted server does not hold the
    step, the client is told UNKNOWN_STEP (StepLost), and the step redone under a new id works."""
    save_student(make_model(), tmp_path / "student.pt")
    pkg = export_body(tmp_path / "student.pt", tmp_path / "pkg")
    endpoint = transport.free_tcp_endpoint()

    def start():
        p = subprocess.Popen(
            [sys.executable, "-m", "edgesplit.server.body_server", str(pkg.root), "--bind", endpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert json.loads(p.stdout.readline())["endpoint"] == endpoint
        return p

    proc = start()
    link = WireBody(endpoint, pkg.hash, timeout_s=10)
    m = make_model()
    with torch.no_grad():
        t = m.head(frames[0][:2]).numpy()
    out = link.forward(1, t, True)
    proc.kill()
    proc.wait()
    proc = start()
    link2 = WireBody(endpoint, pkg.hash, timeout_s=10)  # a new session (the old one died with the server)
    with pytest.raises(StepLost):
        link2.backward(1, np.ones_like(out))
    assert np.allclose(link2.forward(2, t, True), out, atol=1e-6)
    assert link2.backward(2, np.ones_like(out)).shape == t.shape
    link.sock.close(0)
    link2.close()
    proc.kill()
    proc.wait()


def test_curve_on_the_body_link(tmp_path, frames):
    """With CURVE keys, an allowed client trains; a plaintext client and a client whose key is
    not on the allow-list get no session (the ZMTP handshake fails; no protocol message)."""
    from edgesplit.families.sfprompt.job import make_curve_keys
    from edgesplit.wire.curve import ClientCurve, generate

    save_student(make_model(), tmp_path / "student.pt")
    pkg = export_body(tmp_path / "student.pt", tmp_path / "pkg")
    keys = tmp_path / "curve"
    make_curve_keys(keys, 1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgesplit.server.body_server",
            str(pkg.root),
            "--bind",
            "tcp://127.0.0.1:0",
            "--curve-secret",
            str(keys / "server.key_secret"),
            "--allow-keys",
            str(keys / "allow"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        endpoint = json.loads(proc.stdout.readline())["endpoint"]
        ok = WireBody(
            endpoint, pkg.hash, curve=ClientCurve.load(keys / "server.key", keys / "clients" / "client-0.key_secret")
        )
        m = make_model()
        x, y = frames[0][:4], frames[1][:4]
        a = split_step(m, torch.optim.SGD(m.client_parameters(), lr=0.0), x, y, ok, 1)
        ref = make_model()
        b = split_step(ref, torch.optim.SGD(ref.client_parameters(), lr=0.0), x, y, LocalBody(ref.body), 1)
        assert abs(a - b) < 1e-6
        ok.close()
        with pytest.raises(WireError, match="no welcome"):
            WireBody(endpoint, pkg.hash, timeout_s=3)
        generate("stranger", tmp_path / "other")
        stranger = ClientCurve.load(keys / "server.key", tmp_path / "other" / "stranger.key_secret")
        with pytest.raises(WireError, match="no welcome"):
            WireBody(endpoint, pkg.hash, timeout_s=3, curve=stranger)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
