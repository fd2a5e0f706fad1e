"""CURVE security and size limits, over real ZeroMQ sockets on loopback with real ONNX Runtime tails:
keys from the real ``edgesplit keys gen`` command, a server that admits only allowed agent keys,
strangers (an unknown key, a plaintext client, a wrong server key) refused and counted while an
authorised agent keeps streaming, and oversized frames dropped before anything is allocated."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time

import numpy as np
import pytest
import zmq

from edgesplit.cli import main as cli_main
from edgesplit.edge.agent import Agent, AgentError
from edgesplit.server.daemon import Server, serve_main
from edgesplit.wire import protocol as P
from edgesplit.wire.codec import ErrorCode
from edgesplit.wire.curve import KeyFileError, ServerCurve, load_public, load_secret


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key pairs made by the CLI: the server, one allowed agent, one agent nobody allowed."""
    root = tmp_path_factory.mktemp("keys")
    for name in ("server", "trusted", "stranger"):
        assert cli_main(["keys", "gen", name, "--out", str(root / "made")]) == 0
    allow = root / "allow"
    allow.mkdir()
    shutil.copy(root / "made" / "trusted.key", allow / "trusted.key")
    return {"dir": root / "made", "allow": allow}


def _wait_for(predicate, timeout=10.0, what="condition"):
    """Liveness only: poll until true, fail after a generous bound."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_keys_gen_writes_a_pair_with_a_private_secret_and_refuses_to_overwrite(tmp_path, capsys):
    assert cli_main(["keys", "gen", "cam-01", "--out", str(tmp_path)]) == 0
    pub, sec = tmp_path / "cam-01.key", tmp_path / "cam-01.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    public, secret = load_secret(sec)
    assert load_public(pub) == public and len(public) == len(secret) == 40
    assert zmq.curve_public(secret) == public  # the two halves belong together
    assert "cam-01.key" in capsys.readouterr().out
    # a second gen would destroy a deployed key: refused with a clear message, files untouched
    assert cli_main(["keys", "gen", "cam-01", "--out", str(tmp_path)]) == 1
    assert "already exist" in capsys.readouterr().err and load_secret(sec) == (public, secret)
    assert cli_main(["keys", "gen", "cam-01", "--out", str(tmp_path), "--force"]) == 0
    assert load_secret(sec)[0] != public
    with pytest.raises(KeyFileError, match="only a public key"):
        load_secret(pub)  # a public certificate where a secret one is needed


def test_curve_admits_allowed_agents_and_refuses_and_counts_strangers(tiny_bundle, cifar_samples, keys):
    k = keys["dir"]
    curve = ServerCurve.load(k / "server.key_secret", keys["allow"])
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=0, curve=curve) as srv:
        trusted = Agent(
            tiny_bundle,
            srv.endpoint,
            server_key=k / "server.key",
            client_key=k / "trusted.key_secret",
            threads=1,
            timeout_s=20,
        )
        trusted.connect()
        first = trusted.infer(cifar_samples[0])
        assert first.ok and first.pred is not None

        # The trusted agent streams from its own thread while strangers knock.
        done, results, strangers_started = threading.Event(), [], threading.Event()
        after_strangers = []

        def stream():
            i = 0
            while not done.is_set():
                r = trusted.infer(cifar_samples[i % len(cifar_samples)])
                results.append(r)
                if strangers_started.is_set():
                    after_strangers.append(r)
                i += 1

        t = threading.Thread(target=stream)
        t.start()
        try:
            strangers_started.set()
            refusals = {
                "unknown key": dict(server_key=k / "server.key", client_key=k / "stranger.key_secret"),
                "plaintext": {},
                "wrong server key": dict(server_key=k / "trusted.key", client_key=k / "trusted.key_secret"),
            }
            messages = {}
            for what, kw in refusals.items():
                stranger = Agent(tiny_bundle, srv.endpoint, load_head=False, timeout_s=10, **kw)
                with pytest.raises(AgentError) as e:
                    stranger.connect()
                messages[what] = str(e.value)
            # each refusal names its handshake failure (the 10 s timeout would say "no welcome")
            assert "not in the server's --allow-keys directory" in messages["unknown key"]
            assert "requires CURVE" in messages["plaintext"]
            assert "--server-key is probably not this server's public key" in messages["wrong server key"]

            # A hand-made plaintext client speaking the protocol correctly gets nothing at all.
            raw = zmq.Context.instance().socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(srv.endpoint)
            raw.send_multipart(P.pack(P.hello(tiny_bundle.hash, "raw-plaintext")))
            assert raw.poll(500) == 0
            raw.close(0)

            _wait_for(lambda: len(after_strangers) >= 5, what="the trusted agent to keep streaming")
        finally:
            done.set()
            t.join(30)
        assert results and all(r.ok for r in results), [r.error_message for r in results if not r.ok][:3]

        # Refusals are counted by reason (read from the ROUTER's monitor by housekeeping).
        def counted():
            s = srv.stats()
            return (
                s.get("auth_failed_key_not_allowed", 0) >= 1
                and s.get("auth_failed_mechanism_mismatch", 0) + s.get("auth_failed_no_detail", 0) >= 1
                and s.get("auth_failed_bad_crypto", 0) >= 1
            )

        _wait_for(counted, what=f"refusals to be counted: {srv.stats()}")
        stats = srv.stats()
        assert stats["sessions_opened"] == 1  # no stranger ever got a session
        assert trusted.infer(cifar_samples[1]).ok
        trusted.close()


def test_allow_list_changes_take_effect_without_a_restart(tiny_bundle, keys, tmp_path):
    k = keys["dir"]
    allow = tmp_path / "allow"
    allow.mkdir()
    curve = ServerCurve.load(k / "server.key_secret", allow)  # empty: nobody yet
    z = np.ones(tiny_bundle.wire_spec["shape"], np.float32)
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=0, curve=curve) as srv:

        def agent():
            return Agent(
                tiny_bundle,
                srv.endpoint,
                server_key=k / "server.key",
                client_key=k / "stranger.key_secret",
                load_head=False,
                timeout_s=10,
            )

        with pytest.raises(AgentError, match="allow-keys"):
            agent().connect()
        shutil.copy(k / "stranger.key", allow / "stranger.key")  # granted: the next handshake sees it
        a = agent().connect()
        assert a.wait_for(a.send_tensor(z)).ok
        a.close()
        (allow / "stranger.key").unlink()  # revoked: new connections are refused again
        with pytest.raises(AgentError, match="allow-keys"):
            agent().connect()


def test_curve_options_are_checked_before_anything_starts(tiny_bundle, keys, capsys):
    k = keys["dir"]
    with pytest.raises(SystemExit) as e:  # CURVE without an allow list would admit any key
        serve_main(["--bundle", str(tiny_bundle.root), "--curve-secret", str(k / "server.key_secret")])
    assert e.value.code == 2 and "--allow-keys" in capsys.readouterr().err
    assert (
        serve_main(
            [
                "--bundle",
                str(tiny_bundle.root),
                "--curve-secret",
                str(k / "server.key"),
                "--allow-keys",
                str(keys["allow"]),
            ]
        )
        == 1
    )
    assert "only a public key" in capsys.readouterr().err
    with pytest.raises(ValueError, match="both"):
        Agent(tiny_bundle, "tcp://127.0.0.1:1", server_key=k / "server.key", load_head=False)
    with pytest.raises(KeyFileError, match="does not exist"):
        Agent(
            tiny_bundle,
            "tcp://127.0.0.1:1",
            server_key=k / "nope.key",
            client_key=k / "trusted.key_secret",
            load_head=False,
        )


def test_oversized_frames_are_refused_before_allocation_and_serving_goes_on(tiny_bundle):
    # max_frame_bytes 64 KiB: a frame up to twice that (plus slack) is read and refused TOO_LARGE;
    # beyond it libzmq drops the connection while reading the length, before allocating the frame.
    limits = P.Limits(max_frame_bytes=64 * 1024)
    with Server([tiny_bundle], "tcp://127.0.0.1:0", threads=1, max_queue_delay_us=0, limits=limits) as srv:

        def client():
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(srv.endpoint)
            s.send_multipart(P.pack(P.hello(tiny_bundle.hash, "big")))
            assert s.poll(5000) and P.parse(s.recv_multipart()).kind == "welcome"
            return s

        mode = tiny_bundle.default_mode
        a = client()
        a.send_multipart(P.pack(P.request(1, mode.id, None), [b"\0" * (100 * 1024)]))
        assert a.poll(5000)
        m = P.parse(a.recv_multipart())
        assert (m.kind, m.id, m.header["code"]) == ("error", 1, ErrorCode.TOO_LARGE)

        b = client()
        b.send_multipart(P.pack(P.request(2, mode.id, None), [b"\0" * (400 * 1024)]))
        assert b.poll(1000) == 0  # dropped by the transport: no reply, nothing parsed
        a.send_multipart(
            P.pack(
                P.request(3, mode.id, None), [b"\0" * (int(np.prod(tiny_bundle.wire_spec["shape"])) * mode.bits // 8)]
            )
        )
        assert a.poll(5000)
        assert P.parse(a.recv_multipart()).kind == "result"  # the server kept serving
        a.close(0)
        b.close(0)
        assert srv.stats().get("error_TOO_LARGE") == 1


def test_secret_key_files_stay_private(tmp_path):
    from edgesplit.wire.curve import generate

    old = os.umask(0)  # even under a permissive umask
    try:
        pub, sec = generate("k", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
